"""What the recipes share: arguments, the model, the tokenizer, the data and the results.

Sources, in order of precedence:

* model: ``--model_name_or_path`` (pretrained weights: hub name or local folder), else a fresh model
  from ``--config_name`` (``tiny-llama`` by default: the embedded small Llama; or any config on the
  hub or in a folder), with ``--config_overrides "hidden_size=256,num_hidden_layers=6"``;
* tokenizer: ``--tokenizer_name``, else the model's, else the embedded one (trained on the spot);
* data: ``--dataset_name`` (hub name or local dataset folder, needs ``pip install datasets``),
  else ``--train_file`` / ``--validation_file`` (text files, or ``.jsonl`` records), else the
  embedded default (Python standard-library source, split by file).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import HfArgumentParser, set_seed

import hfoptim
from hfoptim.app.corpus import DEFAULT_MAX_BYTES, embedded_tokenizer
from hfoptim.integrations.transformers.sharding import requested_sharding
from hfoptim.memory import state_bytes
from hfoptim.models import TINY_LLAMA, load_config, tiny_llama_config

logger = logging.getLogger("hfoptim.recipes")

#: the Trainer and its arguments: hfoptim's (every hfoptim optimizer name in --optim, typed
#: --optim_args) when present, else transformers' own
if hasattr(hfoptim, "HFOptimTrainingArguments") and hasattr(hfoptim, "HFOptimTrainer"):
    TrainingArguments = hfoptim.HFOptimTrainingArguments
    Trainer = hfoptim.HFOptimTrainer
else:  # pragma: no cover - only before the Trainer integration exists
    TrainingArguments = transformers.TrainingArguments
    Trainer = transformers.Trainer


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained weights to start from: a hub name or a local folder. Unset: a fresh model."},
    )
    config_name: str = field(
        default=TINY_LLAMA,
        metadata={"help": "Config of a fresh model (ignored with --model_name_or_path): 'tiny-llama', hub or folder."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Overrides of the fresh model's config, e.g. 'hidden_size=256,num_hidden_layers=6'."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (hub name or folder). Default: the model's, else the embedded one."}
    )
    model_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype to load pretrained weights in", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the hub or a local dataset folder (needs `datasets`)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "Local training data: a text file, a .jsonl file, or a folder of text files."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (as --train_file)."})
    text_column: str = field(default="text", metadata={"help": "Column/field holding the text."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Share of the training data held out when there is no validation data."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples/blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on validation examples/blocks."})
    embedded_max_bytes: int = field(
        default=DEFAULT_MAX_BYTES,
        metadata={"help": "Embedded default only: bytes of standard-library source to read."},
    )


# ---------------------------------------------------------------------------------------- setup
def parse_args(script_dataclasses: tuple, argv: list[str] | None = None):
    """Parse the command line (or one ``.json``/``.yaml`` file) into the dataclasses and the
    Trainer's arguments; sets up logging and the seed."""
    _multi_process_cpu()
    parser = HfArgumentParser((*script_dataclasses, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        parsed = parser.parse_yaml_file(os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    training_args = parsed[-1]
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    return parsed


def _multi_process_cpu() -> None:
    """Launched with several processes on a machine without an accelerator (accelerate_configs/
    multi_cpu.yaml, torchrun): make the processes one gloo group on CPU instead of N independent
    single-process runs. With a DeepSpeed / FSDP config (deepspeed_zero*.yaml, fsdp2.yaml) the
    arguments set up that sharding on CPU instead (``HFOptimTrainingArguments.cpu_sharding``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and requested_sharding() is None:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def parse_overrides(text: str | None) -> dict[str, Any]:
    """``"hidden_size=256,rope_theta=1e4,tie_word_embeddings=false"`` -> typed dict."""
    out: dict[str, Any] = {}
    for piece in (text or "").split(","):
        if not piece.strip():
            continue
        key, sep, value = piece.partition("=")
        if not sep:
            raise ValueError(f"--config_overrides entries look like key=value, got {piece!r}")
        value = value.strip()
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key.strip()] = lowered == "true"
            continue
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def load_tokenizer(model_args: ModelArguments, data_args: DataArguments):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None and model_args.config_name != TINY_LLAMA:
        name = model_args.config_name
    if name is None:
        return embedded_tokenizer(max_bytes=data_args.embedded_max_bytes)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, tokenizer):
    """Pretrained weights, or a fresh model from a config; embeddings resized to the tokenizer."""
    from transformers import AutoModelForCausalLM

    if model_args.model_name_or_path:
        dtype = model_args.model_dtype
        kwargs = {} if dtype in (None, "auto") else {"dtype": getattr(torch, dtype)}
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **kwargs
        )
    else:
        overrides = parse_overrides(model_args.config_overrides)
        if model_args.config_name == TINY_LLAMA:
            config = tiny_llama_config(tokenizer=tokenizer, **overrides)
        else:
            config = load_config(model_args.config_name, trust_remote_code=model_args.trust_remote_code)
            for key, value in overrides.items():
                if not hasattr(config, key):
                    raise ValueError(f"--config_overrides: {type(config).__name__} has no field {key!r}")
                setattr(config, key, value)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info("fresh %s model, %.2f M parameters", type(model).__name__, model.num_parameters() / 1e6)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


# ---------------------------------------------------------------------------------------- data
def _read_local(path: str, column: str) -> list[Any]:
    """Records of a local file or folder: ``.jsonl``/``.json`` -> dicts, text -> one string per file."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            raise ValueError(f"no files in {path}")
        return [r for f in files for r in _read_local(str(f), column)]
    if not p.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    if p.suffix == ".jsonl":
        with p.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [data])
    return [{column: p.read_text(encoding="utf-8", errors="replace")}]


def load_records(data_args: DataArguments, training_args) -> tuple[list[Any], list[Any]] | None:
    """Train and validation records from ``--dataset_name`` or local files; ``None`` for the
    embedded default."""
    if data_args.dataset_name:
        try:
            import datasets
        except ImportError:
            raise SystemExit("--dataset_name needs the `datasets` package: pip install datasets") from None
        with training_args.main_process_first(desc="loading the dataset"):
            raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        train = list(raw["train"])
        validation = list(raw["validation"]) if "validation" in raw else None
    elif data_args.train_file:
        train = _read_local(data_args.train_file, data_args.text_column)
        validation = None
        if data_args.validation_file:
            validation = _read_local(data_args.validation_file, data_args.text_column)
    else:
        return None
    if validation is None:
        n_val = max(1, len(train) * data_args.validation_split_percentage // 100)
        if len(train) < 2:
            raise ValueError("need at least 2 training records to hold out validation data (or pass a validation set)")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(training_args.seed)).tolist()
        validation = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    return train, validation


# ---------------------------------------------------------------------------------------- results
def finish(trainer, training_args, train_result, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save the model, the tokenizer and the trainer state; evaluate (validation loss and
    perplexity); write ``train_results.json``, ``eval_results.json`` and ``all_results.json``."""
    trainer.save_model()
    trainer.save_state()
    metrics = dict(train_result.metrics)
    metrics.update(_state_bytes(trainer))
    metrics["optim"] = str(training_args.optim)
    metrics.update(extra or {})
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = math.exp(eval_metrics["eval_loss"]) if eval_metrics["eval_loss"] < 50 else math.inf
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics


def shutdown() -> None:
    """End the run's process group (multi-process launches), as torch asks before exit; leaving
    it to interpreter teardown races gloo's threads on CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _state_bytes(trainer) -> dict[str, float]:
    """Optimizer-state bytes, all processes together (hfoptim's OptimizerStateCallback measures them
    after the first step), else this process's optimizer walked here."""
    for callback in trainer.callback_handler.callbacks:
        measured = getattr(callback, "metrics", None)
        if type(callback).__name__ == "OptimizerStateCallback" and measured:
            return dict(measured)
    optimizer = trainer.optimizer
    if optimizer is None:
        return {}
    state = state_bytes(optimizer).total
    params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return {"optimizer_state_bytes": state, "optimizer_state_bytes_per_param": state / max(params, 1)}


def last_checkpoint(training_args) -> str | None:
    """``--resume_from_checkpoint`` or, with ``--resume_from_checkpoint true``-style use of an
    existing output folder, its newest ``checkpoint-*``."""
    from transformers.trainer_utils import get_last_checkpoint

    resume = training_args.resume_from_checkpoint
    if resume in (None, "", "false", "False"):
        return None
    if resume in ("true", "True", "last"):
        found = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if found is None:
            raise ValueError(f"--resume_from_checkpoint {resume}: no checkpoint in {training_args.output_dir}")
        return found
    return resume
