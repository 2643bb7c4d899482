"""Parameter layouts under sharding.

FSDP2 (tests/distributed/layout_worker.py): a fused expert tensor sharded by expert equals E
separate matrices on one process (params, state, state_dict round trip) for the layout-sensitive
names; a Conv1D weight sharded along its input features equals the same Linear weight on one
process for every rule, storage form and modifier (params, state kept for whole output units,
state_dict round trip), a tiny GPT-2 under fully_shard equals one process, and both kinds of
state reshard through DCP (saved on 2, resumed on 3).

DeepSpeed ZeRO (tests/distributed/zero_layout_worker.py): a fused expert tensor whose partition
boundaries fall inside experts and rows equals E separate matrices (each expert a segment of its
own); a Conv1D weight whose partition boundaries fall inside its stored rows equals the same
Linear weight for every rule, storage form and modifier."""

from __future__ import annotations

import pytest

from hfoptim.rules import RULES
from tests.distributed.launch import run_worker, torchrun

#: the cases each worker must run: every rule's Conv1D case (a new rule adds one), the fused-expert
#: cases, the GPT-2 cases (FSDP2) and the refused layout (ZeRO); counted here so a worker that
#: silently drops cases fails
CONV_CASES = len(RULES) + 20
FSDP2_CASES = 9 + CONV_CASES + 4
ZERO_CASES = 9 + CONV_CASES + 1


@pytest.mark.parametrize("nproc", [2, 3])
def test_fsdp2_experts_and_conv1d(tmp_path, nproc):
    summary = run_worker(torchrun(nproc), "layout_worker.py", [], tmp_path / "out.json", timeout=300)
    assert len(summary["ran"]) == len(summary["cases"]) == FSDP2_CASES


@pytest.mark.parametrize(
    ("stage", "nproc"),
    [(3, 2), pytest.param(3, 3, marks=pytest.mark.slow), pytest.param(2, 3, marks=pytest.mark.slow)],
)
def test_zero_experts_and_conv1d(tmp_path, stage, nproc):
    args = ["--stage", str(stage)]
    summary = run_worker(torchrun(nproc), "zero_layout_worker.py", args, tmp_path / "out.json", timeout=600)
    assert len(summary["ran"]) == len(summary["cases"]) == ZERO_CASES


def test_fsdp2_expert_and_conv1d_state_checkpoint_from_2_processes_resumes_on_3(tmp_path):
    """The stacked per-expert state and a sharded Conv1D weight's state (kept for whole output
    units) saved with DCP on 2 processes, resharded onto 3, resume exactly."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    base = ["--dir", str(folder)]
    run_worker(torchrun(2), "layout_worker.py", ["--phase", "save", *base], tmp_path / "save.json", timeout=300)
    summary = run_worker(torchrun(3), "layout_worker.py", ["--phase", "load", *base], tmp_path / "load.json", 300)
    assert len(summary["ran"]) == len(summary["cases"]) == 10
