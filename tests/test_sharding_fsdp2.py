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
on 3 processes. Whole matrix (``-m slow``): every registered name on 3 processes (uneven splits,
rows cut mid-row), every rule with every storage form ("forms") on 2.
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_worker, torchrun


def test_fsdp2_matches_one_process_fast_subset(tmp_path):
    summary = run_worker(torchrun(3), "fsdp2_worker.py", ["--cases", "fast"], tmp_path / "out.json", timeout=300)
    assert len(summary["ran"]) >= 10


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "cases"), [(3, "all"), (2, "forms")])
def test_fsdp2_matches_one_process_every_optimizer(tmp_path, nproc, cases):
    summary = run_worker(torchrun(nproc), "fsdp2_worker.py", ["--cases", cases], tmp_path / "out.json", timeout=900)
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


@pytest.mark.slow
@pytest.mark.parametrize("compile", ["on", "off"])
def test_fsdp2_large_shards_are_stepped_in_row_pieces(tmp_path, compile):
    """A shard whose step needs nothing of the other process (FSDP2 rows, whole 8-bit blocks) is
    stepped in row pieces of at most ``chunk_bytes`` worth of elements over the 2 processes: on
    the plain path (64 bytes per element) with a 2000-element budget, 1000 of each process's
    elements (10 rows of "big", 67x97), the process holding 34 rows steps them as 4 pieces (9,
    9, 9, 7), the one holding 33 as 4 too (9, 9, 9, 6). The compiled kernel steps "big" in rows
    of one block (97 elements: one short block a row), which holds a byte per element
    (hfoptim.core.compiled_step.block_rows_bytes): the same budget keeps each shard one call
    (tests/test_sharding_zero.py cuts such shards with a budget of their size). Parameters and
    state equal the one-process run (which cuts the whole tensor by the same rules)."""
    args = ["--cases", "adamw_8bit,ademamix_8bit", "--compile", compile, "--chunk-bytes", str(64 * 2000)]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == ["adamw_8bit", "ademamix_8bit"]
    if compile == "on":
        counts = {r["case"]: r["detail"]["compiled_steps_all_ranks"] for r in summary["results"]}
        # per step: emb, lin_w, conv on both processes, row1 on one, big as one call on each
        assert counts == {"adamw_8bit": (3 + 3 + 1 + 2) * 4, "ademamix_8bit": (3 + 3 + 1 + 2) * 4}
    else:
        pieces = {r["case"]: r["detail"]["shard_pieces_all_ranks"] for r in summary["results"]}
        assert pieces == {"adamw_8bit": (4 + 4) * 4, "ademamix_8bit": (4 + 4) * 4}, pieces


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "pieces"), [(2, 64), (3, {"smmf": 100, "adamw_smmf": 100, "smmf_8bit": 96})])
def test_fsdp2_smmf_shards_of_whole_matrix_rows_are_stepped_in_row_pieces(tmp_path, nproc, pieces):
    """SMMF state under FSDP2, over shapes whose row boundaries end rows of the square matrix
    (tests/distributed/common.py: SQUARE_SHAPES): each shard of "big" (64x96) and "emb" (96x80)
    exceeds its part of a 2000-element budget (2000/N elements on N processes) and is stepped in
    row pieces on the plain path (its rows of r and sign bits are its own), the pieces' column
    sums completed by one all-reduce per bucket (hfoptim.core.chunking.ShardSums), 4 steps.
    2 processes: 4 pieces per shard. 3 processes (666 elements): the 22-, 22- and 20-row shards
    of "big" (96 elements a row) in 4, 4 and 5 pieces, where smmf and adamw_smmf cut its rows in
    pairs (its square matrix is 96x64), in 4, 4 and 4 for smmf_8bit (single rows); the 32-row
    shards of "emb" in 4 each. Parameters, sign bits and factors equal the one-process run (which
    cuts the whole tensors)."""
    cases = ["smmf", "adamw_smmf", "smmf_8bit"]
    args = ["--cases", ",".join(cases), "--chunk-bytes", str(64 * 2000), "--shapes", "square", "--compile", "off"]
    summary = run_worker(torchrun(nproc), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=600)
    assert summary["ran"] == sorted(cases)
    expected = pieces if isinstance(pieces, dict) else dict.fromkeys(cases, pieces)
    assert {r["case"]: r["detail"]["shard_pieces_all_ranks"] for r in summary["results"]} == expected


@pytest.mark.slow
def test_fsdp2_smmf_shards_within_the_budget_are_stepped_as_one_piece(tmp_path):
    """SMMF shards of whole matrix rows that fit the default budget are stepped as one row piece
    of themselves (hfoptim.core.chunking._sums_by_pieces): their row sums are their own and their
    column sums completed with the bucket's in one all-reduce, not by two collectives per slot
    and call. None is cut; parameters, sign bits and factors equal the one-process run."""
    cases = ["smmf", "adamw_smmf"]
    args = ["--cases", ",".join(cases), "--shapes", "square", "--compile", "off"]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=600)
    assert summary["ran"] == sorted(cases)
    for r in summary["results"]:
        assert r["detail"]["shard_pieces_all_ranks"] == 0, r
        assert r["detail"]["shards_as_one_piece_all_ranks"] > 0, r


@pytest.mark.slow
def test_fsdp2_compiled_kernel_steps_the_shards_and_matches_one_process(tmp_path):
    """compile='on' (sharded and one-process runs): the fused kernel steps the local rows of every
    matrix (FSDP2 shards whole rows, so 8-bit blocks are whole) and the bf16 vectors; the 8-bit
    vectors, whose blocks a boundary cuts, keep the plain path beside them. The worker counts the
    kernels the sharded optimizer ran (hfoptim.core.compiled_step.calls) and fails when none did;
    parameters and state (8-bit codes exactly) equal the one-process run."""
    args = ["--cases", "adamw_8bit,adamw_bf16", "--compile", "on"]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == ["adamw_8bit", "adamw_bf16"]
    counts = {r["case"]: r["detail"]["compiled_steps_all_ranks"] for r in summary["results"]}
    # per step: emb, lin_w, conv, big on both processes, row1 on the one holding its row (4 steps)
    assert counts["adamw_8bit"] == (4 + 4 + 1) * 4
    assert counts["adamw_bf16"] > counts["adamw_8bit"]  # the vectors too


@pytest.mark.slow
def test_fsdp2_auto_compiles_many_small_tensors_of_one_shape_and_matches_one_process(tmp_path):
    """compile='auto' (the default) on 2 processes over 32 matrices of 16x256 beside the default
    shapes (tests/distributed/common.py: MANY_SHAPES): each is under 65536 elements, but their
    group steps 32 of their shape with 8-bit state, so every process steps its 8 rows of each in
    the kernel (hfoptim.core.compiled_step.AUTO_MIN_SHAPE_COUNT; both processes count the same
    units, so they agree; rows of one block: the kernel of any row count); the default shapes,
    one of a shape each, keep the plain path. The
    parameters and state (8-bit codes exactly) equal the one-process run."""
    args = ["--cases", "adamw_8bit", "--compile", "auto", "--shapes", "many"]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=600)
    assert summary["ran"] == ["adamw_8bit"]
    detail = summary["results"][0]["detail"]
    # their 8 local rows of one block each, by the kernel of any row count (None)
    assert {tuple(s) for s in detail["compiled_shapes_all_ranks"]} == {(None, 256)}
    assert detail["compiled_steps_all_ranks"] == 32 * 2 * 4  # 32 tensors, 2 processes, 4 steps


@pytest.mark.slow
def test_fsdp2_compiled_kernel_steps_4bit_shards_in_stages_and_matches_one_process(tmp_path):
    """compile='on': the 4-bit second moment of a matrix is scaled by the maxima of its columns
    over the whole tensor, a statistic of both processes. Each matrix shard takes the kernel in
    stages (hfoptim.core.compiled_step.shard_staged): a recording kernel returns this process's
    column maxima, one MAX all-reduce for the bucket completes them, and the writing kernel
    steps the shard with them as inputs. That is emb, lin_w, conv and big on both processes at
    each of 4 steps. No boundary cuts row1, a single row: the process holding it steps it as a
    parameter held whole, in one kernel, and the other skips it and receives its column maxima
    after the step (hfoptim.core.uncut). The vectors (a boundary cuts their 128-blocks) keep the
    plain path. Parameters and state (4-bit codes exactly, every process's column maxima) equal
    the one-process run."""
    args = ["--cases", "adamw_4bit,ademamix_4bit", "--compile", "on"]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == ["adamw_4bit", "ademamix_4bit"]
    for r in summary["results"]:
        detail = r["detail"]
        # staged, one recording each: 4 matrices x 2 processes x 4 steps; row1 held whole, 4 steps
        assert detail["staged_steps_all_ranks"] == detail["staged_recordings_all_ranks"] == 4 * 2 * 4, detail
        assert detail["compiled_steps_all_ranks"] == 4 * 2 * 4 + 4, detail
        assert detail["uncut_owned_all_ranks"] == detail["uncut_elsewhere_all_ranks"] == 4, detail


#: rules and modifiers whose statistics of the whole tensor are sums, norms or maxima, one of
#: each kind (a one-off run of nsgda, adamw_softclip, adamw_gradnorm and adamw_normloss passed too)
STAGED_CASES = [
    "lamb_8bit",  # the trust ratio's norms
    "adanorm_4bit",  # the gradient's norm, then the 4-bit column maxima after it (two stages)
    "sm3",  # the accumulators' per-dimension maxima
    "adamw_am",  # adaptive memory's inner products (three stages)
    "adamw_cautious",  # the mask's mean
]


@pytest.mark.slow
def test_fsdp2_compiled_kernel_steps_shards_whose_rules_need_norms_in_stages(tmp_path):
    """compile='on' on 2 processes: rules and modifiers whose step needs a norm, sum or maximum
    of the whole tensor (Rule.staged_stats, Modifier.staged_stats) take the kernel in stages on
    every shard of whole rows -- vectors included, whose 'rows' are elements -- each statistic
    completed by an all-reduce between a recording kernel and the next (several for a chain:
    adanorm_4bit's gradient norm, then its column maxima). Every parameter step of the sharded
    optimizer that took the kernel was staged but row1's, a single row that no boundary cuts,
    which the process holding it steps as a parameter held whole (hfoptim.core.uncut), and
    parameters and state equal the one-process run."""
    args = ["--cases", ",".join(STAGED_CASES), "--compile", "on"]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1500)
    assert summary["ran"] == sorted(STAGED_CASES)
    for r in summary["results"]:
        detail = r["detail"]
        held = detail["uncut_owned_all_ranks"]
        assert held > 0 and detail["staged_steps_all_ranks"] > 0, (r["case"], detail)
        assert detail["compiled_steps_all_ranks"] == detail["staged_steps_all_ranks"] + held, (r["case"], detail)
        assert detail["staged_recordings_all_ranks"] >= detail["staged_steps_all_ranks"], (r["case"], detail)


@pytest.mark.slow
def test_fsdp2_compiled_kernel_steps_factored_and_shared_shards_and_matches_one_process(tmp_path):
    """compile='on' on 3 processes (uneven rows, a matrix some process holds no row of): factored
    state takes the kernel on every shard dense AdamW does -- its row sums are the shard's own,
    its column sums are left partial by each kernel and completed by one all-reduce after the
    bucket's kernels, the empty shard sending zeros; shared state on the matrices (row means are
    local), not on the vectors (a vector's mean is a statistic of the whole vector). Parameters
    and state equal the one-process run."""
    args = ["--cases", "adamw,adamw_factored,adamw_shared", "--compile", "on"]
    summary = run_worker(torchrun(3), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == ["adamw", "adamw_factored", "adamw_shared"]
    counts = {r["case"]: r["detail"]["compiled_steps_all_ranks"] for r in summary["results"]}
    assert counts["adamw_factored"] == counts["adamw"] > 0
    assert 0 < counts["adamw_shared"] < counts["adamw"]


@pytest.mark.slow
def test_fsdp2_compiled_kernel_steps_per_row_modifiers_shards_and_matches_one_process(tmp_path):
    """Gradient centralization (row means) and AGC (row norms of matrices, a vector's norm) with
    compile='on' on CPU: a matrix's shard of whole rows takes the kernel alone, AGC's vectors in
    stages (their norm completed between kernels). The result equals the one-process run."""
    args = ["--cases", "adamw_gc,adamw_agc", "--compile", "on"]
    summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1200)
    assert summary["ran"] == ["adamw_agc", "adamw_gc"]
    detail = {r["case"]: r["detail"] for r in summary["results"]}
    assert detail["adamw_gc"]["compiled_steps_all_ranks"] > 0 == detail["adamw_gc"]["staged_steps_all_ranks"]
    agc = detail["adamw_agc"]
    assert 0 < agc["staged_steps_all_ranks"] < agc["compiled_steps_all_ranks"], agc


@pytest.mark.slow
def test_fsdp2_large_4bit_shards_are_stepped_in_staged_row_pieces(tmp_path):
    """A 4-bit shard over its part of the budget (each process's 34 or 33 rows of "big", 67x97,
    against 1000 elements) is stepped as row pieces in stages: each piece records its part of
    the second moment's column maxima, the parts are combined over the pieces and completed by
    one all-reduce, then every piece writes (more recording and writing kernels than the same
    run without the budget); parameters and state equal the one-process run."""
    counts = []
    for extra in ([], ["--chunk-bytes", str(64 * 2000)]):
        args = ["--cases", "adamw_4bit", "--compile", "on", *extra]
        summary = run_worker(torchrun(2), "fsdp2_worker.py", args, tmp_path / "out.json", timeout=1200)
        assert summary["ran"] == ["adamw_4bit"]
        detail = summary["results"][0]["detail"]
        counts.append((detail["compiled_steps_all_ranks"], detail["staged_recordings_all_ranks"]))
    (whole_written, whole_recorded), (piece_written, piece_recorded) = counts
    assert piece_written > whole_written > 0 and piece_recorded > whole_recorded > 0
