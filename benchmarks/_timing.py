"""Shared pieces of the benchmark scripts: the machine, transformer-shaped parameter sets, and
interleaved timing against a baseline measured in the same process.

Not a benchmark itself (``python -m hfoptim.app.bench`` skips files starting with ``_``). Import it from a
script in this folder with ``from _timing import ...`` (each script puts this folder on
``sys.path``).

Why interleaved ratios: on a shared or busy CPU, and even with a different glibc malloc setting,
the absolute step time of torch AdamW (foreach) moves by 1.5x between runs. A ratio to a baseline
timed in the same rounds, alternating with the candidate, cancels most of that drift.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def lscpu() -> dict:
    """``lscpu``'s model name, its vector extensions (``avx*``, ``amx*``, ``fma``, ``sse4*``: they
    decide how fast compiled kernels are) and all its flags; ``{}`` where there is no ``lscpu``.
    Run once per process (a record's machine line and the layouts' choice of record both ask);
    callers read the dict and do not change it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    vector = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))]
    return {"model_name": fields.get("Model name", "").strip(), "vector_flags": vector, "flags": flags}


def _git_commit() -> str:
    """The commit of the code this process runs, ``+dirty`` when hfoptim/ or benchmarks/ have
    uncommitted changes."""
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        commit = out.stdout.strip() or "unknown"
        paths = ["hfoptim", "benchmarks/*.py"]
        git_status = ["git", "status", "--porcelain", "--", *paths]
        status = subprocess.run(git_status, cwd=root, capture_output=True, text=True)
        return commit + ("+dirty" if status.stdout.strip() else "")
    except OSError:
        return "unknown"


#: taken when the benchmark starts (imports this module), not when it writes its results: a long
#: run must name the code it ran, even if commits land meanwhile
GIT_COMMIT = _git_commit()


def machine_info() -> dict:
    """What the numbers were measured on: CPU and its vector extensions (``lscpu``), cores,
    threads, versions, date, load, allocator settings."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    malloc = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    return {
        "cpu": cpu_model(),
        "vector_flags": lscpu().get("vector_flags"),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_1_5_15": load,
        "git_commit": GIT_COMMIT,
        "malloc_env": malloc,
    }


#: glibc's mmap and trim thresholds raised so that freed memory stays in the heap: no step faults
#: the pages of its temporaries in again. With the defaults a freed block larger than the mmap
#: threshold (which grows to at most 32 MiB) goes back to the system, and torch AdamW foreach's
#: temporaries (4 bytes per parameter) cost it 100-300 ms of page faults a step on a 100M set when
#: they do, depending on what the heap holds at that moment.
STEADY_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}


def allocator_of(environ) -> str:
    """``"steady"`` where ``environ`` (a process's environment, or a record's ``malloc_env``)
    holds :data:`STEADY_ALLOCATOR_ENV`, else ``"default"``."""
    return "steady" if all(environ.get(k) == v for k, v in STEADY_ALLOCATOR_ENV.items()) else "default"


def allocator_environ(allocator: str) -> dict[str, str]:
    """This process's environment with glibc's thresholds of ``allocator`` (``"steady"`` or
    ``"default"``), for a process started with it."""
    env = {k: v for k, v in os.environ.items() if k not in STEADY_ALLOCATOR_ENV}
    if allocator == "steady":
        env.update(STEADY_ALLOCATOR_ENV)
    return env


def flags_text(info: dict) -> str:
    """``" (lscpu flags: avx avx2 ...)"`` from a record's machine; nothing for a record from before
    the flags were recorded (its committed tables stay what its record regenerates, and a run's
    flags are never filled in afterwards)."""
    flags = info.get("vector_flags")
    if flags is None:
        return ""
    return f" (lscpu flags: {' '.join(flags) or 'none of avx, amx, fma, sse4'})"


def machine_line(info: dict) -> str:
    load = info.get("load_average_1_5_15")
    load_text = f", load average {load[0]:.1f}" if load else ""
    steady = allocator_of(info.get("malloc_env") or {}) == "steady"
    heap = ", steady allocator (glibc keeps freed memory)" if steady else ""
    return (
        f"{info['cpu']}{flags_text(info)}, {info['cores']} cores ({info['torch_threads']} torch threads), "
        f"torch {info['torch']}, Python {info['python']}, {info['date'][:10]}, "
        f"hfoptim {info['git_commit']}{load_text}{heap}"
    )


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "pytorch_optimizer", "bitsandbytes", "torchao", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            try:  # importable from PYTHONPATH without dist metadata in this environment
                out[dist] = __import__(dist).__version__
            except Exception:
                out[dist] = None
    return out


# ---------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's parameter shapes (Llama layout: q, k, v, o, gate, up, down,
    two RMSNorm weights per layer; tied embedding; a final norm)."""

    label: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int

    def shapes(self) -> list[tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        out: list[tuple[int, ...]] = [(self.vocab, h)]
        for _ in range(self.layers):
            out += [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
        out.append((h,))
        return out

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes():
            n = 1
            for d in s:
                n *= d
            total += n
        return total


#: the parameter sets of the speed benchmark (about 6M, 25M and 100M parameters)
MODEL_SHAPES = {
    "6M": ModelShape("6M", vocab=8192, hidden=256, layers=6, intermediate=688),
    "25M": ModelShape("25M", vocab=16384, hidden=512, layers=5, intermediate=1376),
    "100M": ModelShape("100M", vocab=32000, hidden=768, layers=10, intermediate=2048),
}


def make_params(shape: ModelShape, seed: int = 0, grad_scale: float = 1e-2) -> list[torch.nn.Parameter]:
    """fp32 parameters of ``shape`` with a fixed random gradient each (set once, reused by every
    step; optimizers are expected not to change ``p.grad``)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shape.shapes():
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02)
        p.grad = torch.randn(s, generator=gen) * grad_scale
        params.append(p)
    return params


# ---------------------------------------------------------------------------------------- timing
def time_steps(step: Callable[[], object], n: int) -> float:
    """Seconds per call of ``step``, over ``n`` consecutive calls."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def calibrate(step: Callable[[], object], target_seconds: float, max_steps: int = 64) -> tuple[int, float]:
    """How many calls make one sample last about ``target_seconds`` (at least one), and the
    seconds of the one call timed to decide it."""
    once = time_steps(step, 1)
    return max(1, min(max_steps, round(target_seconds / max(once, 1e-9)))), once


@dataclass
class Paired:
    """Per-step seconds of a candidate and of each baseline, one entry per round."""

    candidate: list[float] = field(default_factory=list)
    baselines: dict[str, list[float]] = field(default_factory=dict)

    def median_seconds(self) -> float:
        return statistics.median(self.candidate)

    def ratio(self, baseline: str) -> float:
        """Median over rounds of candidate time / baseline time in the same round."""
        return statistics.median(c / b for c, b in zip(self.candidate, self.baselines[baseline]))

    def spread(self, baseline: str) -> tuple[float, float]:
        """(min, max) of the per-round ratios."""
        ratios = [c / b for c, b in zip(self.candidate, self.baselines[baseline])]
        return min(ratios), max(ratios)


def interleaved(
    candidate: Callable[[], object],
    baselines: dict[str, Callable[[], object]],
    rounds: int,
    target_seconds: float,
    max_steps: int = 64,
    budget_seconds: float | None = None,
    min_rounds: int = 3,
) -> Paired:
    """Time ``candidate`` and every baseline in ``rounds`` rounds; within a round each runs a
    block of steps back to back (about ``target_seconds`` long; one step when it is 0, with no
    calibration call), the order rotating from round to round. With ``budget_seconds``, slow
    candidates get fewer rounds (never fewer than ``min_rounds``), judged by a calibration call
    or, without one, by the first round."""
    runners = {"": candidate, **baselines}
    if target_seconds > 0:
        calibrated = {k: calibrate(f, target_seconds, max_steps) for k, f in runners.items()}
        steps = {k: n for k, (n, _) in calibrated.items()}
    else:
        steps = dict.fromkeys(runners, 1)
    out = Paired(baselines={k: [] for k in baselines})
    keys = list(runners)

    def one_round(r: int) -> None:
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            seconds = time_steps(runners[k], steps[k])
            (out.candidate if k == "" else out.baselines[k]).append(seconds)

    one_round(0)
    if budget_seconds is not None:
        if target_seconds > 0:
            round_seconds = sum(n * once for n, once in calibrated.values())
        else:
            round_seconds = out.candidate[0] + sum(v[0] for v in out.baselines.values())
        rounds = max(min(rounds, min_rounds), min(rounds, int(budget_seconds / max(round_seconds, 1e-9))))
    for r in range(1, rounds):
        one_round(r)
    return out


def write_json(path: Path, record: dict) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


REPORT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def update_report(section: str, text: str, report: Path = REPORT) -> bool:
    """Replace the part of BENCHMARKS.md between ``<!-- section:begin -->`` and
    ``<!-- section:end -->`` with ``text`` (the prose around it stays). False when the file or
    the markers are missing."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if not report.exists():
        return False
    content = report.read_text()
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    report.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True
