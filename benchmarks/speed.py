"""Optimizer step time on transformer-shaped parameter sets, as ratios to torch AdamW.

    python benchmarks/speed.py            # 6M, 25M and 100M parameters (about 9 minutes on 2 quiet cores)
    python benchmarks/speed.py --quick    # a smoke run: 6M, a few names, 3 rounds

Each parameter set has Llama-like shapes (embedding, q/k/v/o, gate/up/down, RMSNorm weights; see
``_timing.MODEL_SHAPES``) with a fixed random gradient. Every optimizer steps the same fp32
parameters; each candidate is timed in rounds interleaved with torch AdamW (``foreach=True``)
and torch AdamW (``fused=True``), both kept alive for the whole size, and the reported ratio is
the median over rounds of (candidate time / baseline time in the same round). Absolute
milliseconds are reported too but move with the machine's load; the ratios are what to compare.

The process runs with a steady allocator by default (``--allocator steady``: glibc's mmap and trim
thresholds raised, ``_timing.STEADY_ALLOCATOR_ENV``; the script starts itself again with them), so
that no step faults the pages of its temporaries in. With glibc's own thresholds
(``--allocator default``, what a user's process does) a freed block over 32 MiB goes back to the
system, and whether the next step faults it in again depends on what the heap holds at that
moment, which the candidates built before change: torch AdamW foreach's step on the 95M set took
203 ms in one candidate's rounds and 263-388 ms in others' (AMD EPYC, e505b93), and the ratios
moved with it. ``benchmarks/layouts.py`` times both allocators side by side.

Measured, to keep the run bounded:

* both paths of the dense step for :data:`BOTH_PATHS` (AdamW, AdEMAMix, Adan, Adafactor, LAMB,
  Adam-atan2, diffGrad, SMMF) at every size: the default compiled one (``compile="auto"``, one
  torch.compile kernel per parameter, see ``hfoptim.core.compiled_step``; labelled by the name) and the
  plain ``foreach`` one (labelled ``compile=off``); next to torch AdamW fused and
  ``torch.compile``'d (PyTorch's recipe, ``torch.compile(optimizer.step)``);
* 6M: every other hfoptim base name with its default state and its ``_factored``, ``_smmf`` and
  ``_shared`` forms on the plain path; AdamW also with ``_8bit`` and ``_bf16`` state on the
  compiled path and on the plain one; every peer, torchao's three low-bit AdamWs included;
* 25M: also AdamW's, AdEMAMix's, Adan's and Adafactor's ``_8bit`` (compiled), ``_factored``,
  ``_smmf`` and ``_shared`` state (plain), and the peers of every algorithm timed (torchao:
  AdamW8bit). The other rules' ratios at 6M carry over: they are elementwise steps like these;
* 100M: the both-path rules, AdamW's, AdEMAMix's and Adan's 8-bit state, their fastest peers
  (``LARGE``).

Left out because each costs compile time or minutes of slow steps without a new finding: the other
rules' compiled steps (each name compiles for seconds to a minute per tensor shape; the both-path
rules show what compiling buys), the other rules' 8-bit and bf16 forms (their codec cost is the one
the core rules show); AdEMAMix's and Adan's 8-bit forms at 6M; the plain 8-bit path above 6M (its
cost grows like the other plain steps); torchao at 100M (a minute of compiling and 4 s steps; its
ratio at 6M and 25M is 7-10x). "first step s" includes the compilation (the inductor cache on disk
makes a second run's much shorter).
Rounds: 5 / 5 / 3 by size, fewer (never under 3) for a candidate whose rounds would exceed the
size's time budget. Peers implementing the same algorithm: torch.optim, pytorch_optimizer
(``foreach=True``), bitsandbytes (32-bit and 8-bit) and torchao's low-bit AdamW when
importable. Default hyperparameters everywhere except ``lr=1e-3``. One torch thread by default
(``--threads``): with two threads on a machine that is not idle, each kernel waits for the
slower thread and step times swing by an order of magnitude, while single-threaded ratios repeat.

Writes ``results/speed.json``, ``results/speed.md`` and ``results/speed_scaling.png``
(``speed_quick.*`` with ``--quick``), and in BENCHMARKS.md the speed section and the low-bit
table (:func:`markdown_8bit`: hfoptim's 8-bit forms next to bitsandbytes and torchao).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    MODEL_SHAPES,
    RESULTS_DIR,
    allocator_environ,
    allocator_of,
    interleaved,
    library_versions,
    machine_info,
    machine_line,
    make_params,
    update_report,
    write_json,
)

LR = 1e-3
#: the algorithms measured at every size (with their storage forms and peers)
CORE = ("adamw", "ademamix", "adan")
#: compressed storage forms timed on the default (compiled) path for the CORE algorithms
COMPILED_FORMS = ("8bit", "bf16")
#: the rules whose dense step is timed on both paths at every size: compiled (the default,
#: ``compile="auto"``) and plain (``compile=off``); every other name and form is timed on the
#: plain path only (each compiled name costs a compilation per tensor shape, seconds to a minute)
BOTH_PATHS = ("adamw", "ademamix", "adan", "adafactor", "lamb", "adam_atan2", "diffgrad", "smmf")
PLAIN = " compile=off"
BASELINE_COMPILED = "torch AdamW compiled"
BASELINE_FOREACH = "torch AdamW foreach"
BASELINE_FUSED = "torch AdamW fused"
TORCH_MUON = "torch Muon (+AdamW)"
#: --muon: Muon and its torch peer at 6M and 25M (results/speed_muon.*, BENCHMARKS.md's speed-muon)
MUON = ("muon", TORCH_MUON)
MUON_SIZES = ["6M", "25M"]


@dataclass
class Candidate:
    label: str
    library: str
    algorithm: str  # the hfoptim base name of the same algorithm
    state: str  # storage form: fp32, 8bit, 4bit, fp8, bf16, factored, smmf, shared
    build: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    needs_loss: bool = False


@dataclass
class Row:
    size: str
    numel: int
    label: str
    library: str
    algorithm: str
    state: str
    ms: float | None = None
    ratio_foreach: float | None = None
    ratio_fused: float | None = None
    ratio_foreach_min: float | None = None
    ratio_foreach_max: float | None = None
    first_step_s: float | None = None
    rounds: int = 0
    error: str | None = None
    note: str | None = None


# ---------------------------------------------------------------------------------------- candidates
def _construct(cls, params, **options):
    return cls(params, lr=LR, **options)


def _hidden_matrices(params: list[torch.nn.Parameter]) -> tuple[list, list]:
    """``(hidden matrices, the rest)`` of a :func:`_timing.make_params` set: its first tensor is
    the (tied) embedding, which Muon leaves to AdamW as ``hfoptim.roles`` does in a model."""
    hidden = [p for p in params[1:] if p.dim() >= 2]
    return hidden, [params[0], *(p for p in params[1:] if p.dim() < 2)]


def _muon(spec, params, **options):
    """hfoptim Muon as ``create_optimizer(model, "muon")`` groups a model: hidden matrices Muon,
    the embedding and norms AdamW, in one optimizer."""
    hidden, rest = _hidden_matrices(params)
    groups = [{"params": hidden, "algorithm": "muon"}, {"params": rest, "algorithm": "adamw"}]
    return spec(groups, lr=LR, **options)


class TorchMuonWithAdamW:
    """torch.optim.Muon on the hidden matrices and torch AdamW (foreach) on the rest, one
    ``step()``: the work of hfoptim's ``muon`` (torch's Muon takes 2-D parameters only), with
    the same scale (``adjust_lr_fn="match_rms_adamw"``) and AdamW betas (0.9, 0.95)."""

    def __init__(self, params):
        hidden, rest = _hidden_matrices(params)
        self.muon = torch.optim.Muon(hidden, lr=LR, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=LR, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
        self.state = {**self.muon.state}

    def step(self):
        self.muon.step()
        self.adamw.step()


def hfoptim_candidates() -> list[Candidate]:
    """Every base name (rule or alias) and every base + storage form that builds."""
    from hfoptim.registry import ALIASES, get_optimizer, list_optimizers
    from hfoptim.rules import RULES
    from hfoptim.state.codec import CODECS

    bases = sorted({*RULES, *ALIASES})
    forms = [f for f in CODECS if f != "fp32"]
    listed = set(list_optimizers())
    out = []
    for base in bases:
        names = [base] + [f"{base}_{form}" for form in forms if f"{base}_{form}" in listed]
        for name in names:
            spec = get_optimizer(name)
            state = spec.options.get("state", "default")
            if spec.rule.name == "muon":
                # matrices Muon, embedding and norms AdamW (as from a model); only the default state
                # (the compressed forms' codec cost is AdamW's)
                if state == "default":
                    out.append(Candidate(name, "hfoptim", base, state, partial(_muon, spec)))
                continue
            if name in BOTH_PATHS:  # the default (compiled) path and the plain one
                variants = [(name, {}), (name + PLAIN, {"compile": "off"})]
            elif state not in COMPILED_FORMS:  # the plain path only
                variants = [(name + PLAIN, {"compile": "off"})]
            else:
                variants = [(name, {})]
            if state in COMPILED_FORMS:
                # AdamW, AdEMAMix and Adan in 8-bit, AdamW alone in bf16, on the default
                # (compiled) path; the other rules' forms are left out (each compiles for up to a
                # minute per shape, and their codec cost is the one these show)
                if base not in CORE or (state == "bf16" and base != "adamw"):
                    continue
                if base == "adamw":  # the plain path once, for comparison
                    variants.append((name + PLAIN, {"compile": "off"}))
            for label, options in variants:
                out.append(
                    Candidate(
                        label=label,
                        library="hfoptim",
                        algorithm=base,
                        state=state,
                        build=partial(_construct, spec, **options),
                        needs_loss=spec.rule.needs_loss,
                    )
                )
    return out


def _quiet_import(module: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return __import__(module, fromlist=["_"])


class CompiledStep:
    """An optimizer whose ``step`` is ``torch.compile(optimizer.step)`` (PyTorch's recipe for a
    compiled optimizer step; the first call compiles)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.step = torch.compile(optimizer.step)


def peer_candidates() -> list[Candidate]:
    """The same algorithms from torch.optim, pytorch_optimizer, bitsandbytes and torchao (those
    that import)."""
    out = [
        Candidate(BASELINE_FUSED, "torch", "adamw", "fp32", lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True)),
        Candidate(TORCH_MUON, "torch", "muon", "fp32", TorchMuonWithAdamW),
        Candidate(
            BASELINE_COMPILED,
            "torch",
            "adamw",
            "fp32",
            lambda ps: CompiledStep(torch.optim.AdamW(ps, lr=LR, foreach=True)),
        ),
        Candidate(
            "torch AdamW for-loop", "torch", "adamw", "fp32", lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=False)
        ),
        Candidate(
            "torch Adafactor foreach",
            "torch",
            "adafactor",
            "factored",
            lambda ps: torch.optim.Adafactor(ps, lr=LR, foreach=True),
        ),
    ]
    try:
        po = _quiet_import("pytorch_optimizer")
        for cls, algorithm, state in (
            ("AdEMAMix", "ademamix", "fp32"),
            ("Adan", "adan", "fp32"),
            ("AdaFactor", "adafactor", "factored"),
            ("Lamb", "lamb", "fp32"),
            ("DiffGrad", "diffgrad", "fp32"),
            ("AdaNorm", "adanorm", "fp32"),
            ("PNM", "pnm", "fp32"),
            ("AdaPNM", "adapnm", "fp32"),
            ("Amos", "amos", "shared"),
        ):
            out.append(
                Candidate(
                    f"pytorch_optimizer {cls}",
                    "pytorch_optimizer",
                    algorithm,
                    state,
                    partial(_construct, getattr(po, cls), foreach=True),
                )
            )
    except ImportError:
        pass
    try:
        bnb = _quiet_import("bitsandbytes")
        # AdEMAMix 32-bit as AdEMAMix(optim_bits=32): bitsandbytes 0.50's AdEMAMix32bit class fails
        # on CPU for 2-D parameters (a broadcast error in its step)
        for label, cls, options, algorithm, state in (
            ("AdamW32bit", "AdamW32bit", {}, "adamw", "fp32"),
            ("AdamW8bit", "AdamW8bit", {}, "adamw", "8bit"),
            ("AdEMAMix 32-bit", "AdEMAMix", {"optim_bits": 32}, "ademamix", "fp32"),
            ("AdEMAMix8bit", "AdEMAMix8bit", {}, "ademamix", "8bit"),
            ("LAMB32bit", "LAMB32bit", {}, "lamb", "fp32"),
            ("LAMB8bit", "LAMB8bit", {}, "lamb", "8bit"),
        ):
            out.append(
                Candidate(
                    f"bitsandbytes {label}",
                    "bitsandbytes",
                    algorithm,
                    state,
                    partial(_construct, getattr(bnb.optim, cls), **options),
                )
            )
    except ImportError:
        pass
    try:
        ao = _quiet_import("torchao.optim")
        for cls, state in (("AdamW8bit", "8bit"), ("AdamW4bit", "4bit"), ("AdamWFp8", "fp8")):
            if hasattr(ao, cls):
                out.append(
                    Candidate(f"torchao {cls}", "torchao", "adamw", state, partial(_construct, getattr(ao, cls)))
                )
    except Exception:  # torchao missing, or built for another torch
        pass
    return out


#: the smoke run (--quick): one name per kind of path
QUICK = (
    "adamw",
    "adamw compile=off",
    "ademamix_8bit",
    "adan_factored",
    BASELINE_FUSED,
    "pytorch_optimizer AdEMAMix",
    "bitsandbytes AdamW8bit",
)


#: the 100M set: the BOTH_PATHS rules on both paths, the core algorithms' 8-bit state, and the
#: fastest peers
LARGE = (
    *BOTH_PATHS,
    *(name + PLAIN for name in BOTH_PATHS),
    "adamw_8bit",
    "ademamix_8bit",
    "adan_8bit",
    BASELINE_FUSED,
    BASELINE_COMPILED,
    "pytorch_optimizer AdEMAMix",
    "pytorch_optimizer Adan",
    "pytorch_optimizer AdaFactor",
    "pytorch_optimizer Lamb",
    "pytorch_optimizer DiffGrad",
    "torch Adafactor foreach",
    "bitsandbytes AdamW8bit",
    "bitsandbytes AdEMAMix8bit",
)
#: compiled forms timed only from 25M on (at 6M AdamW's show the compiled path against the plain one)
NOT_AT_6M = ("ademamix_8bit", "adan_8bit")


def _at_25m(c: Candidate) -> bool:
    """The 25M set: :data:`BOTH_PATHS` on both paths; the peers of those algorithms; hfoptim's
    other forms of the core algorithms and Adafactor (8-bit compiled, factored, SMMF, shared)."""
    if c.label in BOTH_PATHS or c.label.removesuffix(PLAIN) in BOTH_PATHS or c.algorithm == "muon":
        return True
    if c.library != "hfoptim":
        return (
            c.algorithm in (*CORE, "adafactor", "lamb", "diffgrad")
            and "for-loop" not in c.label
            and c.label not in ("torchao AdamW4bit", "torchao AdamWFp8")
        )
    if c.state in COMPILED_FORMS:
        return c.algorithm in CORE and c.state != "bf16" and PLAIN not in c.label
    return c.algorithm in (*CORE, "adafactor") and c.state != "default"


def plan(size: str, everything: list[Candidate], quick: bool) -> list[Candidate]:
    """Which candidates run at ``size`` (see the module docstring): everything but
    :data:`NOT_AT_6M` at 6M; at 25M :func:`_at_25m`; at 100M :data:`LARGE`."""
    if quick:
        return [c for c in everything if c.label in QUICK]
    if size == "6M":
        return [c for c in everything if c.label not in NOT_AT_6M]
    if size == "25M":
        return [c for c in everything if _at_25m(c)]
    return [c for c in everything if c.label in LARGE]


# ---------------------------------------------------------------------------------------- running
def stepper(optimizer: torch.optim.Optimizer, needs_loss: bool) -> Callable[[], object]:
    if needs_loss:
        return lambda: optimizer.step(loss=1.0)
    return optimizer.step


def run_size(
    size: str, candidates: list[Candidate], rounds: int, target: float, log, budget: float | None = None
) -> list[Row]:
    shape = MODEL_SHAPES[size]
    params = make_params(shape)
    numel = shape.numel
    foreach = torch.optim.AdamW(params, lr=LR, foreach=True)
    fused = torch.optim.AdamW(params, lr=LR, fused=True)
    for _ in range(2):
        foreach.step()
        fused.step()
    baselines = {BASELINE_FOREACH: foreach.step, BASELINE_FUSED: fused.step}
    rows = []
    reference = interleaved(foreach.step, {BASELINE_FUSED: fused.step}, 3, target)
    rows.append(
        Row(
            size,
            numel,
            BASELINE_FOREACH,
            "torch",
            "adamw",
            "fp32",
            ms=1e3 * reference.median_seconds(),
            ratio_foreach=1.0,
            ratio_fused=reference.ratio(BASELINE_FUSED),
            rounds=3,
        )
    )
    log(f"[{size}] {BASELINE_FOREACH}: {rows[0].ms:.1f} ms/step ({numel / 1e6:.1f}M parameters)")
    for i, cand in enumerate(candidates, 1):
        row = Row(size, numel, cand.label, cand.library, cand.algorithm, cand.state)
        optimizer = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optimizer = cand.build(params)
                step = stepper(optimizer, cand.needs_loss)
                start = time.perf_counter()
                step()  # lazy state (and compilation, for compiled paths)
                row.first_step_s = time.perf_counter() - start
                step()
                others = {k: f for k, f in baselines.items() if k != cand.label}
                paired = interleaved(step, others, rounds, target, budget_seconds=budget)
                rounds_run = len(paired.candidate)
            row.ms = 1e3 * paired.median_seconds()
            row.ratio_foreach = paired.ratio(BASELINE_FOREACH)
            row.ratio_foreach_min, row.ratio_foreach_max = paired.spread(BASELINE_FOREACH)
            row.ratio_fused = paired.ratio(BASELINE_FUSED) if BASELINE_FUSED in others else 1.0
            row.rounds = rounds_run
            row.note = _compile_failure() if cand.library == "hfoptim" else None
            log(
                f"[{size} {i}/{len(candidates)}] {cand.label}: {row.ms:.1f} ms, "
                f"{row.ratio_foreach:.2f}x foreach, {row.ratio_fused:.2f}x fused"
            )
        except Exception as error:  # record and go on: one broken peer must not stop the table
            row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            log(f"[{size} {i}/{len(candidates)}] {cand.label}: FAILED {row.error}")
        rows.append(row)
        del optimizer
        gc.collect()
    del foreach, fused, params
    gc.collect()
    return rows


def _compile_failure() -> str | None:
    """hfoptim's note when torch.compile failed and compressed state fell back to the plain path."""
    try:
        from hfoptim.core import compiled_step
    except ImportError:
        return None
    failed = getattr(compiled_step, "_failed", None)
    return f"compile failed, plain path: {failed}" if failed else None


# ---------------------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


def markdown(record: dict, level: int = 1, details: bool = False, plot_path: str | None = None) -> str:
    """The tables; ``level`` is the heading level of the title (sub-headings one below),
    ``details`` folds the per-size tables (for BENCHMARKS.md)."""
    rows = [Row(**r) for r in record["rows"]]
    sizes = record["sizes"]
    h, hh = "#" * level, "#" * (level + 1)
    base_ms = {r.size: r.ms for r in rows if r.label == BASELINE_FOREACH}
    lines = [
        f"{h} Optimizer step time",
        "",
        f"Machine: {machine_line(record['machine'])}.",
        f"Libraries: {', '.join(f'{k} {v}' for k, v in record['libraries'].items() if v)}.",
        f"Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min).",
        "",
        "Ratios are the median over interleaved rounds of (step time / torch AdamW step time in the same "
        "round); below 1 is faster than torch AdamW. ms/step is absolute and moves with machine load. "
        "torch AdamW foreach took "
        + ", ".join(f"{base_ms[s]:.1f} ms ({s})" for s in sizes if base_ms.get(s) is not None)
        + " per step in this run.",
        "",
        f"{hh} How the cost grows with size (ratio to torch AdamW foreach)",
        "",
        "Every optimizer timed at two sizes or more; a blank cell was not timed at that size (see "
        "`benchmarks/speed.py` for what runs where).",
        "",
    ]
    by_label = _by_label(rows)
    shown = [label for label, per in by_label.items() if len(per) >= min(2, len(sizes))]
    lines.append("| optimizer | state | " + " | ".join(f"{s} ({_numel(rows, s)})" for s in sizes) + " |")
    lines.append("|---|---|" + "---:|" * len(sizes))
    for label in shown:
        per = by_label[label]
        first = next(iter(per.values()))
        cells = [_cell(per.get(s)) for s in sizes]
        lines.append(f"| {label} | {first.state} | " + " | ".join(cells) + " |")
    if plot_path:
        lines += ["", f"![step time vs size]({plot_path})"]
    for size in sizes:
        title = f"{size} parameters ({_numel(rows, size)}): {sum(r.size == size for r in rows)} optimizers"
        lines += ["", f"<details><summary>{title}</summary>" if details else f"{hh} {title}", ""]
        lines += [
            "| optimizer | library | state | ms/step | x AdamW foreach | (min-max over rounds) "
            "| x AdamW fused | first step s |",
            "|---|---|---|---:|---:|---|---:|---:|",
        ]
        for r in rows:
            if r.size != size:
                continue
            if r.error:
                lines.append(f"| {r.label} | {r.library} | {r.state} | failed: {r.error} | | | | |")
                continue
            spread = f"{r.ratio_foreach_min:.2f}-{r.ratio_foreach_max:.2f}" if r.ratio_foreach_min is not None else ""
            label = f"{r.label} ({r.note})" if r.note else r.label
            lines.append(
                f"| {label} | {r.library} | {r.state} | {_fmt(r.ms, '.1f')} | {_fmt(r.ratio_foreach)} | {spread} "
                f"| {_fmt(r.ratio_fused)} | {_fmt(r.first_step_s, '.2f')} |"
            )
        if details:
            lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def markdown_8bit(record: dict, level: int = 3) -> str:
    """The low-bit rows of the run in one table: hfoptim's 8-bit forms (compiled, and AdamW's on
    the plain path) next to bitsandbytes' and torchao's low-bit optimizers and the same algorithms
    with fp32 state, as ratios to torch AdamW foreach at every size."""
    rows = [Row(**r) for r in record["rows"]]
    sizes = record["sizes"]

    def wanted(r: Row) -> bool:
        dense_core = r.state in ("default", "fp32") and r.algorithm in CORE and "for-loop" not in r.label
        return r.state in ("8bit", "4bit", "fp8") or dense_core

    by_label = _by_label([r for r in rows if wanted(r)])
    lines = [
        f"{'#' * level} Low-bit optimizer step time (ratio to torch AdamW foreach)",
        "",
        f'From the run above (`{record["command"]}`). "first step s" is the largest set\'s first step,',
        "compilation included (hfoptim: one kernel per rule and tensor shape; torchao: one per tensor).",
        "",
        "| optimizer | library | state | "
        + " | ".join(f"{s} ({_numel(rows, s)})" for s in sizes)
        + " | first step s |",
        "|---|---|---|" + "---:|" * len(sizes) + "---:|",
    ]
    for label, per in by_label.items():
        first = next(iter(per.values()))
        last = per[max(per, key=sizes.index)]
        cells = [_cell(per.get(s)) for s in sizes] + [_fmt(last.first_step_s, ".1f")]
        lines.append(f"| {label} | {first.library} | {first.state} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_muon(record: dict, level: int = 4) -> str:
    """Muon's rows as ratios to torch AdamW foreach timed in the same rounds, next to torch's Muon
    (``--muon``: these candidates alone; the full run times them too)."""
    rows = [Row(**r) for r in record["rows"]]
    sizes = record["sizes"]
    by_label = _by_label([r for r in rows if r.algorithm == "muon" or r.label == BASELINE_FOREACH])
    base_ms = {r.size: r.ms for r in rows if r.label == BASELINE_FOREACH}
    lines = [
        f"{'#' * level} Muon step time (ratio to torch AdamW foreach)",
        "",
        f"Machine: {machine_line(record['machine'])}.",
        f"Command: `{record['command']}` ({record['elapsed_s'] / 60:.1f} min). torch AdamW foreach took "
        + ", ".join(f"{base_ms[s]:.1f} ms ({s})" for s in sizes if base_ms.get(s) is not None)
        + " per step in this run.",
        "",
        "| optimizer | "
        + " | ".join(f"{s} ({_numel(rows, s)}) ms/step | x AdamW foreach (min-max)" for s in sizes)
        + " |",
        "|---|" + "---:|---|" * len(sizes),
    ]
    for label, per in by_label.items():
        cells = []
        for s in sizes:
            r = per.get(s)
            if r is None or r.error:
                cells += ["", "failed: " + r.error if r is not None else ""]
                continue
            spread = (
                f" ({r.ratio_foreach_min:.2f}-{r.ratio_foreach_max:.2f})" if r.ratio_foreach_min is not None else ""
            )
            cells += [_fmt(r.ms, ".1f"), _fmt(r.ratio_foreach) + spread]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _by_label(rows: list[Row]) -> dict[str, dict[str, Row]]:
    """label -> size -> row, labels in their first appearance's order."""
    out: dict[str, dict[str, Row]] = {}
    for r in rows:
        out.setdefault(r.label, {})[r.size] = r
    return out


def _numel(rows: list[Row], size: str) -> str:
    n = next(r.numel for r in rows if r.size == size)
    return f"{n / 1e6:.1f}M"


def _cell(r: Row | None) -> str:
    if r is None:
        return ""
    if r.error:
        return "failed"
    return f"{r.ratio_foreach:.2f}"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Row(**r) for r in record["rows"] if r["error"] is None]
    sizes = record["sizes"]
    by_label: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_label.setdefault(r.label, {})[r.size] = r
    fig, ax = plt.subplots(figsize=(9, 5.5))
    shown = [(label, per) for label, per in by_label.items() if len(per) >= 2]
    colors = plt.get_cmap("tab20").colors  # 20 colours x 4 markers: no two lines look alike
    for i, (label, per) in enumerate(shown):
        xs = [per[s].numel / 1e6 for s in sizes if s in per]
        ys = [per[s].ratio_foreach for s in sizes if s in per]
        style = "-" if per[next(iter(per))].library == "hfoptim" else "--"
        marker = "os^D"[(i // len(colors)) % 4]
        ax.plot(xs, ys, style, color=colors[i % len(colors)], marker=marker, markersize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("step time / torch AdamW foreach (log)")
    ax.set_title("optimizer step time vs size (solid: hfoptim, dashed: peers)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 6M, a few names, 3 rounds")
    parser.add_argument("--sizes", nargs="+", choices=list(MODEL_SHAPES), help="default: all (6M only with --quick)")
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="only these candidates (labels as in the table)")
    parser.add_argument(
        "--muon",
        action="store_true",
        help=f"only {', '.join(MUON)} at {', '.join(MUON_SIZES)} (results/speed_muon.*, the speed-muon section)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds per candidate (default 7/5/3 by size)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared or busy machine, OpenMP threads waiting on "
        "each other make multi-threaded step times swing by 10x; 0 = torch's default)",
    )
    parser.add_argument(
        "--allocator",
        choices=["steady", "default"],
        default="steady",
        help="steady (default): glibc keeps freed memory, so no step faults its temporaries in and the "
        "ratios compare the steps' own work; default: glibc's own thresholds, under which torch AdamW's "
        "step on the 95M set moves by up to 2x with what the heap holds (the script starts itself again "
        "with the environment this needs)",
    )
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    return parser


ROUNDS = {"6M": 5, "25M": 5, "100M": 3}
TARGET_SECONDS = {"6M": 0.05, "25M": 0.1, "100M": 0.0}  # 0: one step per sample
#: seconds of interleaved rounds per candidate; a slow one gets fewer rounds (at least 3)
BUDGET_SECONDS = {"6M": 1.5, "25M": 5.0, "100M": 15.0}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if allocator_of(os.environ) != args.allocator:
        # glibc reads its thresholds when the process starts
        if argv is None:
            os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], allocator_environ(args.allocator))
        raise SystemExit(
            f"speed.py: --allocator {args.allocator} needs glibc's thresholds in the environment at the start; "
            f"run it as a script (it starts itself again with them) or pass --allocator {allocator_of(os.environ)}"
        )
    started = time.perf_counter()
    # every compiled candidate (hfoptim's 8-bit/bf16 forms, torchao) adds guards to compiled
    # code; above dynamo's recompile limit later candidates would silently run eager code
    torch._dynamo.config.recompile_limit = max(256, torch._dynamo.config.recompile_limit)
    torch._dynamo.config.accumulated_recompile_limit = max(1024, torch._dynamo.config.accumulated_recompile_limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.muon:
        args.only, args.sizes = list(MUON), args.sizes or MUON_SIZES
    sizes = args.sizes or (["6M"] if args.quick else list(MODEL_SHAPES))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    everything = hfoptim_candidates() + peer_candidates()
    rows: list[Row] = []
    for size in sizes:
        chosen = plan(size, everything, args.quick)
        if args.only:
            chosen = [c for c in everything if c.label in args.only]
        rounds = args.rounds or (3 if args.quick else ROUNDS[size])
        target = TARGET_SECONDS[size] if not args.quick else 0.02
        rows += run_size(size, chosen, rounds, target, log, None if args.rounds else BUDGET_SECONDS[size])
    command = "python benchmarks/speed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    record = {
        "machine": machine_info(),
        "libraries": library_versions(),
        "command": command.strip(),
        "sizes": sizes,
        "lr": LR,
        "elapsed_s": time.perf_counter() - started,
        "rows": [asdict(r) for r in rows],
    }
    out = Path(args.output_dir)
    stem = "speed_quick" if args.quick else "speed_muon" if args.muon else "speed_only" if args.only else "speed"
    write_json(out / f"{stem}.json", record)
    png = out / f"{stem}_scaling.png"
    drawn = len(sizes) > 1 and not args.muon  # --muon: its section is the table
    if drawn:
        plot(record, png)
    (out / f"{stem}.md").write_text(markdown(record, plot_path=png.name if drawn else None))
    if not args.quick and not args.only and out.resolve() == RESULTS_DIR.resolve():
        relative = f"benchmarks/results/{png.name}" if len(sizes) > 1 else None
        if update_report("speed", markdown(record, level=3, details=True, plot_path=relative)):
            log("updated the speed section of BENCHMARKS.md")
        if update_report("speed_8bit", markdown_8bit(record)):
            log("updated the low-bit speed section of BENCHMARKS.md")
    if args.muon and out.resolve() == RESULTS_DIR.resolve():
        if update_report("speed-muon", markdown_muon(record)):
            log("updated the speed-muon section of BENCHMARKS.md")
    print(markdown(record))
    log(f"wrote {out / stem}.json/.md in {record['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
