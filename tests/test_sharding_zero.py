"""DeepSpeed ZeRO-1/2/3 with an hfoptim client optimizer equals one process.

Each launch (``torchrun``, ``DS_ACCELERATOR=cpu``, gloo; ``deepspeed --num_gpus N`` works too)
runs many optimizer cases in one process group (tests/distributed/zero_worker.py): real
``deepspeed.initialize`` with ``gradient_clipping`` 0 set explicitly, forward/backward through
DeepSpeed delivering exactly chosen gradients, parameters (gathered under ZeRO-3) and every
parameter segment's state compared with a single-process run. The worker checks that DeepSpeed's
ZeRO optimizer wraps ours, that the parameter groups hold flat partitions and that the ZeRO
layout stepped. Cases alternate round-robin gradients (ZeRO-1/2), several sub-groups (ZeRO-3,
so ``step()`` runs once per sub-group and the per-parameter step count must still advance once
per training step), and explicit ``attach`` vs automatic attachment.

Fast subset (always): ZeRO-2 on 3 processes and ZeRO-3 on 2 processes, AdamW with every
storage form and modifier, AdaLo, Adafactor, LAMB, SMMF. Whole matrix (``-m slow``): ZeRO-1/2/3
on 2 and 3 processes, every registered name on ZeRO-2 (3 processes) and ZeRO-3 (2), every rule
with every storage form on the others (:data:`WHOLE_MATRIX`), plus CPU optimizer offload and
bf16 parameters with fp32 master weights (ZeRO-2, and stage 1 = DeepSpeed's BF16_Optimizer).
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_worker, torchrun


@pytest.mark.parametrize(("stage", "nproc"), [(2, 3), (3, 2)])
def test_zero_matches_one_process_fast_subset(tmp_path, stage, nproc):
    args = ["--stage", str(stage), "--cases", "fast"]
    summary = run_worker(torchrun(nproc), "zero_worker.py", args, tmp_path / "out.json", timeout=400)
    assert len(summary["ran"]) >= 10
    if stage == 2:
        # parameters a partition holds whole are stepped there alone (hfoptim.core.uncut), except
        # under stable weight decay (adamw_swd), whose deferred updates stay one sharded pass
        for r in summary["results"]:
            uncut = r["detail"]["uncut_owned_all_ranks"], r["detail"]["uncut_elsewhere_all_ranks"]
            assert uncut == (0, 0) if r["case"] == "adamw_swd" else min(uncut) > 0, r


#: every name where the layouts differ most (ZeRO-2 flat partitions cut anywhere over 3 processes,
#: ZeRO-3's per-parameter partitions over 2); every rule with every storage form ("forms") on the
#: others. ZeRO-1 hands the optimizer the same flat partitions as ZeRO-2 (only the gradients'
#: reduction differs), so its every-name run would repeat ZeRO-2's.
WHOLE_MATRIX = [
    (1, 2, "forms"),
    (1, 3, "forms"),
    (2, 2, "forms"),
    (2, 3, "all"),
    (3, 3, "forms"),
    # ZeRO-3 steps slowest (a gather per parameter): its whole list in three launches that the
    # test workers can share, each well inside the per-test timeout
    *[(3, 2, f"all:{k}/3") for k in (1, 2, 3)],
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "nproc", "cases"), WHOLE_MATRIX)
def test_zero_matches_one_process_every_optimizer(tmp_path, stage, nproc, cases):
    args = ["--stage", str(stage), "--cases", cases]
    summary = run_worker(torchrun(nproc), "zero_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert len(summary["ran"]) == len(summary["cases"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_offload_to_cpu_matches_one_process(tmp_path, stage):
    args = ["--stage", str(stage), "--cases", "fast", "--offload"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=600)
    assert len(summary["ran"]) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_bf16_master_weights_match_one_process(tmp_path, stage):
    """bf16 parameters with fp32 master weights (stage 1 with fp32 gradient accumulation is
    DeepSpeed's BF16_Optimizer): the fp32 master segments and the state equal a single-process
    fp32 run from the same values with the same (bf16-representable) gradients."""
    args = ["--stage", str(stage), "--cases", "fast", "--bf16"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=600)
    assert len(summary["ran"]) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_muon_orthogonalizes_each_matrix_whole_once(tmp_path, stage, nproc):
    """Muon and Muon with 8-bit momentum under ZeRO-1/2/3 (rows cut by partition boundaries):
    each matrix orthogonalized once on one owner, rows crossed processes, equal to one process."""
    args = ["--stage", str(stage), "--cases", "muon,muon_8bit"]
    summary = run_worker(torchrun(nproc), "zero_worker.py", args, tmp_path / "out.json", timeout=400)
    assert summary["ran"] == ["muon", "muon_8bit"]
    for result in summary["results"]:
        assert result["detail"]["matrices_mapped"] == 5 * 3  # 5 matrices, 3 steps
        assert result["detail"]["bytes_sent_all_ranks"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "flag"), [(2, "--offload"), (3, "--offload"), (1, "--bf16")])
def test_zero_muon_with_cpu_offload_and_bf16_master_weights(tmp_path, stage, flag):
    """Muon's exchange on CPU-offloaded state and on DeepSpeed's bf16 optimizer's fp32 master
    partitions, 2 processes."""
    args = ["--stage", str(stage), flag, "--cases", "muon,muon_8bit"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=400)
    assert summary["ran"] == ["muon", "muon_8bit"]
    assert all(r["detail"]["matrices_mapped"] == 5 * 3 for r in summary["results"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_compiled_kernel_steps_the_partitions_and_matches_one_process(tmp_path, stage):
    """compile='on' under ZeRO-1/2/3 on 2 processes, over shapes whose rows split evenly
    (tests/distributed/common.py: ROW_ALIGNED_SHAPES): the fused kernel steps every segment of
    whole rows and blocks (the worker fails when the sharded optimizer ran none; factored state
    with its column sums completed after the kernels), the ones a boundary cuts inside a row take
    the plain path, and parameters and state (8-bit codes exactly) equal the one-process run.
    Gradient centralization (row means, row-local) takes the kernel too. ZeRO-3 cuts every
    parameter: 4-bit state takes the kernel in stages there (the column maxima of its second moment
    completed between a recording kernel and the writing one:
    hfoptim.core.compiled_step.shard_staged). Here ZeRO-1/2 partitions end between parameters, so
    each is held whole by one process, stepped there as on one process and skipped by the other,
    which receives its whole-tensor state (factored column sums, 4-bit column maxima) after the step
    (hfoptim.core.uncut): no stages."""
    cases = ["adamw_8bit", "adamw_bf16", "adamw_factored", "adamw_gc", "adamw_4bit"]
    args = ["--stage", str(stage), "--cases", ",".join(cases), "--compile", "on", "--shapes", "rows"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == sorted(cases)
    assert all(r["detail"]["compiled_steps_all_ranks"] > 0 for r in summary["results"])
    staged = {r["case"]: r["detail"]["staged_steps_all_ranks"] for r in summary["results"]}
    assert not any(n for case, n in staged.items() if case != "adamw_4bit"), staged
    if stage == 3:
        assert staged["adamw_4bit"] > 0, staged
    else:
        assert staged["adamw_4bit"] == 0, staged
        for r in summary["results"]:
            assert r["detail"]["uncut_owned_all_ranks"] > 0 and r["detail"]["uncut_elsewhere_all_ranks"] > 0, r


@pytest.mark.slow
def test_zero2_segment_cut_inside_a_row_steps_its_whole_rows_in_the_kernel(tmp_path):
    """ZeRO-2 on 2 processes over the default shapes: the partition boundary falls inside row 32
    of "big" (67x97), so each process's segment of it ends (or starts) with a partial row. That
    row takes the plain path (its cut 8-bit block completed over the processes) and the other
    rows -- 32 rows on one process, 34 on the other -- take the compiled kernel, as row pieces
    (hfoptim.core.chunking.cut_row_parts); parameters and state (8-bit codes exactly) equal the
    one-process run. Each process steps the partial row (whose cut block's maxima are a
    collective) before any kernel: in the partition's order process 0 would run its kernels
    first and process 1 after that collective, one waiting for the other
    (hfoptim.core.chunking.collectives_first)."""
    args = ["--stage", "2", "--cases", "adamw_8bit", "--compile", "on"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == ["adamw_8bit"]
    detail = summary["results"][0]["detail"]
    shapes = {tuple(s) for s in detail["compiled_shapes_all_ranks"]}
    # rows of 97 are rows of one 8-bit block: the 32 and the 34 whole rows take the kernel of any
    # row count of that length
    assert (None, 97) in shapes
    assert detail["compiled_steps_all_ranks"] > 0
    assert detail["kernels_before_collectives_all_ranks"] == 0


@pytest.mark.slow
def test_zero2_auto_compiles_many_small_tensors_of_one_shape_and_matches_one_process(tmp_path):
    """compile='auto' (the default) under ZeRO-2 on 2 processes over 32 matrices of 16x256 beside
    the default shapes (tests/distributed/common.py: MANY_SHAPES): each is under 65536 elements,
    but their group steps 32 of their shape with 8-bit state, so the kernel of any row count steps
    them (held whole by the process owning them, or the whole rows of a segment the boundary
    cuts); every process counts every parameter's segment, an empty one too, so the processes
    agree. The default shapes keep the plain path, and parameters and state equal the
    one-process run."""
    args = ["--stage", "2", "--cases", "adamw_8bit", "--compile", "auto", "--shapes", "many"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=600)
    assert summary["ran"] == ["adamw_8bit"]
    detail = summary["results"][0]["detail"]
    shapes = {tuple(s) for s in detail["compiled_shapes_all_ranks"]}
    assert shapes == {(None, 256)}, shapes  # rows of one block, by the kernel of any row count
    assert detail["compiled_steps_all_ranks"] >= 31 * 3, detail


@pytest.mark.slow
def test_zero3_partitions_of_whole_rows_are_stepped_in_row_pieces(tmp_path):
    """ZeRO-3 over row-aligned shapes: each process's 34 rows of "big" (68x97) exceed a
    2000-byte ``chunk_bytes`` budget, 2000 elements for the kernel in rows of one block, which
    holds a byte per element (hfoptim.core.compiled_step.block_rows_bytes), and are stepped as
    row pieces (more kernel calls than the same run without the budget), and parameters and
    state still equal the one-process run."""
    base = ["--stage", "3", "--cases", "adamw_8bit", "--compile", "on", "--shapes", "rows"]
    counts = []
    for extra in ([], ["--chunk-bytes", "2000"]):
        summary = run_worker(torchrun(2), "zero_worker.py", base + extra, tmp_path / "out.json", timeout=1200)
        assert summary["ran"] == ["adamw_8bit"]
        counts.append(summary["results"][0]["detail"]["compiled_steps_all_ranks"])
    whole, pieces = counts
    assert pieces > whole > 0


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "shard_pieces", "uncut_pieces"), [(2, 0, 24), (3, 48, 0)])
def test_zero_smmf_segments_of_whole_matrix_rows_are_stepped_in_row_pieces(tmp_path, stage, shard_pieces, uncut_pieces):
    """SMMF state under ZeRO on 2 processes over SQUARE_SHAPES with a 2000-element budget.
    The 2 processes share the budget, so a process's pieces take 1000 elements. ZeRO-2: the
    flat partition gives "big" (64x96) whole to process 0, which steps it as a parameter held
    whole (hfoptim.core.uncut) in 8 pieces (the other skips it and receives its column factor
    after the step), and cuts "emb" inside a matrix row (plain path, whole). ZeRO-3: each
    parameter is cut in half, on matrix rows: 4 pieces per segment of each. 3 steps; parameters
    and state equal the one-process run."""
    cases = ["smmf", "adamw_smmf", "smmf_8bit"]
    args = ["--stage", str(stage), "--cases", ",".join(cases), "--chunk-bytes", str(64 * 2000)]
    args += ["--shapes", "square", "--compile", "off"]
    summary = run_worker(torchrun(2), "zero_worker.py", args, tmp_path / "out.json", timeout=600)
    assert summary["ran"] == sorted(cases)
    detail = {r["case"]: r["detail"] for r in summary["results"]}
    counts = {case: (d["shard_pieces_all_ranks"], d["uncut_pieces_all_ranks"]) for case, d in detail.items()}
    assert counts == dict.fromkeys(cases, (shard_pieces, uncut_pieces))


def test_finding_the_zero_optimizer_skips_dead_weak_proxies():
    """The implicit attach looks through the heap for the ZeRO optimizer wrapping the engine; a
    weak proxy whose referent is gone (left by an earlier DeepSpeed engine in the same process)
    raised ReferenceError there and crashed the next engine's first step."""
    import weakref

    import torch

    import hfoptim
    from hfoptim.distributed.zero import _wraps

    class Holder:
        pass

    engine = hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw")
    target = Holder()
    proxy = weakref.proxy(target)
    del target
    with pytest.raises(ReferenceError):
        isinstance(proxy, Holder)
    assert _wraps(proxy, (Holder,), engine) is False


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "budget"), [(2, 50), (3, 2000)])
def test_zero_4bit_partitions_of_whole_rows_are_stepped_in_staged_row_pieces(tmp_path, stage, budget):
    """4-bit state over row-aligned shapes, stepped as row pieces in stages when a partition's
    rows exceed the budget. ZeRO-2 with a 50-element budget: no boundary cuts a parameter,
    "emb", "lin_w" and "conv" lie in the first process's partition and are cut into pieces there
    as parameters held whole (hfoptim.core.uncut: without the budget each takes one kernel, no
    stages), the other process skipping them and receiving their column maxima after the step;
    ZeRO-3 with 2000 elements: each process's 34 rows of "big", whose column maxima are completed
    over the processes. More recording kernels than without the budget; parameters and state
    equal the one-process run."""
    base = ["--stage", str(stage), "--cases", "adamw_4bit", "--compile", "on", "--shapes", "rows"]
    recorded = []
    for extra in ([], ["--chunk-bytes", str(64 * budget)]):
        summary = run_worker(torchrun(2), "zero_worker.py", base + extra, tmp_path / "out.json", timeout=1200)
        assert summary["ran"] == ["adamw_4bit"]
        recorded.append(summary["results"][0]["detail"]["staged_recordings_all_ranks"])
    whole, pieces = recorded
    assert pieces > whole >= 0
    assert whole > 0 if stage == 3 else whole == 0
