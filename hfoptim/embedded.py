"""The embedded default: real text, a tokenizer and a small model, with no download.

Everything here exists on every machine that has Python:

* **text**: the Python standard library's own source files (``sysconfig.get_paths()["stdlib"]``),
  a deterministic, size-capped subset (:func:`stdlib_corpus`), split into train and validation
  *by file* with a stable hash of the file's relative path, so no file is in both;
* **tokenizer**: a byte-level BPE (vocabulary 2048) trained on the train split with
  ``tokenizers`` on first use and cached under ``$HFOPTIM_CACHE`` (default
  ``~/.cache/hfoptim``) (:func:`embedded_tokenizer`);
* **model**: a small Llama-style causal LM built from a ``LlamaConfig`` ("tiny-llama", about
  1M parameters; :func:`tiny_llama_config`);
* **datasets**: token blocks for pretraining (:class:`BlockDataset`) and docstring -> function
  pairs for supervised fine-tuning (:func:`function_examples`).

The recipes, ``hfoptim memory tiny-llama`` and ``python -m hfoptim.demo`` all use it; real users
pass their own model and data instead.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import model_class_for, model_from_config  # noqa: F401  (the models the app builds)

#: the name of the embedded model config wherever a model name or path is accepted
TINY_LLAMA = "tiny-llama"
#: default cap on the text read from the standard library (bytes of source)
DEFAULT_MAX_BYTES = 2_000_000
DEFAULT_VOCAB_SIZE = 2048
#: one file in this many goes to the validation split
VALIDATION_EVERY = 10

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

#: standard-library folders that are not representative source (tests, generated tables, demos)
_SKIPPED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "__pycache__",
        "ensurepip",
        "pydoc_data",
        "encodings",
    }
)
_MIN_FILE_BYTES = 1_000
_MAX_FILE_BYTES = 200_000


def cache_dir() -> Path:
    """Where trained tokenizers and token ids are kept: ``$HFOPTIM_CACHE`` or ``~/.cache/hfoptim``."""
    return Path(os.environ.get("HFOPTIM_CACHE") or Path.home() / ".cache" / "hfoptim")


# ---------------------------------------------------------------------------------------- text
@dataclass(frozen=True)
class Corpus:
    """Source files of the standard library, split by file into train and validation."""

    root: Path
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]

    def texts(self, split: str) -> list[str]:
        files = {"train": self.train_files, "validation": self.validation_files}[split]
        return [(self.root / f).read_text(encoding="utf-8", errors="replace") for f in files]

    @property
    def fingerprint(self) -> str:
        """Changes when the selected files or their sizes change (another Python version)."""
        h = hashlib.sha256()
        for name in (*self.train_files, "|", *self.validation_files):
            size = (self.root / name).stat().st_size if name != "|" else 0
            h.update(f"{name}:{size};".encode())
        return h.hexdigest()[:16]


def _is_validation(relative: str) -> bool:
    return zlib.crc32(relative.encode()) % VALIDATION_EVERY == 0


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> Corpus:
    """A deterministic subset of the standard library's ``*.py`` files, at most ``max_bytes``.

    Eligible files (1 kB - 200 kB, outside tests, IDLE, encodings tables, site-packages) are
    sorted by relative path and taken with an even stride, so the subset spans the whole library
    whatever the cap. A file goes to validation when ``crc32(path) % 10 == 0``.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    eligible: list[tuple[str, int]] = []
    for path in base.rglob("*.py"):
        relative = path.relative_to(base)
        if any(part in _SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        size = path.stat().st_size
        if _MIN_FILE_BYTES <= size <= _MAX_FILE_BYTES:
            eligible.append((relative.as_posix(), size))
    eligible.sort()
    if not eligible:
        raise RuntimeError(f"no Python source files found under {base}: the embedded corpus needs the stdlib")
    total = sum(size for _, size in eligible)
    stride = max(1, -(-total // max_bytes))
    chosen, used = [], 0
    for name, size in eligible[::stride]:
        if used + size > max_bytes and chosen:
            break
        chosen.append(name)
        used += size
    validation = tuple(n for n in chosen if _is_validation(n))
    train = tuple(n for n in chosen if not _is_validation(n))
    if not validation:  # a tiny cap: keep at least one file out
        validation, train = train[-1:], train[:-1]
    if not train:
        raise ValueError(f"max_bytes={max_bytes} selects too little text for a train and a validation split")
    return Corpus(base, train, validation)


# ---------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=None, pad_token=PAD_TOKEN
    )


def _atomic_dir(target: Path, write) -> Path:
    """Write a folder with ``write(tmp)`` and move it into place (concurrent runs are safe)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tokenizer_dir(corpus: Corpus, vocab_size: int) -> Path:
    import tokenizers

    key = hashlib.sha256(f"{corpus.fingerprint}:{vocab_size}:{tokenizers.__version__}:v1".encode()).hexdigest()[:16]
    return cache_dir() / f"tokenizer-bpe{vocab_size}-{key}"


def embedded_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, max_bytes: int = DEFAULT_MAX_BYTES, corpus: Corpus | None = None
):
    """The embedded tokenizer: trained on the corpus's train split on first use, then loaded
    from the cache (``cache_dir()/tokenizer-bpe<vocab>-<fingerprint>``)."""
    from transformers import PreTrainedTokenizerFast

    corpus = corpus or stdlib_corpus(max_bytes)
    folder = _tokenizer_dir(corpus, vocab_size)

    def write(tmp: Path) -> None:
        tokenizer = train_tokenizer(corpus.texts("train"), vocab_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "corpus.json").write_text(
            json.dumps({"root": str(corpus.root), "train": corpus.train_files, "validation": corpus.validation_files})
        )

    _atomic_dir(folder, write)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def tokenize_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All ``texts`` as one 1-D tensor of token ids, each document followed by EOS."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for piece in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(piece)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def corpus_token_ids(tokenizer, split: str, corpus: Corpus) -> torch.Tensor:
    """Token ids of a split of the embedded corpus, cached next to the tokenizer when it is the
    embedded one."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    if folder.is_dir() and folder.parent == cache_dir():
        path = folder / f"ids-{split}-{corpus.fingerprint}.pt"
        if path.exists():
            return torch.load(path)
        ids = tokenize_documents(tokenizer, corpus.texts(split))
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids, tmp)
        os.replace(tmp, path)
        return ids
    return tokenize_documents(tokenizer, corpus.texts(split))


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` tokens for causal-LM training
    (``labels`` = ``input_ids``; the model shifts them). The tail shorter than a block is dropped."""

    def __init__(self, ids: torch.Tensor, block_size: int, max_blocks: int | None = None):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        n = ids.numel() // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        if n == 0:
            raise ValueError(f"{ids.numel()} tokens do not fill one block of {block_size}")
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        block = self.blocks[i]
        return {"input_ids": block, "labels": block}


# ---------------------------------------------------------------------------------------- SFT pairs
def _function_pair(node: ast.FunctionDef, max_chars: int) -> dict[str, str] | None:
    doc = ast.get_docstring(node)
    if not doc or len(node.body) < 2 or node.name.startswith("__"):
        return None
    stripped = copy.copy(node)  # shallow: the parsed tree itself is not changed
    stripped.body = node.body[1:]  # without the docstring
    stripped.decorator_list = []
    code = ast.unparse(stripped)
    if len(code) > max_chars:
        return None
    signature = code.split("\n", 1)[0].removeprefix("def ").rstrip(":")
    prompt = f"Write the Python function `{signature}`.\n{doc.strip()}"
    return {"prompt": prompt, "response": code}


def function_examples(corpus: Corpus, split: str, max_chars: int = 1200) -> list[dict[str, str]]:
    """Supervised pairs from the corpus: the docstring and signature of a function (prompt) and
    its code without the docstring (response), for every documented function of a split."""
    out = []
    for text in corpus.texts(split):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                pair = _function_pair(node, max_chars)
                if pair is not None:
                    out.append(pair)
    return out


# ---------------------------------------------------------------------------------------- model
def tiny_llama_config(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    hidden_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    intermediate_size: int = 352,
    max_position_embeddings: int = 512,
    tokenizer=None,
    **overrides,
):
    """A small Llama-style config (about 1M parameters at the defaults). With ``tokenizer`` the
    vocabulary and special-token ids follow it."""
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    else:
        ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **ids,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def load_config(name_or_path: str, **kwargs):
    """A model config: ``"tiny-llama"`` (embedded), a local folder or a hub name."""
    if name_or_path == TINY_LLAMA:
        return tiny_llama_config(**kwargs)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, **kwargs)
