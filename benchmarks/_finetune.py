"""Fine-tuning quality: each optimizer at its own best learning rate, full fine-tuning and LoRA.

    python benchmarks/quality.py --finetune                 # the study (not part of make bench)
    python benchmarks/quality.py --finetune --smoke         # 2 lrs, 1 seed, a few steps (finetune_smoke.*)
    python benchmarks/quality.py --finetune --tables-only   # the tables and plots again, from finetune.json
    python benchmarks/quality.py --finetune --estimate-only # the wall-time estimate alone

(``quality.py --finetune`` runs this file, which ``make bench`` leaves out: its name starts with ``_``.)

The base model: the embedded tiny Llama pretrained once with torch's AdamW on the train split of
the embedded corpus (``--pretrain-steps`` at ``--pretrain-lr``, the quality benchmark's schedule)
and cached under ``--cache-dir`` (default ``outputs/finetune_base``) in a folder named by a hash of
the model config, the corpus and the pretraining settings -- not the commit, so later sessions
reuse it. The task: the SFT recipe's (``recipes/sft_lora.py``: its prompt template, its
tokenisation with the loss on response tokens only, its LoRA set-up with the recipe's defaults)
docstring -> function pairs, taken from the corpus's *validation* files, which pretraining never
saw (every eligible standard-library file outside the embedded corpus's train split); one pair in
five (by a hash of the prompt) is held out for the validation loss.

Protocol (``_study.py``): per optimizer and mode (full, LoRA), a sweep of four peak learning rates
spanning 10x around the optimizer's centre (``study.CENTRES`` x :data:`MODE_SCALE`) for
``--sweep-steps`` (default half of ``--steps``), then ``--seeds`` at the best lr for ``--steps``;
warm-up 10%, cosine to 10%, clipping 1.0, ``--weight-decay`` on matrices. Writes
``results/finetune.json`` (every run: mode, phase, lr, seed, curve; machine and commit),
``finetune.md``, ``finetune_<mode>_curves.png`` and the ``finetune`` section of BENCHMARKS.md.
It prints a wall-time estimate before the sweep (after pretraining the base on first use, which
it does not count). Finished runs are journaled per mode (``results/finetune_<mode>.journal.jsonl``)
until the results are written: after an interruption the same command resumes from them.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "recipes"))
import _study as study  # noqa: E402
import quality  # noqa: E402
from _timing import RESULTS_DIR, library_versions, machine_info, update_report, write_json  # noqa: E402
from sft_lora import PadCollator, SFTArguments, SFTDataset, add_lora  # noqa: E402

from hfoptim.app.corpus import Corpus, embedded_tokenizer, function_examples, stdlib_corpus  # noqa: E402
from hfoptim.models import model_from_config  # noqa: E402

MODES = ("full", "lora")
#: the sweep centre in each mode relative to the pretraining centre (study.CENTRES): full
#: fine-tuning moves a trained model, so smaller steps; LoRA trains fresh adapters from zero
MODE_SCALE = {"full": 1 / 3, "lora": 1.0}
#: the optimizers of the fine-tuning study (the ones not registered yet are skipped at run time)
NAMES = [
    "adamw",
    "ademamix",
    "adan",
    "adafactor",
    "lamb",
    "amos",
    "nsgda",
    "smmf",
    "adamw_8bit",
    "ademamix_8bit",
    "adams",
    "adamcpr",
    "adamomentum",
    "muon",
    "adamw_4bit",
]
#: one held-out SFT pair in this many goes to the fine-tuning validation set
EVAL_EVERY = 5


# ---------------------------------------------------------------------------------------- base model
def base_key(config, corpus: Corpus, args) -> str:
    """The cache key of the pretrained base: model config, corpus and pretraining settings."""
    settings = {k: getattr(args, k) for k in ("pretrain_steps", "pretrain_lr", "batch_size", "block_size")}
    config_dict = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    blob = json.dumps({"config": config_dict, "corpus": corpus.fingerprint, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrain(data: dict, args, folder: Path, log) -> None:
    """Pretrain the embedded model with torch's AdamW (seed 0) and save it to ``folder``."""
    torch.manual_seed(0)
    model = model_from_config(data["config"])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1)
    train = data["train"]
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))

    def batch_at(step: int) -> dict:
        batch = quality.block_batch(train, order, step, args.batch_size)
        return {"input_ids": batch, "labels": batch}

    def after_step(step: int, loss: float) -> None:
        if step % max(1, args.pretrain_steps // 5) == 0:
            log(f"pretraining the base: step {step}/{args.pretrain_steps}, loss {loss:.3f}")

    quality.train_steps(model, optimizer, args.pretrain_steps, batch_at, after_step)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def base_model(args, log) -> tuple[Path, dict]:
    """The cached base (pretrained on first use) and the embedded data it was trained on."""
    data = quality.prepare_data(args.block_size, args.eval_blocks)
    corpus = stdlib_corpus()
    folder = Path(args.cache_dir) / f"tiny-llama-{base_key(data['config'], corpus, args)}"
    if folder.exists():
        log(f"base model: {folder} (cached)")
    else:
        log(f"base model: pretraining into {folder}")
        pretrain(data, args, folder, log)
    return folder, data


def held_out_corpus() -> Corpus:
    """The standard-library files pretraining never trained on: every eligible file outside the
    embedded corpus's train split (its strided subset leaves most of the library out)."""
    seen = set(stdlib_corpus().train_files)
    everything = stdlib_corpus(max_bytes=10**12)
    files = tuple(f for f in (*everything.train_files, *everything.validation_files) if f not in seen)
    return Corpus(everything.root, files, ())


def sft_data(args) -> dict:
    """The SFT pairs of the held-out files, tokenised by the recipe; one in :data:`EVAL_EVERY`
    (by a hash of the prompt) for validation."""
    corpus = held_out_corpus()
    tokenizer = embedded_tokenizer()
    pairs = function_examples(corpus, "train")
    held = [p for p in pairs if zlib.crc32(p["prompt"].encode()) % EVAL_EVERY == 0]
    train = [p for p in pairs if zlib.crc32(p["prompt"].encode()) % EVAL_EVERY != 0]
    sft = SFTArguments(max_seq_length=args.max_seq_length)
    return {
        "train": SFTDataset(train, tokenizer, sft).items,
        "validation": SFTDataset(held, tokenizer, sft, limit=args.eval_examples).items,
        "pad": tokenizer.pad_token_id,
        "describe": f"{len(pairs):,} docstring -> function pairs from {len(corpus.train_files)} standard-library "
        "files outside the pretraining split",
    }


# ---------------------------------------------------------------------------------------- one run
_DATA: dict = {}


def _init_worker(data: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _DATA.update(data)
    warnings.filterwarnings("ignore")


def _batch(items: list, collate) -> dict:
    return collate([{"input_ids": ids, "labels": labels} for ids, labels in items])


@torch.no_grad()
def evaluate(model, items: list, collate, batch_size: int) -> float:
    """Mean cross-entropy over all response tokens of ``items``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = _batch(items[i : i + batch_size], collate)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    model.train()
    return total / count


def train_one(name: str, seed: int, args) -> dict:
    """Fine-tune the base with ``name`` at ``args.lr`` in ``args.mode`` for ``args.steps`` steps."""
    from transformers import AutoModelForCausalLM

    data = _DATA
    run = quality.Run(name, seed)
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(data["base"])
        if args.mode == "lora":
            model = add_lora(model, SFTArguments())
        model.train()
        run.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = quality.build_optimizer(name, model, args)
        collate = PadCollator(data["pad"])
        train = data["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()

        def batch_at(step: int) -> dict:
            start_at = (step * args.batch_size) % len(order)
            idx = (order + order)[start_at : start_at + args.batch_size]
            return _batch([train[i] for i in idx], collate)

        def evaluate_now() -> float:
            return evaluate(model, data["validation"], collate, args.batch_size * 2)

        after_step = quality.recorder(run, args.steps, args.evals, evaluate_now)
        quality.train_steps(model, optimizer, args.steps, batch_at, after_step)
        run.state_bytes = quality.state_bytes(optimizer)
    except Exception as error:
        run.error = f"{type(error).__name__}: {error}"
    run.seconds = time.perf_counter() - start
    return asdict(run)


# ---------------------------------------------------------------------------------------- report
def markdown(record: dict, level: int = 3, plot_dir: str = "") -> str:
    a = record["args"]
    parts = [
        f"{'#' * level} Fine-tuning quality, each optimizer at its best learning rate",
        "",
        f"Base: the embedded tiny Llama pretrained with torch AdamW for {a['pretrain_steps']} steps at lr "
        f"{a['pretrain_lr']} on the corpus's train split (cached as `{record['base']}`). Task: {record['data']}, "
        f"the SFT recipe's template with the loss on response tokens only, batch {a['batch_size']}, at most "
        f"{a['max_seq_length']} tokens per example; validation loss on {record['eval_examples']} held-out pairs. "
        "LoRA: the recipe's defaults (r 16, alpha 32, dropout 0.05, all linear layers). Sweep centres: the "
        f"pretraining centres x {record['mode_scale']['full']:.2f} for full fine-tuning, x "
        f"{record['mode_scale']['lora']:.2f} for LoRA. What this says: how the "
        "optimizers compare when adapting a small trained model to a new task at their own tuned lr; what it does "
        "not say: how they rank on billion-parameter models or instruction data.",
        "",
    ]
    for mode in MODES:
        if mode not in record["modes"]:
            continue
        sub = {**record, **record["modes"][mode]}
        plot_path = f"{plot_dir}{record['stem']}_{mode}_curves.png"
        title = "Full fine-tuning" if mode == "full" else "LoRA"
        parts.append(study.markdown(sub, title, [], level + 1, plot_path))
    return "\n".join(parts)


def outputs(record: dict, out: Path, default_dir: bool) -> str:
    stem = record["stem"]
    for mode, sub in record["modes"].items():
        study.plot({**record, **sub}, out / f"{stem}_{mode}_curves.png", f"{mode} fine-tuning: validation loss")
    text = markdown(record, level=1)
    (out / f"{stem}.md").write_text(text)
    if default_dir and stem == "finetune":
        if update_report("finetune", markdown(record, level=3, plot_dir="benchmarks/results/")):
            print("updated the finetune section of BENCHMARKS.md", file=sys.stderr)
    return text


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_arguments(parser)
    parser.add_argument("--names", nargs="+", help=f"optimizers (default: {' '.join(NAMES)}, those registered)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each seed run")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128, help="pretraining block")
    parser.add_argument("--eval-blocks", type=int, default=48)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--evals", type=int, default=10, help="validation evaluations per run")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes, one torch thread each (0: here)")
    parser.add_argument("--cache-dir", default="outputs/finetune_base", help="where the pretrained base is kept")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = Path(args.output_dir)
    stem = "finetune_smoke" if args.smoke else "finetune"
    default_dir = out.resolve() == RESULTS_DIR.resolve()
    if args.tables_only:
        print(outputs(json.loads((out / f"{stem}.json").read_text()), out, default_dir))
        return 0
    args.sweep_steps = args.sweep_steps or max(1, args.steps // 2)
    factors, edge_steps = study.LR_FACTORS, study.EDGE_STEPS
    if args.smoke:
        edge_steps = 0  # a smoke run checks the plumbing: two lrs, nothing past them
        study.smoke(args)
        factors = study.SMOKE_FACTORS
    from hfoptim.registry import list_optimizers

    names = study.available(args.names or NAMES, set(list_optimizers()).__contains__, log)
    if "adamw" not in names:
        names = ["adamw", *names]
    started = time.perf_counter()
    torch.set_num_threads(1)  # as in the workers (the base's pretraining and the timing probes)
    base, pretrain_data = base_model(args, log)
    data = {**sft_data(args), "base": str(base)}
    log(f"fine-tuning data: {data['describe']}: {len(data['train'])} train / {len(data['validation'])} validation")
    centres = {n: study.CENTRES[n] for n in names}
    plans = {}
    for mode in args.modes:
        scaled = {n: c * MODE_SCALE[mode] for n, c in centres.items()}
        plans[mode] = {n: study.grid(n, factors, scaled) for n in names}
    _init_worker(data, 1)
    timed = 4 if args.smoke else 20
    probes = {}
    for mode in args.modes:
        probe_args = study.probe_args(argparse.Namespace(**{**vars(args), "mode": mode}), 1e-3, timed)
        probes[mode] = study.probe_seconds(lambda job=probe_args: train_one("adamw", 0, job)["seconds"] / timed)
    estimate = sum(study.estimate(probes[m], plans[m], args) for m in args.modes)
    per_step = ", ".join(f"{m} {s:.3f} s/step" for m, s in probes.items())
    log(f"estimate (the base pretrained): {per_step} (adamw, {timed} timed steps) -> {estimate / 60:.0f} min")
    if args.estimate_only:
        return 0
    modes, journals = {}, []
    for mode in args.modes:
        job = copy.copy(args)
        job.mode = mode
        journals.append(study.Journal(out / f"{stem}_{mode}.journal.jsonl", job))
        resumed = len(journals[-1].done)
        runs = study.run_study(plans[mode], job, train_one, _init_worker, (data, 1), log, journals[-1], edge_steps)
        modes[mode] = {"summary": study.summarize(runs, names), "runs": runs, "resumed_runs": resumed}
    command = "python benchmarks/quality.py --finetune " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {
        "machine": machine_info(),
        "libraries": library_versions(),
        "command": command.strip(),
        "stem": stem,
        "args": vars(args),
        "seeds": args.seeds,
        "factors": list(factors),
        "edge_steps": edge_steps,
        "mode_scale": MODE_SCALE,
        "reference": "adamw",
        "base": base.name,
        "pretrain_data": pretrain_data["describe"],
        "data": data["describe"],
        "eval_examples": len(data["validation"]),
        "seconds_per_step_probe": probes,
        "estimate_s": estimate,
        "elapsed_s": time.perf_counter() - started,
        "modes": modes,
    }
    write_json(out / f"{stem}.json", record)
    for journal in journals:
        journal.delete()
    print(outputs(record, out, default_dir))
    minutes = record["elapsed_s"] / 60
    log(f"wrote {out / stem}.json/.md/_*_curves.png in {minutes:.1f} min (estimate {estimate / 60:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
