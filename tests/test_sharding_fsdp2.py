"""FSDP2 (fully_shard, DTensor Shard(0)) equals one process, for every optimizer and storage form.

Each launch runs many optimizer cases in a loop inside one process group (see
tests/distributed/fsdp2_worker.py): parameters AND state after several steps are compared with a
single-process run of the same optimizer fed the same gradients (fp32: float rounding; integer
state such as sign bits or 8-bit codes: identical), uneven splits over 3 processes, one
parameter whose rows some processes do not hold, the optimizer built before and after
``fully_shard``, and loss-driven rules fed a different loss per process (their mean is the
reference loss). The worker fails unless the parameters really were DTensors and the optimizer
really stepped with the FSDP2 layout.

Fast subset (always): AdamW with every storage form and modifier, AdaLo, Adafactor, LAMB, SMMF
on 3 processes. Whole matrix (``-m slow``): every registered name on 2 and 3 processes.
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_worker, torchrun


def test_fsdp2_matches_one_process_fast_subset(tmp_path):
    summary = run_worker(torchrun(3), "fsdp2_worker.py", ["--cases", "fast"], tmp_path / "out.json", timeout=300)
    assert len(summary["ran"]) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_fsdp2_matches_one_process_every_optimizer(tmp_path, nproc):
    summary = run_worker(torchrun(nproc), "fsdp2_worker.py", ["--cases", "all"], tmp_path / "out.json", timeout=900)
    assert len(summary["ran"]) == len(summary["cases"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_fsdp2_muon_orthogonalizes_each_matrix_whole_once(tmp_path, nproc):
    """Muon and Muon with 8-bit momentum: each matrix gathered on one owner, orthogonalized there
    once (the worker sums the per-process counts: 1 per matrix and step), rows really crossed
    processes, and parameters and state equal the one-process run."""
    args = ["--cases", "muon,muon_8bit"]
    summary = run_worker(torchrun(nproc), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=300)
    assert summary["ran"] == ["muon", "muon_8bit"]
    for result in summary["results"]:
        assert result["detail"]["matrices_mapped"] == 5 * 4  # 5 matrices (emb, lin_w, conv, big, row1), 4 steps
        assert result["detail"]["bytes_sent_all_ranks"] > 0
