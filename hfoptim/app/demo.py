"""The main job: a short pretraining run with memory-efficient optimizers next to AdamW.

    python -m hfoptim.app.demo        (what `make demo` runs: three runs of 240 steps, with progress bars;
                                       2-3 minutes on 2 CPU cores: 125-196 s on AMD EPYCs, 99-165 s on an Intel Xeon)

Every run trains the embedded default (a small Llama-style model on the Python standard
library's own source, a tokenizer trained on the spot; nothing is downloaded) from the same
initial weights on the same batches with the same schedule. The only difference is the
optimizer: torch's AdamW; ``adamw_8bit``, the same algorithm with its two moments kept in 8 bits
(a quarter of the state, the same loss); and ``ademamix_8bit``, AdEMAMix (Pagliardini et al.
2024, arXiv 2409.03137) in 8 bits, whose slow momentum (``beta3 = 0.999`` here, 0.9999 in the
paper) pays off over tens of thousands of steps, not the few hundred of a demo. The 8-bit state
runs on the compiled path (``compile="auto"``: inductor fuses each large tensor's step, and the
small matrices of the embedding's row length share its kernel; the first step compiles,
announced on the log). It prints a table (validation loss and perplexity,
optimizer-state bytes, step time, each run's wall time and its ratio to AdamW's), what the same
choice means for a 7B-parameter model, and writes into ``--output-dir`` (default ``outputs/demo``):

* ``loss_curves.png``: training and validation loss of both runs, and their state bytes;
* ``results.json``: every number in the table and the loss curves;
* ``<optimizer>/``: each trained model with its tokenizer (``from_pretrained`` loads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cli import parse_options
from ..console import format_bytes, print_table, progress, status
from ..memory import estimate, state_bytes
from ..models import LLAMA_2_7B, model_from_config, tiny_llama_config
from ..registry import get_optimizer, list_optimizers
from . import require
from .corpus import DEFAULT_MAX_BYTES, BlockDataset, corpus_token_ids, embedded_tokenizer, stdlib_corpus

#: the hfoptim optimizers the demo runs by default: the same algorithm as the baseline at a
#: quarter of the state, and AdEMAMix, an algorithm for long runs, in 8 bits
DEFAULT_OPTIMS = ("adamw_8bit", "ademamix_8bit")
#: the baseline: torch's own AdamW, what people use today
TORCH_ADAMW = "torch_adamw"
#: printed under the table when AdEMAMix runs
ADEMAMIX_NOTE = (
    "AdEMAMix adds a slow EMA of the gradient (beta3) to Adam's, warmed up with alpha and beta3 over the run. "
    "Its gains (Pagliardini et al. 2024, arXiv 2409.03137) come from remembering gradients over 10k+ steps; "
    "in a few hundred steps the slow EMA has barely started, so expect it at or behind AdamW here. "
    "The project's tuned study (BENCHMARKS.md, 'Training quality, each optimizer at its best learning rate': "
    "this model, 2000 steps, 3 seeds) found its best lr half of AdamW's (this demo runs both at AdamW's), and "
    "there ademamix_8bit ended 0.5% above AdamW, inside the seed spread, and adamw_8bit level with AdamW."
)


def default_optimizers() -> list[str]:
    """:data:`DEFAULT_OPTIMS` that this install has (``["adamw"]`` if none)."""
    names = set(list_optimizers())
    return [name for name in DEFAULT_OPTIMS if name in names] or ["adamw"]


@dataclass
class RunResult:
    optim: str
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    #: the whole run's training loop (every step, the first one's compilation and the evaluations)
    run_seconds: float = 0.0
    optimizer_seconds: list[float] = field(default_factory=list)
    state_bytes: int = 0
    num_params: int = 0
    saved_to: str = ""
    sample: str = ""

    @property
    def final_eval_loss(self) -> float:
        return self.eval_loss[-1]


def build_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """torch AdamW for the baseline; an hfoptim optimizer by name otherwise, with the same lr,
    decay and (for AdEMAMix) warm-ups of alpha and beta3 over the whole run."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == TORCH_ADAMW:
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), foreach=True)
    spec = get_optimizer(name)
    options = {"lr": args.lr}
    hyper = spec.rule.hyperparams
    if "betas" in hyper and len(hyper["betas"].default) == 2:
        options["betas"] = (0.9, 0.95)
    if "betas" in hyper and len(hyper["betas"].default) == 3:
        options["betas"] = (0.9, 0.95, 0.999)
    for warmup in ("t_alpha", "t_beta3"):
        if warmup in hyper:
            options[warmup] = float(args.steps)
    options.update(parse_options(args.optim_args))
    return spec(groups, **options)


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


def train_one(name: str, data: dict, args: argparse.Namespace) -> RunResult:
    torch.manual_seed(args.seed)
    model = model_from_config(data["config"])
    model.train()
    optimizer = build_optimizer(name, model, args)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, args.steps, warmup))
    result = RunResult(optim=name, num_params=sum(p.numel() for p in model.parameters()))
    train_blocks, order = data["train"], data["order"]
    run_start = time.perf_counter()
    for step in progress(range(args.steps), desc=f"{name:>16}"):
        idx = order[(step * args.batch_size) % len(order) :][: args.batch_size]
        if idx.numel() < args.batch_size:
            idx = order[: args.batch_size]
        batch = train_blocks[idx]
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_start = time.perf_counter()
        optimizer.step()
        opt_end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        result.step_seconds.append(opt_end - start)
        result.optimizer_seconds.append(opt_end - opt_start)
        result.steps.append(step + 1)
        result.train_loss.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            result.eval_steps.append(step + 1)
            result.eval_loss.append(evaluate(model, data["validation"], args.batch_size))
    result.run_seconds = time.perf_counter() - run_start
    result.state_bytes = state_bytes(optimizer).total
    out = Path(args.output_dir) / name
    model.save_pretrained(out)
    data["tokenizer"].save_pretrained(out)
    result.saved_to = str(out)
    result.sample = sample_text(model, data["tokenizer"])
    return result


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str = "def ", tokens: int = 32) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def prepare_data(args: argparse.Namespace) -> dict:
    with status("reading the standard library and training the tokenizer (cached after the first run)"):
        corpus = stdlib_corpus(args.max_bytes)
        tokenizer = embedded_tokenizer(corpus=corpus)
        train_ids = corpus_token_ids(tokenizer, "train", corpus)
        val_ids = corpus_token_ids(tokenizer, "validation", corpus)
    train = BlockDataset(train_ids, args.block_size).blocks
    validation = BlockDataset(val_ids, args.block_size, max_blocks=args.eval_blocks).blocks
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(train.shape[0], generator=generator)
    config = tiny_llama_config(tokenizer=tokenizer, max_position_embeddings=max(512, args.block_size))
    print(
        f"data: {len(corpus.train_files)} train / {len(corpus.validation_files)} validation files from "
        f"{corpus.root}; {train_ids.numel():,} train tokens, {validation.numel():,} validation tokens "
        f"(vocabulary {len(tokenizer)})",
        file=sys.stderr,
    )
    return {
        "corpus": corpus,
        "tokenizer": tokenizer,
        "train": train,
        "validation": validation,
        "order": order,
        "config": config,
    }


def at_scale(names: list[str]) -> list[list[str]]:
    """State bytes of each optimizer for Llama-2-7B shapes (meta device, nothing allocated)."""
    from transformers import LlamaConfig

    model = model_from_config(LlamaConfig(**LLAMA_2_7B), device="meta")
    params = list(model.parameters())
    rows = []
    for name in names:
        hf_name = "adamw" if name == TORCH_ADAMW else name
        rows.append([name, format_bytes(estimate(params, hf_name).total)])
    return rows


def plot(results: list[RunResult], path: Path) -> None:
    matplotlib = require("matplotlib", "the demo's loss-curve plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"]
    for color, r in zip(colors, results):
        smooth, ema = [], None
        for v in r.train_loss:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        ax.plot(r.steps, smooth, color=color, label=f"{r.optim} train (EMA 0.9)")
        ax.plot(r.eval_steps, r.eval_loss, "o--", color=color, markersize=4, label=f"{r.optim} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("tiny-llama on Python stdlib source")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = [r.optim for r in results]
    per_param = [r.state_bytes / r.num_params for r in results]
    bars = bx.bar(names, per_param, color=colors[: len(results)])
    bx.bar_label(bars, fmt="%.2f")
    bx.set_ylabel("optimizer-state bytes per parameter")
    bx.set_title("optimizer state")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hfoptim.app.demo",
        description="Pretrain the embedded tiny Llama on Python stdlib source with a memory-efficient optimizer "
        "and with torch AdamW; print a comparison table and write a loss-curve plot.",
    )
    parser.add_argument(
        "--optim", default=None, help=f"hfoptim optimizers, comma-separated (default: {','.join(DEFAULT_OPTIMS)})"
    )
    parser.add_argument(
        "--optim-args", default=None, metavar="K=V,...", help="options of the hfoptim optimizers, e.g. 'compile=off'"
    )
    parser.add_argument("--baseline", default=TORCH_ADAMW, help="compared with (default: torch_adamw, torch's AdamW)")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks evaluated (default 64)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="stdlib text cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--no-scale", action="store_true", help="skip the 7B-parameter extrapolation")
    return parser


def quiet_unused_imports() -> None:
    """Keep the warnings of libraries the demo does not use out of its output: transformers
    imports torchao whenever it is installed (the kit's ``dev`` extra has it, for the
    benchmarks), and on a machine without CUDA torchao warns that its CUDA kernels do not load
    and torch that torchao registers its enums the old way."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_unused_imports()
    if args.steps < 1 or args.eval_every < 1:
        raise SystemExit("--steps and --eval-every must be positive")
    optims = args.optim.split(",") if args.optim else default_optimizers()
    names = list(dict.fromkeys([args.baseline, *optims]))
    started = time.perf_counter()
    data = prepare_data(args)
    results = [train_one(name, data, args) for name in names]

    base = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                r.optim,
                f"{r.final_eval_loss:.4f}",
                f"{math.exp(r.final_eval_loss):.2f}",
                format_bytes(r.state_bytes),
                f"{r.state_bytes / r.num_params:.2f}",
                f"{r.state_bytes / base.state_bytes:.0%}",
                f"{1000 * statistics.median(r.step_seconds):.0f}",
                f"{1000 * statistics.median(r.optimizer_seconds):.1f}",
                f"{r.run_seconds:.1f} ({r.run_seconds / base.run_seconds:.2f}x)",
            ]
        )
    print_table(
        [
            "optimizer",
            "val loss",
            "val ppl",
            "state",
            "state B/param",
            f"vs {base.optim}",
            "step ms",
            "opt.step ms",
            "run s",
        ],
        rows,
        title=f"{args.steps} steps of tiny-llama ({base.num_params / 1e6:.2f} M params) on Python stdlib source",
        caption="step ms: median forward+backward+optimizer step; opt.step ms: median optimizer step alone; "
        "run s: the whole training loop (the first step's compilation and the evaluations included) "
        f"and its ratio to {base.optim}'s",
    )
    if any(name.startswith("ademamix") for name in names):
        print(ADEMAMIX_NOTE)
    scale_rows = [] if args.no_scale else at_scale(names)
    if scale_rows:
        print_table(["optimizer", "state"], scale_rows, title="the same optimizers for Llama-2-7B shapes")
    out = Path(args.output_dir)
    png = out / "loss_curves.png"
    plot(results, png)
    record = {
        "args": vars(args),
        "elapsed_seconds": time.perf_counter() - started,
        "runs": [
            {
                **asdict(r),
                "final_eval_loss": r.final_eval_loss,
                "final_eval_perplexity": math.exp(r.final_eval_loss),
                "state_bytes_per_param": r.state_bytes / r.num_params,
                "median_step_seconds": statistics.median(r.step_seconds),
                "median_optimizer_seconds": statistics.median(r.optimizer_seconds),
            }
            for r in results
        ],
        "llama_7b_state": dict(scale_rows),
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    for r in results:
        print(f"{r.optim}: model saved to {r.saved_to}; greedy sample: {r.sample[:80]!r}")
    print(f"plot: {png}\nnumbers: {out / 'results.json'}\ntook {record['elapsed_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
