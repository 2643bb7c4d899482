"""The tuned-study protocol shared by ``quality.py --study`` and ``--finetune`` (``_finetune.py``): a learning-rate
sweep per optimizer on a short budget, then several seeds at each optimizer's best learning rate
on the full budget, compared best against best.

Protocol, for every optimizer ``o`` with a grid ``lr_o * f`` (``f`` in :data:`LR_FACTORS`, 10**(k/3)
for k = -2..1, four values spanning 10x, centred on ``o``'s sensible default):

1. sweep: one run per grid value (seed ``seeds[0]``) for ``sweep_steps`` steps, same schedule
   shape as the full runs (warm-up 10%, cosine to 10%); the best lr is the lowest final validation
   loss (a failed or non-finite run counts as infinitely bad);
   while an optimizer's best lr is the largest (smallest) it has tried, one more run at the next lr
   beyond that end (the grid's own ratio), up to :data:`EDGE_STEPS` times, so a grid centred too
   low or too high does not decide the comparison; a best lr still at an end is marked 'edge';
2. seeds: one run per seed at the best lr for ``steps`` steps.

The record (JSON) holds every run (phase, lr, seed, steps, curves, error), the machine and the
commit; :func:`markdown` rebuilds the tables from it alone, so ``--tables-only`` reproduces them
byte for byte. The layer only schedules and reports: the training function is the caller's.

A study takes hours, so every finished run is appended to a journal (:class:`Journal`, a JSON-lines
file beside the results) as it is collected. The same command run again after an interruption
reuses the journal's runs and trains only the rest (it says how many it took over); a journal
written with other settings is refused with the settings that differ. The caller deletes the
journal once the results file is written.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import GIT_COMMIT, machine_line  # noqa: E402

#: the sweep's learning rates relative to each optimizer's centre: 0.22, 0.46, 1, 2.15 (10x span)
LR_FACTORS = tuple(10 ** (k / 3) for k in (-2, -1, 0, 1))
#: smoke runs: two learning rates
SMOKE_FACTORS = (0.5, 2.0)

#: how many lrs past an end of its grid an optimizer's sweep may extend while its best lr is at that end
EDGE_STEPS = 2

#: the sweep centre of each optimizer (its sensible default peak lr for a 1M-parameter LM with
#: warm-up, cosine decay and clipping); the study runs the ones the registry knows at run time
CENTRES = {
    "adamw": 1.5e-3,
    "ademamix": 1.5e-3,
    "adan": 1.5e-3,
    "adafactor": 1e-2,  # the rule's default (relative step sizes are not used)
    "lamb": 5e-3,  # per-layer trust ratio: larger steps than AdamW
    "amos": 3e-3,
    "nsgda": 1e-2,  # every step moves each tensor by lr in L2 norm
    "smmf": 1.5e-3,
    "adamw_8bit": 1.5e-3,
    "adamw_factored": 1.5e-3,
    "ademamix_8bit": 1.5e-3,
    "ademamix_factored": 1.5e-3,
    # rules landing on other branches: included when the registry has them
    "sm3": 1e-2,
    "adams": 1.5e-3,
    "adamcpr": 1.5e-3,
    "adamomentum": 1.5e-3,
    "muon": 2e-2,
    "adamw_4bit": 1.5e-3,
}


def available(names: list[str], known: Callable[[str], bool], log: Callable[[str], None]) -> list[str]:
    """``names`` the registry knows (``known``), in order, with a printed note for each skipped one."""
    kept = []
    for name in names:
        if known(name):
            kept.append(name)
        else:
            log(f"note: {name!r} is not in this hfoptim's registry yet; skipped")
    return kept


def grid(name: str, factors: tuple[float, ...], centres: dict[str, float] = CENTRES) -> list[float]:
    """The sweep of ``name``: its centre times each factor, rounded to 3 significant digits."""
    if name not in centres:
        raise ValueError(f"no learning-rate centre for {name!r}; add it to study.CENTRES")
    return [float(f"{centres[name] * f:.3g}") for f in factors]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the study commands beyond the usual ones (``--names``, ``--seeds``, ``--steps``)."""
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 2 lrs, 1 seed, a few steps")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables and plot from the results file")
    parser.add_argument("--sweep-steps", type=int, help="budget of each sweep run")
    parser.add_argument("--estimate-only", action="store_true", help="print the wall-time estimate and stop")


def smoke(args: argparse.Namespace, steps: int = 6) -> None:
    """The smoke budget, in place: 1 seed, ``steps`` steps (sweep and full), two evaluations."""
    args.seeds, args.steps, args.sweep_steps, args.evals = args.seeds[:1], steps, steps, 2


def estimate(seconds_per_step: float, plan: dict[str, list[float]], args) -> float:
    """Wall seconds of the whole study: (sweep steps + full steps) x seconds per step / workers."""
    steps = sum(len(lrs) * args.sweep_steps + len(args.seeds) * args.steps for lrs in plan.values())
    return seconds_per_step * steps / max(1, args.workers)


def _with(args, lr: float, steps: int, **changes):
    job = copy.copy(args)
    job.lr, job.steps = lr, steps
    for key, value in changes.items():
        setattr(job, key, value)
    return job


def probe_args(args, lr: float, steps: int):
    """A short timed run's arguments: ``steps`` steps and one evaluation (at the end), so the
    seconds per step lean high (model set-up and one evaluation over few steps)."""
    return _with(args, lr, steps, evals=1)


#: options that do not change what a run computes: a journal written under other values still holds
VOLATILE_OPTIONS = frozenset({"workers", "names", "estimate_only", "tables_only", "output_dir", "cache_dir", "lr"})


class Journal:
    """The finished runs of one study, one JSON line each after a header line with the protocol's
    settings (``args`` less :data:`VOLATILE_OPTIONS`), so an interrupted study resumes where it stopped.

    ``done`` maps ``(phase, name, lr, seed)`` to the run recorded for it."""

    def __init__(self, path: Path, args) -> None:
        self.path = Path(path)
        self.settings = {k: v for k, v in sorted(vars(args).items()) if k not in VOLATILE_OPTIONS}
        self.done: dict[tuple, dict] = {}
        if self.path.exists():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            recorded = (lines[0].get("settings") if lines else None) or {}
            if recorded != json.loads(json.dumps(self.settings)):
                differ = sorted(k for k in {*recorded, *self.settings} if recorded.get(k) != self.settings.get(k))
                raise SystemExit(
                    f"{self.path} holds runs of a study with other settings ({', '.join(differ)}): "
                    "rerun with the settings it was started with, or delete it to start over"
                )
            self.done = {self.key(run): run for run in lines[1:]}
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"settings": self.settings}) + "\n")

    @staticmethod
    def key(run: dict) -> tuple:
        return run["phase"], run["name"], run["lr"], run["seed"]

    def add(self, run: dict) -> None:
        """Append ``run`` (flushed at once: a killed study keeps it)."""
        self.done[self.key(run)] = run
        with self.path.open("a") as file:
            file.write(json.dumps(run) + "\n")

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


def run_study(
    plan: dict[str, list[float]],
    args,
    train: Callable,
    init: Callable,
    init_args: tuple,
    log: Callable[[str], None],
    journal: Journal | None = None,
    edge_steps: int = EDGE_STEPS,
) -> list[dict]:
    """Every run of the protocol as a dict: ``phase`` ("sweep"/"seed"), ``lr`` and ``train``'s
    result fields (``name``, ``seed``, ``eval_steps``, ``eval_loss``, ``error``, ...). Runs found in
    ``journal`` are taken from it instead of trained; every new run is added to it. A sweep whose
    best lr is at an end of ``plan``'s grid goes on past it, up to ``edge_steps`` lrs."""
    if args.workers == 0:  # in this process (tests): no pool to start
        init(*init_args)
        submit = lambda name, seed, job: _Later(lambda: train(name, seed, job))  # noqa: E731
        return _protocol(args, submit, log, plan, journal, edge_steps)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=init, initargs=init_args) as pool:
        submit = lambda name, seed, job: pool.submit(train, name, seed, job)  # noqa: E731
        return _protocol(args, submit, log, plan, journal, edge_steps)


class _Later:
    """A future's ``result()`` for work done in this process when it is asked for (in order, so
    each run is journaled before the next starts)."""

    def __init__(self, work: Callable):
        self.work = work

    def result(self):
        return self.work()


def _protocol(
    args,
    submit: Callable,
    log: Callable[[str], None],
    plan: dict[str, list[float]],
    journal: Journal | None,
    edge_steps: int,
) -> list[dict]:
    done = journal.done if journal is not None else {}
    runs: list[dict] = []
    # wall time per step trained in this invocation (all workers together), for the time left:
    # the start-up estimate times one process alone, while parallel workers share memory bandwidth
    started, trained = time.perf_counter(), [0]
    seed_steps = len(plan) * len(args.seeds) * args.steps

    def left(steps_left: int) -> str:
        if not trained[0]:
            return ""
        minutes = (time.perf_counter() - started) / trained[0] * steps_left / 60
        return f"; about {minutes:.0f} min left"

    def phase(name: str, jobs: list[tuple[str, float, int]], steps: int, label: str = "") -> None:
        label = label or name
        keys = [(name, job_name, lr, seed) for job_name, lr, seed in jobs]
        futures = [
            _Later(lambda key=key: done[key]) if key in done else submit(job_name, seed, _with(args, lr, steps))
            for key, (job_name, lr, seed) in zip(keys, jobs)
        ]
        taken = sum(key in done for key in keys)
        if taken:
            log(f"{label}: {taken} of {len(jobs)} runs taken from the journal {journal.path}")
        for i, (key, (job_name, lr, seed), future) in enumerate(zip(keys, jobs, futures), 1):
            run = {"phase": name, "lr": lr, **future.result()}
            if key not in done:
                run["commit"] = GIT_COMMIT  # the workers were started from this tree with this process
                if journal is not None:
                    journal.add(run)
                trained[0] += steps
            runs.append(run)
            later = sum(k not in done for k in keys[i:]) * steps + (seed_steps if name == "sweep" else 0)
            log(f"{label} [{i}/{len(jobs)}] {job_name} lr {lr:g} seed {seed}: {_status(run)}{left(later)}")

    phase("sweep", [(name, lr, args.seeds[0]) for name, lrs in plan.items() for lr in lrs], args.sweep_steps)
    for _ in range(edge_steps):
        beyond = beyond_edges(runs, plan)
        if not beyond:
            break
        jobs = [(name, lr, args.seeds[0]) for name, lr in beyond.items()]
        phase("sweep", jobs, args.sweep_steps, label="sweep past a grid end")
    best = best_lrs(runs)
    phase("seed", [(name, best[name], seed) for name in plan for seed in args.seeds], args.steps)
    return runs


def _status(run: dict) -> str:
    return run["error"] or f"final val loss {run['eval_loss'][-1]:.4f} ({run['seconds']:.0f} s)"


def _final(run: dict) -> float:
    if run["error"] or not run["eval_loss"] or not math.isfinite(run["eval_loss"][-1]):
        return math.inf
    return run["eval_loss"][-1]


def best_lrs(runs: list[dict]) -> dict[str, float]:
    """Per optimizer, the sweep lr with the lowest final validation loss (the smaller lr on a tie)."""
    best: dict[str, tuple[float, float]] = {}
    for run in runs:
        if run["phase"] != "sweep":
            continue
        key = (_final(run), run["lr"])
        if run["name"] not in best or key < best[run["name"]]:
            best[run["name"]] = key
    return {name: lr for name, (_, lr) in best.items()}


def beyond_edges(runs: list[dict], plan: dict[str, list[float]]) -> dict[str, float]:
    """Per optimizer whose best sweep lr is the largest (smallest) it has tried, the next lr past
    that end, one grid ratio (``plan``'s first two lrs) further, rounded like the grid."""
    best = best_lrs(runs)
    beyond = {}
    for name, lrs in plan.items():
        sweep = {r["lr"]: _final(r) for r in runs if r["phase"] == "sweep" and r["name"] == name}
        if len(lrs) < 2 or name not in best or not math.isfinite(sweep[best[name]]):
            continue  # no ratio to step by, or every run failed
        tried = sorted(sweep)
        ratio = lrs[1] / lrs[0]
        if best[name] == tried[-1]:
            beyond[name] = float(f"{tried[-1] * ratio:.3g}")
        elif best[name] == tried[0]:
            beyond[name] = float(f"{tried[0] / ratio:.3g}")
    return beyond


def first_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """The (linearly interpolated) step at which ``losses`` first reaches ``target``."""
    prev_step, prev_loss = 0, None
    for step, loss in zip(steps, losses):
        if loss <= target:
            if prev_loss is None or prev_loss == loss:
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def summarize(runs: list[dict], names: list[str], reference: str = "adamw") -> list[dict]:
    """One row per optimizer from the seed runs: chosen lr (and whether it is at the grid's edge),
    final loss mean and standard deviation, paired difference to ``reference`` and the step at
    which each seed first reaches ``reference``'s final loss of the same seed."""
    base = {r["seed"]: r for r in runs if r["phase"] == "seed" and r["name"] == reference and not r["error"]}
    rows = []
    for name in names:
        sweep = sorted((r for r in runs if r["phase"] == "sweep" and r["name"] == name), key=lambda r: r["lr"])
        seeds = [r for r in runs if r["phase"] == "seed" and r["name"] == name]
        ok = [r for r in seeds if math.isfinite(_final(r))]
        lrs = [r["lr"] for r in sweep]
        row: dict = {
            "name": name,
            "sweep": [[r["lr"], _final(r) if math.isfinite(_final(r)) else None] for r in sweep],
            "lr": seeds[0]["lr"] if seeds else None,
            "seeds": len(seeds),
            "failed": [r["error"] or "non-finite loss" for r in seeds if r not in ok],
        }
        row["at_edge"] = bool(lrs) and len(lrs) > 1 and row["lr"] in (lrs[0], lrs[-1])
        if ok:
            finals = [_final(r) for r in ok]
            row.update(
                final_mean=statistics.fmean(finals),
                final_std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                seconds_per_run=statistics.fmean(r["seconds"] for r in ok),
            )
            paired = [r for r in ok if r["seed"] in base]
            if paired:
                row["diff_vs_reference"] = statistics.fmean(_final(r) - _final(base[r["seed"]]) for r in paired)
                row["steps_to_reference"] = [
                    first_reach(r["eval_steps"], r["eval_loss"], _final(base[r["seed"]])) for r in paired
                ]
        rows.append(row)
    return rows


def markdown(record: dict, title: str, describe: list[str], level: int = 3, plot_path: str | None = None) -> str:
    """The study's section, from the record alone (the same record gives the same bytes)."""
    a = record["args"]
    reference = record.get("reference", "adamw")
    lines = [
        f"{'#' * level} {title}",
        "",
        f"Machine: {machine_line(record['machine'])}.",
        f"Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min, {a['workers']} worker processes"
        + _resumed(record)
        + ").",
        *describe,
        f"Protocol: per optimizer a sweep of {len(record['factors'])} peak learning rates (its centre x "
        + ", ".join(f"{f:.2f}" for f in record["factors"])
        + f") for {a['sweep_steps']} steps at seed {a['seeds'][0]}"
        + _past_ends(record.get("edge_steps", 0))
        + f", then seeds {', '.join(map(str, a['seeds']))} for {a['steps']} steps at the lr with the lowest final "
        "validation loss. 'edge' marks a best lr at an end of the lrs tried (the optimum may lie outside them).",
        "",
        f"| optimizer | chosen lr | final val loss (mean +- sd) | vs {reference} (paired) "
        f"| steps to {reference}'s final loss | sweep: lr -> final loss |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in record["summary"]:
        sweep = ", ".join(f"{lr:g} -> " + ("failed" if loss is None else f"{loss:.3f}") for lr, loss in row["sweep"])
        lr = "" if row["lr"] is None else f"{row['lr']:g}" + (" (edge)" if row["at_edge"] else "")
        if "final_mean" not in row:
            lines.append(f"| {row['name']} | {lr} | failed: {'; '.join(row['failed'])[:160]} | | | {sweep} |")
            continue
        failed = f" ({len(row['failed'])} failed)" if row["failed"] else ""
        diff = row.get("diff_vs_reference")
        reached = row.get("steps_to_reference", [])
        hits = [x for x in reached if x is not None]
        if row["name"] == reference:
            reach = f"{a['steps']} (reference)"
        elif hits:
            reach = f"{statistics.fmean(hits):.0f} ({len(hits)}/{len(reached)} seeds)"
        else:
            reach = f"not reached (0/{len(reached)})"
        lines.append(
            f"| {row['name']}{failed} | {lr} | {row['final_mean']:.4f} +- {row['final_std']:.4f} | "
            + ("" if diff is None else f"{diff:+.4f}")
            + f" | {reach} | {sweep} |"
        )
    if plot_path:
        lines += ["", f"![validation loss at each optimizer's best lr]({plot_path})"]
    return "\n".join(lines) + "\n"


def _past_ends(edge_steps: int) -> str:
    if not edge_steps:
        return ""
    return (
        f"; while the best of them is the largest (smallest) lr tried, one more run a grid step past it, up to "
        f"{edge_steps} more"
    )


def _resumed(record: dict) -> str:
    """How much of a resumed study ran before the last invocation (empty for one uninterrupted run)."""
    resumed = record.get("resumed_runs", 0)
    if not resumed:
        return ""
    worker_minutes = sum(r["seconds"] for r in record["runs"]) / 60
    commits: dict[str, int] = {}
    for run in record["runs"]:
        commits[run.get("commit", "unrecorded")] = commits.get(run.get("commit", "unrecorded"), 0) + 1
    return (
        f"; resumed: {resumed} of its {len(record['runs'])} runs came from the journal of an interrupted "
        f"earlier invocation, {worker_minutes:.0f} worker-minutes of training in all; runs per hfoptim commit: "
        + ", ".join(f"{commit} {count}" for commit, count in commits.items())
    )


def probe_seconds(probe: Callable[[], float]) -> float:
    """Seconds per step of a short timed run, from its second call: the first compiles kernels and
    warms caches that a study's thousands of steps do not pay again."""
    probe()
    return probe()


def plot(record: dict, path: Path, title: str) -> None:
    """Validation-loss curves of the seed runs: mean over seeds per optimizer, band min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    cmap = plt.get_cmap("tab20")
    tails = []
    for i, row in enumerate(record["summary"]):
        mine = [r for r in record["runs"] if r["phase"] == "seed" and r["name"] == row["name"] and not r["error"]]
        curves = [r["eval_loss"] for r in mine if r["eval_steps"] == mine[0]["eval_steps"]]
        if not curves or not all(math.isfinite(x) for c in curves for x in c):
            continue
        steps = mine[0]["eval_steps"]
        mean = [statistics.fmean(c[j] for c in curves) for j in range(len(steps))]
        style = "-" if i < 10 else "--"
        ax.plot(steps, mean, style, color=cmap(i % 20), label=f"{row['name']} (lr {row['lr']:g})", linewidth=1.3)
        lo = [min(c[j] for c in curves) for j in range(len(steps))]
        hi = [max(c[j] for c in curves) for j in range(len(steps))]
        ax.fill_between(steps, lo, hi, color=cmap(i % 20), alpha=0.1)
        tails.append(mean[len(mean) // 3 :])
    if tails:  # zoom on the last two thirds, where the curves separate
        ax.set_ylim(min(min(t) for t in tails) - 0.05, max(max(t) for t in tails) + 0.05)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("validation cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
