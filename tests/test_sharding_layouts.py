"""Parameter layouts under FSDP2 (tests/distributed/layout_worker.py): a fused expert tensor
sharded by expert equals E separate matrices on one process (params, state, state_dict round
trip) for the layout-sensitive names; a Conv1D weight sharded along its input features steps
exactly with an elementwise optimizer and is refused with a clear error where per-output-unit
statistics would be computed on a slice."""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_worker, torchrun


@pytest.mark.parametrize("nproc", [2, 3])
def test_fsdp2_experts_and_conv1d(tmp_path, nproc):
    summary = run_worker(torchrun(nproc), "layout_worker.py", [], tmp_path / "out.json", timeout=300)
    assert len(summary["ran"]) == len(summary["cases"]) == 11
