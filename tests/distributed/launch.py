"""Launching the multi-process workers from pytest, with bounded time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TORCH_CPP_LOG_LEVEL="ERROR",
        PYTHONWARNINGS="ignore",
    )
    return env


#: how a gloo process sometimes dies in C++ teardown on CPU with torch 2.13 (a std::thread
#: destroyed while joinable), after its work is done; seen about once in 20 launches
TEARDOWN_ABORT = "terminate called without an active exception"


def launch(cmd: list[str], timeout: float, env: dict | None = None, fresh: Path | None = None):
    """Run a multi-process launch; once more from scratch (``fresh``, its output folder, removed
    first) if a process died of the teardown abort, a failure that is not the code under test's."""
    env = env if env is not None else worker_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stdout + proc.stderr:
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def run_worker(launcher: list[str], script: str, args: list[str], out: Path, timeout: float) -> dict:
    """Run ``launcher script args --out out``; fail with the failing cases and the output tail."""
    cmd = [*launcher, str(WORKERS / script), *args, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        tail = (error.stdout or b"")[-3000:] if isinstance(error.stdout, bytes) else (error.stdout or "")[-3000:]
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s\n{tail}") from None
    summary = json.loads(out.read_text()) if out.exists() else None
    if proc.returncode != 0 or summary is None or summary["failures"]:
        lines = []
        if summary is not None:
            missing = sorted(set(summary["cases"]) - set(summary["ran"]))
            if missing:
                lines.append(f"cases not run (a crash stops the launch): {missing}")
            for r in summary["failures"][:30]:
                lines.append(f"[{r['case']} rank {r['rank']}] " + " | ".join(f[:800] for f in r["failures"][:3]))
        output = (proc.stdout + proc.stderr)[-4000:]
        head = f"{' '.join(cmd)} -> exit {proc.returncode}\n"
        raise AssertionError(head + "\n".join(lines) + "\n--- output tail ---\n" + output)
    if summary.get("nonfinite_reference"):
        warnings.warn(
            f"{script}: the single-process run of {summary['nonfinite_reference']} is not finite, so their "
            f"sharded runs were not compared (an optimizer bug for its own tests, not a sharding result)",
            stacklevel=2,
        )
    return summary


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
