"""Training quality: AdamW, AdEMAMix and Adan, dense and with 8-bit, factored and SMMF state.

    python benchmarks/quality.py            # 14 optimizers x 3 seeds (about 15 minutes on 2 quiet cores)
    python benchmarks/quality.py --quick    # a smoke run: 3 optimizers, 1 seed, 20 steps
    python benchmarks/quality.py --long     # SMMF and shared v against their twins, 600 steps (about 20 minutes)
    python benchmarks/quality.py --study    # each optimizer at its own best lr, 2000 steps, 3 seeds (see below)
    python benchmarks/quality.py --study --tables-only   # the study's tables and plot again, from its results
    python benchmarks/quality.py --finetune # the same protocol for fine-tuning, full and LoRA (``_finetune.py``)
    python benchmarks/quality.py --preset muon   # Muon against AdamW (results/quality_muon.*)
    python benchmarks/quality.py --preset 4bit   # the 4-bit forms, torchao's AdamW4bit, fp32 twins (quality_4bit.*)
    python benchmarks/quality.py --preset 4bit --merge --names "torchao AdamW4bit"  # add one name's runs
    python benchmarks/quality.py --preset muon --tables-only   # a preset's tables and plot again, from its results

``--preset`` (not part of ``make bench``): a fixed list (:data:`PRESETS`) on the protocol below,
its own results files and BENCHMARKS.md section (``quality-<preset>``). Muon runs with the roles
``create_optimizer(model, "muon")`` picks (:func:`muon_groups`) at the one peak lr: its default
``match_rms_adamw`` scale is there so that AdamW's lr and weight decay carry over. torchao's
AdamW4bit runs with its defaults and AdamW's betas.

``--combine a.json b.json --stem quality_issue16``: no training, the tables and plot from results
files of one protocol split by seed (runs side by side).

``--study`` (not part of ``make bench``): the tuned protocol of ``_study.py`` -- a sweep of four
peak learning rates spanning 10x around each optimizer's own centre (``study.CENTRES``) for
``--sweep-steps`` (default a quarter of ``--steps``), then ``--seeds`` at the best lr for
``--steps`` (default 2000, 10x the default budget); the same data, model, schedule and settings as
below otherwise. The list (:data:`STUDY_NAMES`) takes the rules a user would try for LLMs and the
8-bit and factored forms of AdamW and AdEMAMix; names not in the registry at run time are skipped
with a note. It prints the wall-time estimate (a short timed run x steps x runs / workers) first.
Writes ``results/quality_study.json`` (every run: phase, lr, seed, curve; the machine and commit),
``.md`` and ``_curves.png``, and the ``quality-study`` section of BENCHMARKS.md; ``--smoke`` runs
2 lrs, 1 seed and a few steps into ``quality_study_smoke.*``. Each finished run is journaled in
``results/quality_study.journal.jsonl`` until the results are written: after an interruption the
same command resumes from it.

The embedded default: the tiny Llama-style causal LM (``hfoptim.models.tiny_llama_config``, about
1M parameters) pretrained from scratch on the Python standard library's source with the embedded
BPE tokenizer (``hfoptim.app.corpus``);
validation on held-out files. Every optimizer gets the same fixed token budget (steps x batch x
block), the same initial weights and batch order for a given seed, the same schedule (linear
warm-up over 10% of the steps, cosine to 10% of the peak), gradient clipping at 1.0, weight
decay 0.1 on matrices and none on norms, one peak learning rate for all (``--lr``, 1.5e-3: of
AdamW's 1.5e-3, 3e-3, 5e-3, 1e-2 and 2e-2 the best final loss with the smallest seed spread --
at 3e-3 and above the final loss of AdamW and AdEMAMix spreads over 0.25-0.6 nats between seeds,
more than the differences this benchmark looks for), betas
(0.9, 0.95) for AdamW and (0.9, 0.95, 0.999) for AdEMAMix with its alpha and beta3 warm-ups
over the whole run; Adan keeps its own betas (0.98, 0.92, 0.99) and proximal decay. The peer
is bitsandbytes' AdEMAMix8bit with AdEMAMix's settings. hfoptim's 8-bit runs take the plain
path (``compile="off"``: the compiled path computes the same formulas up to rounding, and its
compile time would dominate runs this short).

Reported: final validation loss (mean, standard deviation and range over seeds), the paired
difference to AdamW, the step at which each run first reaches AdamW's final validation loss of
the same seed (linear interpolation between evaluations), and state bytes per parameter.

Writes ``results/quality.json``, ``results/quality.md`` and ``results/quality_curves.png``
(``quality_quick.*`` with ``--quick``). Runs are spread over ``--workers`` processes of one
torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _study as study  # noqa: E402
from _timing import RESULTS_DIR, library_versions, machine_info, machine_line, update_report, write_json  # noqa: E402

BNB_ADEMAMIX8 = "bitsandbytes AdEMAMix8bit"
TORCHAO_ADAMW4 = "torchao AdamW4bit"
FAMILIES = {"adamw": "AdamW", "ademamix": "AdEMAMix", "adan": "Adan"}
FORMS = ("", "_8bit", "_factored", "_smmf")
#: the shared second moment (Adam-mini style) only on AdamW, where it comes from
DEFAULT_NAMES = [f"{base}{form}" for base in FAMILIES for form in FORMS] + ["adamw_shared", BNB_ADEMAMIX8]
QUICK_NAMES = ["adamw", "ademamix_8bit", BNB_ADEMAMIX8]
#: --long: the forms that lag early (SMMF, shared v) against their fp32 twins, three times the budget
LONG_NAMES = ["adamw", "adamw_smmf", "adamw_shared", "ademamix", "ademamix_smmf", "adan", "adan_smmf"]
LONG_STEPS = 600
#: --study: every optimizer with a sweep centre (the ones not registered yet are skipped at run time) but
#: the 4-bit form, which ``--preset 4bit`` measures against its fp32 twins
STUDY_NAMES = [name for name in study.CENTRES if not name.endswith("_4bit")]
STUDY_STEPS = 2000
#: --preset: separate runs with their own results files (``results/<stem>.*``) and BENCHMARKS.md section
PRESETS = {
    "muon": {
        "names": ["adamw", "muon"],
        "stem": "quality_muon",
        "title": "Muon against AdamW",
    },
    "4bit": {
        "names": ["adamw", "adamw_4bit", TORCHAO_ADAMW4, "ademamix", "ademamix_4bit"],
        "stem": "quality_4bit",
        "title": "4-bit state against its fp32 twins",
    },
}
#: how close a storage form must end to its fp32 twin (relative final validation loss, issue 3)
BARS = {"_8bit": 0.01, "_4bit": 0.01, "_bf16": 0.01, "_factored": 0.03, "_smmf": 0.03, "_shared": 0.03}


#: peers with a compressed state and the fp32 run they are measured against (with its bar)
PEER_TWINS = {TORCHAO_ADAMW4: ("adamw", 0.01)}


def twin_of(name: str) -> tuple[str, float] | None:
    """``(fp32 twin, bar)`` for an hfoptim storage-form name (``ademamix_smmf`` -> ``ademamix``)
    or a peer of :data:`PEER_TWINS`."""
    if name in PEER_TWINS:
        return PEER_TWINS[name]
    for form, bar in BARS.items():
        if name.endswith(form):
            return name.removesuffix(form), bar
    return None


@dataclass
class Run:
    name: str
    seed: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    state_bytes: int = 0
    num_params: int = 0
    seconds: float = 0.0
    error: str | None = None


# ---------------------------------------------------------------------------------------- data
def prepare_data(block_size: int, eval_blocks: int) -> dict:
    from hfoptim.app.corpus import BlockDataset, corpus_token_ids, embedded_tokenizer, stdlib_corpus
    from hfoptim.models import tiny_llama_config

    corpus = stdlib_corpus()
    tokenizer = embedded_tokenizer(corpus=corpus)
    train_ids = corpus_token_ids(tokenizer, "train", corpus)
    val_ids = corpus_token_ids(tokenizer, "validation", corpus)
    return {
        "train": BlockDataset(train_ids, block_size).blocks,
        "validation": BlockDataset(val_ids, block_size, max_blocks=eval_blocks).blocks,
        "config": tiny_llama_config(tokenizer=tokenizer, max_position_embeddings=max(512, block_size)),
        "describe": (
            f"{len(corpus.train_files)} train / {len(corpus.validation_files)} validation files of the Python "
            f"standard library, {train_ids.numel():,} train tokens, vocabulary {len(tokenizer)}"
        ),
    }


# ---------------------------------------------------------------------------------------- optimizers
def build_optimizer(name: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    strength = args.weight_decay
    if name not in (BNB_ADEMAMIX8, TORCHAO_ADAMW4):
        from hfoptim.registry import get_optimizer

        # a name that sets its own strength (adams: stable decay 1e-4, 1000x below AdamW's 0.1 because it
        # is divided by sqrt(mean v_hat)) keeps it: the shared 0.1 would decay its matrices away
        strength = get_optimizer(name).options.get("weight_decay", strength)
    groups = [{"params": decay, "weight_decay": strength}, {"params": no_decay, "weight_decay": 0.0}]
    if name == TORCHAO_ADAMW4:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.optim import AdamW4bit

        return AdamW4bit(groups, lr=args.lr, betas=(0.9, 0.95))
    if name == BNB_ADEMAMIX8:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb

        return bnb.optim.AdEMAMix8bit(
            groups, lr=args.lr, betas=(0.9, 0.95, 0.999), t_alpha=args.steps, t_beta3=args.steps
        )
    from hfoptim.registry import get_optimizer

    spec = get_optimizer(name)
    options: dict = {"lr": args.lr}
    if spec.rule.name == "muon":
        groups = muon_groups(model, args.weight_decay)
    if spec.rule.name == "adamw":
        options["betas"] = (0.9, 0.95)
    elif spec.rule.name == "ademamix":
        options.update(betas=(0.9, 0.95, 0.999), t_alpha=args.steps, t_beta3=args.steps)
    if spec.options.get("state") in ("8bit", "4bit", "bf16"):
        options["compile"] = "off"
    return spec(groups, **options)


def muon_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Muon's groups for the quality model: hidden matrices Muon, the (tied) embedding AdamW, both
    with ``weight_decay``; norms AdamW without decay -- the roles of :mod:`hfoptim.roles` (what
    ``create_optimizer(model, "muon")`` and the Trainer choose) and the decay split of the other runs."""
    from hfoptim.roles import muon_options

    algorithm = {name: o["algorithm"] for name, o in muon_options(model).items()}
    groups = []
    # by role, then matrices (decayed) apart from vectors (not): with ``weight_decay=0`` (the
    # fine-tuning study) the split must still be by shape, and only trainable parameters count
    # (LoRA freezes the base)
    for kind in ("muon", "adamw"):
        for matrices in (True, False):
            params = [
                p
                for name, p in model.named_parameters()
                if p.requires_grad and algorithm.get(name) == kind and (p.dim() >= 2) == matrices
            ]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if matrices else 0.0, "algorithm": kind})
    return groups


def state_bytes(optimizer) -> int:
    from memory import hfoptim_state_bytes, peer_state_bytes

    if getattr(optimizer, "rule", None) is not None:
        return hfoptim_state_bytes(optimizer)[0]
    return peer_state_bytes(optimizer)


# ---------------------------------------------------------------------------------------- training
def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def block_batch(blocks: torch.Tensor, order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
    """The blocks of ``step``: the next ``batch_size`` of the seed's shuffled ``order``, cycling;
    a tail shorter than a batch is replaced by the first batch of the order."""
    idx = order[(step * batch_size) % len(order) :][:batch_size]
    return blocks[idx if idx.numel() == batch_size else order[:batch_size]]


def train_steps(model, optimizer, steps: int, batch_at, after_step) -> None:
    """The training loop of the quality benchmarks (pretraining and fine-tuning): for each step,
    forward and backward on ``batch_at(step)`` (the model's keyword arguments), gradients of the
    trainable parameters clipped to norm 1, the optimizer step and the schedule (:func:`lr_factor`,
    warm-up over the first 10% of ``steps``); then ``after_step(step + 1, loss)``."""
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(steps):
        loss = model(**batch_at(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        after_step(step + 1, loss.item())


def recorder(run: Run, steps: int, evals: int, evaluate_now):
    """The ``after_step`` of a benchmark run: every training loss into ``run`` (a non-finite one
    ends the run), and ``evaluate_now()`` ``evals`` times, at the last step included."""
    eval_every = max(1, steps // evals)

    def after_step(step: int, loss: float) -> None:
        run.steps.append(step)
        run.train_loss.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}")
        if step % eval_every == 0 or step == steps:
            run.eval_steps.append(step)
            run.eval_loss.append(evaluate_now())

    return after_step


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
    model.train()
    return total / blocks.shape[0]


_DATA: dict = {}


def _init_worker(data: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    _DATA.update(data)
    warnings.filterwarnings("ignore")


def train_one(name: str, seed: int, args) -> Run:
    from hfoptim.models import model_from_config

    data = _DATA
    run = Run(name, seed)
    start = time.perf_counter()
    try:
        torch.manual_seed(seed)
        model = model_from_config(data["config"])
        model.train()
        run.num_params = sum(p.numel() for p in model.parameters())
        optimizer = build_optimizer(name, model, args)
        train = data["train"]
        order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))

        def batch_at(step: int) -> dict:
            batch = block_batch(train, order, step, args.batch_size)
            return {"input_ids": batch, "labels": batch}

        def evaluate_now() -> float:
            return evaluate(model, data["validation"], args.batch_size * 4)

        train_steps(model, optimizer, args.steps, batch_at, recorder(run, args.steps, args.evals, evaluate_now))
        run.state_bytes = state_bytes(optimizer)
    except Exception as error:
        run.error = f"{type(error).__name__}: {error}"
    run.seconds = time.perf_counter() - start
    return run


# ---------------------------------------------------------------------------------------- analysis
def first_reach(run: Run, target: float) -> float | None:
    """The (interpolated) step at which the validation loss first reaches ``target``."""
    prev_step, prev_loss = 0, None
    for step, loss in zip(run.eval_steps, run.eval_loss):
        if loss <= target:
            if prev_loss is None or prev_loss == loss:
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def summarize(runs: list[Run], names: list[str]) -> list[dict]:
    base = {r.seed: r for r in runs if r.name == "adamw" and r.error is None}
    out = []
    for name in names:
        mine = [r for r in runs if r.name == name]
        ok = [r for r in mine if r.error is None]
        row: dict = {"name": name, "seeds": len(mine), "failed": [r.error for r in mine if r.error]}
        if ok:
            finals = [r.eval_loss[-1] for r in ok]
            row.update(
                final_mean=statistics.fmean(finals),
                final_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                final_min=min(finals),
                final_max=max(finals),
                bytes_per_param=ok[0].state_bytes / ok[0].num_params,
                seconds_per_run=statistics.fmean(r.seconds for r in ok),
            )
            diffs = [r.eval_loss[-1] - base[r.seed].eval_loss[-1] for r in ok if r.seed in base]
            if diffs:
                row["diff_vs_adamw_mean"] = statistics.fmean(diffs)
                row["diff_vs_adamw_range"] = (min(diffs), max(diffs))
            reached = [first_reach(r, base[r.seed].eval_loss[-1]) for r in ok if r.seed in base]
            row["steps_to_adamw_final"] = reached
            twin = twin_of(name)
            twins = {r.seed: r for r in runs if twin and r.name == twin[0] and r.error is None}
            relative = [r.eval_loss[-1] / twins[r.seed].eval_loss[-1] - 1 for r in ok if r.seed in twins]
            if relative:
                row.update(twin=twin[0], bar=twin[1], vs_twin=statistics.fmean(relative))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------- output
def markdown(record: dict, level: int = 1, plot_path: str | None = None) -> str:
    a = record["args"]
    tokens = a["steps"] * a["batch_size"] * a["block_size"]
    title = PRESETS[a["preset"]]["title"] + ", " if a.get("preset") else ""
    lines = [
        f"{'#' * level} {title}Training quality on the embedded default"
        + (f", {a['steps']} steps" if a.get("long") else ""),
        "",
        f"Machine: {machine_line(record['machine'])}.",
        f"Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min, {a['workers']} worker processes)"
        + merged_note(record)
        + ".",
        f"Data: {record['data']}. Model: tiny Llama, {record['num_params'] / 1e6:.2f}M parameters.",
        f"Budget: {a['steps']} steps x {a['batch_size']} x {a['block_size']} tokens = {tokens:,} tokens per run; "
        f"peak lr {a['lr']}; seeds {', '.join(map(str, record['seeds']))}; validation loss on "
        f"{record['eval_tokens']:,} held-out tokens every {max(1, a['steps'] // a['evals'])} steps.",
        "",
        "| optimizer | state B/param | final val loss (mean +- std) | range over seeds | vs AdamW (paired) "
        "| steps to AdamW's final loss | vs fp32 twin (paired) |",
        "|---|---:|---:|---|---:|---|---|",
    ]
    for row in record["summary"]:
        if "final_mean" not in row:
            lines.append(f"| {row['name']} | failed: {'; '.join(row['failed'])[:200]} | | | | | |")
            continue
        reached = row["steps_to_adamw_final"]
        hits = [x for x in reached if x is not None]
        if row["name"] == "adamw":
            reach = f"{a['steps']} (reference)"
        elif hits:
            reach = f"{statistics.fmean(hits):.0f} ({len(hits)}/{len(reached)} seeds reach it)"
        else:
            reach = f"not reached (0/{len(reached)})"
        diff = row.get("diff_vs_adamw_mean")
        failed = f" ({len(row['failed'])} failed)" if row["failed"] else ""
        mean_std = f"{row['final_mean']:.4f} +- {row['final_std']:.4f}"
        spread = f"{row['final_min']:.4f}-{row['final_max']:.4f}"
        diff_text = "" if diff is None else f"{diff:+.4f}"
        twin = ""
        if "vs_twin" in row:
            verdict = "within" if row["vs_twin"] <= row["bar"] else "OVER"
            twin = f"{100 * row['vs_twin']:+.1f}% ({verdict} the {100 * row['bar']:.0f}% bar)"
        lines.append(
            f"| {row['name']}{failed} | {row['bytes_per_param']:.2f} | {mean_std} | {spread} | {diff_text} | {reach} "
            f"| {twin} |"
        )
    if plot_path:
        lines += ["", f"![validation loss curves]({plot_path})"]
    return "\n".join(lines) + "\n"


def merged_note(record: dict) -> str:
    """Where the runs not trained by this command came from (``--merge``), commands oldest first."""
    notes, earlier = [], record.get("merged_into")
    while earlier:
        machine = earlier.get("machine") or {}
        notes.append(
            f"`{earlier['command']}` ({earlier.get('elapsed_s', 0) / 60:.1f} min, hfoptim "
            f"{machine.get('git_commit', '?')}, load average {(machine.get('load_average_1_5_15') or ['?'])[0]})"
        )
        earlier = earlier.get("merged_into")
    if not notes:
        return ""
    retrained = ", ".join(record["args"]["names"])
    return f"; it trained {retrained}, the other runs are from " + " and ".join(reversed(notes))


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Run(**r) for r in record["runs"] if r["error"] is None]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    styles = {"": ("-", "tab:blue"), "_8bit": ("--", "tab:orange"), "_factored": ("-.", "tab:green")}
    styles["_smmf"] = (":", "tab:red")
    styles["_shared"] = ((0, (1, 1)), "tab:brown")
    styles["_4bit"] = ((0, (3, 1)), "tab:olive")
    peers = {
        BNB_ADEMAMIX8: ("ademamix", (0, (5, 1, 1, 1)), "tab:purple"),
        TORCHAO_ADAMW4: ("adamw", "-.", "tab:purple"),
    }
    names = [r["name"] for r in record["summary"]]
    families = {**FAMILIES, "muon": "Muon"}
    present = [b for b in families if b in names or any(n.startswith(b + "_") for n in names)]
    for ax in axes.flat[len(present) : 3]:
        ax.set_axis_off()
    for ax, base in zip(axes.flat, present[:3]):
        title = families[base]
        members = [n for n in names if n == base or (n.startswith(base + "_") and n.removeprefix(base) in styles)]
        members += [n for n in names if n in peers and peers[n][0] == base]
        if base != "adamw" and "adamw" in names:
            members.insert(0, "adamw")
        for name in members:
            mine = [r for r in runs if r.name == name]
            if not mine:
                continue
            steps = mine[0].eval_steps
            curves = [r.eval_loss for r in mine if r.eval_steps == steps]
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
            lo = [min(c[i] for c in curves) for i in range(len(steps))]
            hi = [max(c[i] for c in curves) for i in range(len(steps))]
            if name == "adamw" and base != "adamw":
                style, color = "-", "black"
            elif name in peers:
                _, style, color = peers[name]
            else:
                style, color = styles[name.removeprefix(base)]
            ax.plot(steps, mean, linestyle=style, color=color, label=name, linewidth=1.4)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.12)
        ax.set_title(f"{title} family: validation loss (band: min-max over seeds)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("validation cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        tail = [r.eval_loss[-1] for r in runs if r.name in members]
        if tail:  # zoom on the second half, where the curves separate
            top = max(max(r.eval_loss[len(r.eval_loss) // 3 :]) for r in runs if r.name in members)
            ax.set_ylim(min(tail) - 0.05, top + 0.05)
    ax = axes.flat[3]
    rows = [r for r in record["summary"] if "final_mean" in r]
    ys = range(len(rows))
    ax.barh(
        list(ys),
        [r["final_mean"] for r in rows],
        xerr=[[r["final_mean"] - r["final_min"] for r in rows], [r["final_max"] - r["final_mean"] for r in rows]],
        color=["tab:gray" if r["name"] == "adamw" else "tab:blue" for r in rows],
    )
    ax.set_yticks(list(ys), [f"{r['name']} ({r['bytes_per_param']:.2f} B/p)" for r in rows], fontsize=8)
    ax.invert_yaxis()
    if rows:
        lo = min(r["final_min"] for r in rows)
        hi = max(r["final_max"] for r in rows)
        ax.set_xlim(lo - 0.1 * (hi - lo) - 0.01, hi + 0.1 * (hi - lo) + 0.01)
    ax.set_xlabel("final validation loss (mean, min-max over seeds)")
    ax.set_title("final validation loss and state bytes/param")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 optimizers, 1 seed, 20 steps")
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"the SMMF and shared forms against their fp32 twins over {LONG_STEPS} steps (quality_long.*)",
    )
    parser.add_argument("--names", nargs="+", help=f"optimizers (default: {' '.join(DEFAULT_NAMES)})")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a separate comparison with its own results (results/quality_<preset>.*) and BENCHMARKS.md section: "
        + "; ".join(f"{k}: {' '.join(v['names'])}" for k, v in PRESETS.items()),
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --preset and --names: train only those names and add their runs to the preset's results "
        "file (replacing earlier runs of the same names), paired with its AdamW runs",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--study", action="store_true", help="each optimizer at its own best lr (quality_study.*)")
    parser.add_argument("--finetune", action="store_true", help="the fine-tuning study (_finetune.py; its own options)")
    study.add_arguments(parser)
    parser.add_argument("--steps", type=int, help=f"default 200, {STUDY_STEPS} with --study")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate for every optimizer")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--evals", type=int, help="validation evaluations per run (default 10, 20 with --study)")
    parser.add_argument("--eval-blocks", type=int, default=48)
    parser.add_argument(
        "--workers", type=int, default=2, help="parallel processes, one torch thread each (0: in this process)"
    )
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="no training: the tables and plot from these results files (one, or runs of the same protocol "
        "split by seed, e.g. --seeds 0 / 1 / 2 run side by side), written as --stem in --output-dir",
    )
    parser.add_argument("--stem", default="quality", help="file name stem for --combine (default quality)")
    return parser


def merge_main(args) -> int:
    """Rebuild one record from results files of the same protocol (runs concatenated, the summary
    recomputed) and write its json, tables and plot."""
    records = [json.loads(Path(f).read_text()) for f in args.combine]
    first = records[0]
    keys = ("steps", "batch_size", "block_size", "lr", "weight_decay", "evals", "eval_blocks")
    for other in records[1:]:
        if any(other["args"][k] != first["args"][k] for k in keys) or other["data"] != first["data"]:
            raise SystemExit(f"--combine: {keys} and the data must be the same in every file")
    runs = [Run(**r) for rec in records for r in rec["runs"]]
    names = list(dict.fromkeys(r.name for r in runs))
    names = ["adamw", *(n for n in names if n != "adamw")]
    record = dict(first)
    record.update(
        command=" ; ".join(dict.fromkeys(rec["command"] for rec in records)),
        seeds=sorted({s for rec in records for s in rec["seeds"]}),
        elapsed_s=max(rec["elapsed_s"] for rec in records),
        summary=summarize(runs, names),
        runs=[asdict(r) for r in runs],
        merged_from=[str(f) for f in args.combine],
    )
    out = Path(args.output_dir)
    write_json(out / f"{args.stem}.json", record)
    png = out / f"{args.stem}_curves.png"
    plot(record, png)
    text = markdown(record, plot_path=png.name)
    (out / f"{args.stem}.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--finetune" in argv:  # its own script and options (a separate file keeps it out of make bench)
        script = Path(__file__).resolve().with_name("_finetune.py")
        return subprocess.call([sys.executable, str(script), *(a for a in argv if a != "--finetune")])
    args = build_parser().parse_args(argv)
    if args.combine:
        return merge_main(args)
    if args.preset and (args.study or args.smoke or args.long or args.quick):
        raise SystemExit("--preset chooses its own names and budget: drop --study/--smoke/--long/--quick")
    if args.names and args.preset and not args.merge:
        raise SystemExit("--preset chooses its own names; --names with --preset needs --merge (add those runs)")
    if args.merge and not (args.preset and args.names):
        raise SystemExit("--merge adds the runs of --names to a --preset's results file: give both")
    if args.study or args.smoke or (args.tables_only and not args.preset):
        return study_main(args, argv)
    if args.tables_only:
        return preset_tables(args.preset, Path(args.output_dir))
    args.steps, args.evals = args.steps or 200, args.evals or 10
    if args.quick:
        args.seeds, args.steps, args.evals = args.seeds[:1], 20, 4
    if args.long:
        args.steps = LONG_STEPS
    names = args.names or (QUICK_NAMES if args.quick else LONG_NAMES if args.long else DEFAULT_NAMES)
    earlier = None
    if args.merge:
        earlier = merge_base(args, Path(args.output_dir))
    elif args.preset:
        names = PRESETS[args.preset]["names"]
    if "adamw" not in names and earlier is None:
        names = ["adamw", *names]
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    data = prepare_data(args.block_size, args.eval_blocks)
    log(f"data: {data['describe']}")
    jobs = [(name, seed) for seed in args.seeds for name in names]
    runs: list[Run] = []
    with ProcessPoolExecutor(
        max_workers=max(1, args.workers),
        mp_context=__import__("multiprocessing").get_context("spawn"),
        initializer=_init_worker,
        initargs=(data, 1),
    ) as pool:
        futures = [pool.submit(train_one, name, seed, args) for name, seed in jobs]
        for i, future in enumerate(futures, 1):
            run = future.result()
            runs.append(run)
            status = run.error or f"final val loss {run.eval_loss[-1]:.4f}"
            log(f"[{i}/{len(jobs)}] {run.name} seed {run.seed}: {status} ({run.seconds:.0f} s)")

    command = shlex.join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    if earlier is not None:  # --merge: the earlier runs of other names, then these
        keep = [Run(**r) for r in earlier["runs"] if r["name"] not in names]
        runs = keep + runs
        names = [n for n in PRESETS[args.preset]["names"] if any(r.name == n for r in runs)]
        names += [n for n in dict.fromkeys(r.name for r in runs) if n not in names]
    record = {
        "machine": machine_info(),
        "libraries": library_versions(),
        "command": command.strip(),
        "args": vars(args),
        "seeds": args.seeds,
        "data": data["describe"],
        "num_params": next((r.num_params for r in runs if r.num_params), 0),
        "eval_tokens": int(data["validation"].numel()),
        "elapsed_s": time.perf_counter() - started,
        "summary": summarize(runs, names),
        "runs": [asdict(r) for r in runs],
    }
    if earlier is not None:
        record["merged_into"] = {
            k: earlier.get(k) for k in ("command", "machine", "elapsed_s", "merged_into") if k in earlier
        }
    out = Path(args.output_dir)
    if args.preset:
        write_json(out / f"{PRESETS[args.preset]['stem']}.json", record)
        return preset_tables(args.preset, out, log)
    stem = "quality_quick" if args.quick else "quality_long" if args.long else "quality"
    write_json(out / f"{stem}.json", record)
    png = out / f"{stem}_curves.png"
    plot(record, png)
    text = markdown(record, plot_path=png.name)
    (out / f"{stem}.md").write_text(text)
    if not args.quick and not args.long and not args.names and out.resolve() == RESULTS_DIR.resolve():
        if update_report("quality", markdown(record, level=3, plot_path=f"benchmarks/results/{png.name}")):
            log("updated the quality section of BENCHMARKS.md")
    print(text)
    log(f"wrote {out / stem}.json/.md/_curves.png in {record['elapsed_s'] / 60:.1f} min")
    return 0


def merge_base(args, out: Path) -> dict:
    """``--merge``: the preset's earlier results, which must hold AdamW's run of every seed (the
    paired reference; runs are deterministic per seed, so the earlier AdamW runs are this
    commit's when the training code is unchanged) and the same budget."""
    path = out / f"{PRESETS[args.preset]['stem']}.json"
    if not path.exists():
        raise SystemExit(f"--merge: no {path} to add to; run --preset {args.preset} first")
    earlier = json.loads(path.read_text())
    have = {r["seed"] for r in earlier["runs"] if r["name"] == "adamw" and not r["error"]}
    if not set(args.seeds) <= have:
        raise SystemExit(f"--merge: {path} has AdamW runs for seeds {sorted(have)}, not {args.seeds}")
    budget = ("steps", "batch_size", "block_size", "lr", "weight_decay", "evals", "eval_blocks")
    differs = [k for k in budget if earlier["args"].get(k) != getattr(args, k)]
    if differs:
        raise SystemExit(f"--merge: {path} was run with other {', '.join(differs)}; use the same budget")
    return earlier


def preset_tables(preset: str, out: Path, log=None) -> int:
    """A preset's ``.md``, plot and BENCHMARKS.md section (``quality-<preset>``), from its results
    file alone (``--preset X --tables-only`` rewrites them without training)."""
    stem = PRESETS[preset]["stem"]
    record = json.loads((out / f"{stem}.json").read_text())
    # the summary again from the runs (what the analysis says today, e.g. a twin added since)
    record["summary"] = summarize([Run(**r) for r in record["runs"]], [row["name"] for row in record["summary"]])
    write_json(out / f"{stem}.json", record)
    png = out / f"{stem}_curves.png"
    plot(record, png)
    text = markdown(record, plot_path=png.name)
    (out / f"{stem}.md").write_text(text)
    if out.resolve() == RESULTS_DIR.resolve():
        if update_report(f"quality-{preset}", markdown(record, level=4, plot_path=f"benchmarks/results/{png.name}")):
            print(f"updated the quality-{preset} section of BENCHMARKS.md", file=sys.stderr)
    print(text)
    if log:
        log(f"wrote {out / stem}.json/.md/_curves.png in {record['elapsed_s'] / 60:.1f} min")
    return 0


# ---------------------------------------------------------------------------------------- --study
def train_record(name: str, seed: int, args) -> dict:
    """:func:`train_one` as a plain dict (the study's run records)."""
    return asdict(train_one(name, seed, args))


def add_twins(rows: list[dict], runs: list[dict]) -> None:
    """Each storage form's paired relative difference to its fp32 twin, both at their best lr."""
    finals = {(r["name"], r["seed"]): r["eval_loss"][-1] for r in runs if r["phase"] == "seed" and not r["error"]}
    for row in rows:
        twin = twin_of(row["name"])
        if twin is None:
            continue
        pairs = [
            (v, finals[(twin[0], s)]) for (n, s), v in finals.items() if n == row["name"] and (twin[0], s) in finals
        ]
        if pairs:
            row.update(twin=twin[0], bar=twin[1], vs_twin=statistics.fmean(a / b - 1 for a, b in pairs))


def study_markdown(record: dict, level: int = 3, plot_path: str | None = None) -> str:
    a = record["args"]
    tokens = a["steps"] * a["batch_size"] * a["block_size"]
    describe = [
        f"Data: {record['data']}. Model: tiny Llama, {record['num_params'] / 1e6:.2f}M parameters, trained from "
        f"scratch. Budget: {a['steps']} steps x {a['batch_size']} x {a['block_size']} = {tokens:,} tokens per seed "
        f"run; validation loss on {record['eval_tokens']:,} held-out tokens, {a['evals']} evaluations per run. "
        "Warm-up 10%, cosine to 10% of the peak, clipping 1.0, weight decay "
        f"{a['weight_decay']} on matrices; AdamW/LAMB betas (0.9, 0.95), AdEMAMix (0.9, 0.95, 0.999) with its "
        "warm-ups over the run; the other rules keep their defaults.",
        "What this says: which optimizer trains this small model furthest in this budget when each gets its own "
        "tuned peak lr (one sweep seed). What it does not say: how they rank at 100x the parameters or tokens, "
        "or with other betas, schedules or batch sizes.",
    ]
    twins = [r for r in record["summary"] if "vs_twin" in r]
    text = study.markdown(record, "Training quality, each optimizer at its best learning rate", describe, level)
    if twins:
        text += (
            "\nStorage forms against their fp32 twin (paired by seed, each at its own best lr): "
            + "; ".join(f"{r['name']} {100 * r['vs_twin']:+.1f}% vs {r['twin']}" for r in twins)
            + ".\n"
        )
    if plot_path:
        text += f"\n![validation loss at each optimizer's best lr]({plot_path})\n"
    return text


def study_outputs(record: dict, out: Path, stem: str, default_dir: bool) -> str:
    png = out / f"{stem}_curves.png"
    study.plot(record, png, "validation loss at each optimizer's best lr (mean over seeds, band min-max)")
    text = study_markdown(record, level=1, plot_path=png.name)
    (out / f"{stem}.md").write_text(text)
    if default_dir and stem == "quality_study":
        section = study_markdown(record, level=3, plot_path=f"benchmarks/results/{png.name}")
        if update_report("quality-study", section):
            print("updated the quality-study section of BENCHMARKS.md", file=sys.stderr)
    return text


def study_main(args, argv: list[str] | None) -> int:
    from hfoptim.registry import list_optimizers

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out = Path(args.output_dir)
    stem = "quality_study_smoke" if args.smoke else "quality_study"
    default_dir = out.resolve() == RESULTS_DIR.resolve()
    if args.tables_only:
        record = json.loads((out / f"{stem}.json").read_text())
        print(study_outputs(record, out, stem, default_dir))
        return 0
    args.steps = args.steps or STUDY_STEPS
    args.sweep_steps = args.sweep_steps or max(1, args.steps // 4)
    factors, edge_steps = study.LR_FACTORS, study.EDGE_STEPS
    if args.smoke:
        edge_steps = 0  # a smoke run checks the plumbing: two lrs, nothing past them
        study.smoke(args)
        factors = study.SMOKE_FACTORS
    args.evals = args.evals or 20
    known = set(list_optimizers())
    names = study.available(args.names or STUDY_NAMES, known.__contains__, log)
    if "adamw" not in names:
        names = ["adamw", *names]
    plan = {name: study.grid(name, factors) for name in names}
    started = time.perf_counter()
    data = prepare_data(args.block_size, args.eval_blocks)
    log(f"data: {data['describe']}")
    _init_worker(data, 1)
    timed = 4 if args.smoke else 20
    seconds_per_step = study.probe_seconds(
        lambda: train_one("adamw", 0, study.probe_args(args, 1.5e-3, timed)).seconds / timed
    )
    estimate = study.estimate(seconds_per_step, plan, args)
    log(
        f"estimate: {seconds_per_step:.3f} s/step (adamw, {timed} timed steps) x "
        f"{sum(len(v) for v in plan.values())} sweep runs of {args.sweep_steps} + {len(plan) * len(args.seeds)} "
        f"seed runs of {args.steps} steps / {args.workers} workers = {estimate / 60:.0f} min"
    )
    if args.estimate_only:
        return 0
    journal = study.Journal(out / f"{stem}.journal.jsonl", args)
    resumed = len(journal.done)
    runs = study.run_study(plan, args, train_record, _init_worker, (data, 1), log, journal, edge_steps)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = study.summarize(runs, names)
    add_twins(summary, runs)
    record = {
        "machine": machine_info(),
        "libraries": library_versions(),
        "command": command.strip(),
        "args": vars(args),
        "seeds": args.seeds,
        "factors": list(factors),
        "edge_steps": edge_steps,
        "reference": "adamw",
        "data": data["describe"],
        "num_params": next((r["num_params"] for r in runs if r["num_params"]), 0),
        "eval_tokens": int(data["validation"].numel()),
        "seconds_per_step_probe": seconds_per_step,
        "estimate_s": estimate,
        "elapsed_s": time.perf_counter() - started,
        "resumed_runs": resumed,
        "summary": summary,
        "runs": runs,
    }
    write_json(out / f"{stem}.json", record)
    journal.delete()
    print(study_outputs(record, out, stem, default_dir))
    minutes = record["elapsed_s"] / 60
    log(f"wrote {out / stem}.json/.md/_curves.png in {minutes:.1f} min (estimate {estimate / 60:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
