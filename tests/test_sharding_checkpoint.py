"""Checkpoints of sharded optimizer state: resumed equals uninterrupted.

* FSDP2 through torch.distributed.checkpoint (tests/distributed/fsdp2_checkpoint_worker.py):
  saved by 2 processes, loaded by 3 (DCP reshards the DTensor state hfoptim exports; state that
  does not follow rows is saved decoded and encoded again for the new shards) into a FRESH model
  and optimizer, then more steps; parameters and state equal a single-process run that never
  stopped.
* DeepSpeed ZeRO-2 and ZeRO-3 through DeepSpeed's own checkpoint
  (tests/distributed/zero_checkpoint_worker.py), same number of processes.
* A checkpoint of state format 1 (4-bit codes interleaved, the order before format 2) saved
  under FSDP2 and ZeRO-2 resumes exactly: the sharded loads upgrade what they read.
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_worker, torchrun


def _save_then_load(tmp_path, worker, save_nproc, load_nproc, extra=(), cases="fast", timeout=400):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    base = ["--dir", str(folder), "--cases", cases, *extra]
    run_worker(torchrun(save_nproc), worker, ["--phase", "save", *base], tmp_path / "save.json", timeout)
    return run_worker(torchrun(load_nproc), worker, ["--phase", "load", *base], tmp_path / "load.json", timeout)


def test_fsdp2_checkpoint_from_2_processes_resumes_on_3(tmp_path):
    summary = _save_then_load(tmp_path, "fsdp2_checkpoint_worker.py", 2, 3)
    assert len(summary["ran"]) >= 10


@pytest.mark.slow
@pytest.mark.parametrize(("save", "load"), [(3, 2), (2, 2)])
def test_fsdp2_checkpoint_every_optimizer(tmp_path, save, load):
    summary = _save_then_load(tmp_path, "fsdp2_checkpoint_worker.py", save, load, cases="forms", timeout=900)
    assert len(summary["ran"]) == len(summary["cases"])


def test_fsdp2_checkpoint_of_state_format_1_resumes_exactly(tmp_path):
    summary = _save_then_load(
        tmp_path, "fsdp2_checkpoint_worker.py", 2, 3, extra=("--format1",), cases="adamw_4bit,ademamix_4bit"
    )
    assert sorted(summary["ran"]) == ["adamw_4bit", "ademamix_4bit"]


def test_zero2_checkpoint_of_state_format_1_resumes_exactly(tmp_path):
    extra, cases = ("--stage", "2", "--format1"), "adamw_4bit,ademamix_4bit"
    summary = _save_then_load(tmp_path, "zero_checkpoint_worker.py", 2, 2, extra=extra, cases=cases)
    assert sorted(summary["ran"]) == ["adamw_4bit", "ademamix_4bit"]


def test_zero2_checkpoint_resumes_exactly(tmp_path):
    summary = _save_then_load(tmp_path, "zero_checkpoint_worker.py", 2, 2, extra=("--stage", "2"))
    assert len(summary["ran"]) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_zero_checkpoint_resumes_exactly(tmp_path, stage):
    summary = _save_then_load(tmp_path, "zero_checkpoint_worker.py", 3, 3, extra=("--stage", str(stage)), timeout=900)
    assert len(summary["ran"]) >= 10
