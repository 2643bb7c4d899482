"""Bounded step memory (hfoptim.core.chunking): tensors stepped in groups and in row pieces.

A chunked step must compute exactly what the unchunked step computes (parameters and every
state tensor bit for bit, on both engine paths; to the last bit of torch's vector and scalar
code for transcendental functions; SMMF's column sums summed in another order), cut only what
it may cut, and keep the step's
temporaries within ``chunk_bytes``: measured as the peak of live bytes allocated by torch during
one step (the profiler's memory events), on the 32000x768 embedding the issue measured.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import hfoptim
from hfoptim.core import chunking, compiled_step

#: cut into row pieces (2-D, 3-D), not cut (1-D, small), rows of a short 8-bit block
SHAPES = [(300, 300), (48, 1000), (60, 7, 80), (5000,), (8, 8)]
#: pieces of at most 20000 elements
SMALL = chunking.TRANSIENT_BYTES_PER_ELEMENT * 20_000
HP = dict(lr=3e-3, weight_decay=0.05, state_min_numel=256)
RULE_HP = {
    "adamw": dict(HP, betas=(0.85, 0.98), eps=1e-7),
    "ademamix": dict(HP, betas=(0.85, 0.98, 0.995), alpha=3.0, t_alpha=5.0, t_beta3=5.0),
    "adan": dict(HP, betas=(0.9, 0.9, 0.98)),
    "adapnm": dict(HP, betas=(0.85, 0.98, 0.8)),
    "diffgrad": dict(HP, betas=(0.85, 0.98)),
    "adafactor": dict(lr=3e-3, weight_decay=0.05, beta1=0.9, state_min_numel=256),
}


def _run(name: str, chunk_bytes: int, foreach: bool = True, steps: int = 3, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    hp = RULE_HP[name.split("_")[0]]
    opt = hfoptim.create_optimizer(params, name, foreach=foreach, chunk_bytes=chunk_bytes, **hp, **options)
    for t in range(1, steps + 1):
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _assert_same(a, b, rtol: float = 0.0, atol: float = 0.0):
    """Parameters and state equal (integer state always bit for bit; floats within the given
    tolerances, none by default)."""
    (pa, oa), (pb, ob) = a, b
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        assert set(oa.state[p]) == set(ob.state[q])
        for key, value in oa.state[p].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, ob.state[q][key], rtol=rtol, atol=atol, msg=key)
            else:
                assert torch.equal(value, ob.state[q][key]), key


#: rules with a transcendental function of the gradient (diffGrad's sigmoid): torch computes it
#: with vector code in the body of a loop and scalar code in its tail, which differ in the last
#: bit, and a piece's tail is not the whole tensor's (seen on a 2-core AMD EPYC with AVX-512)
LAST_BIT = {"diffgrad": dict(rtol=2e-7, atol=1e-9)}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "name",
    [
        "adamw_8bit",
        "ademamix_8bit",
        "adan_8bit",
        "adapnm_8bit",
        "adamw_bf16",
        "adamw",
        "diffgrad",
        "adamw_gc",
        # per-row norms of matrices (a vector's unit is the whole vector: not cut)
        "adamw_agc",
        "adamw_softclip",
        "adamw_normloss",
    ],
)
def test_a_step_in_pieces_equals_the_whole_step(name, foreach, monkeypatch):
    cut, original = [], chunking.pieces

    def spy(engine, group, unit, rows, *rest):
        cut.append(unit.view.global_shape)
        return original(engine, group, unit, rows, *rest)

    monkeypatch.setattr(chunking, "pieces", spy)
    chunked = _run(name, SMALL, foreach, compile="off")
    assert sorted(map(tuple, cut)) == sorted([(300, 300), (48, 1000), (60, 7, 80)] * 3)  # 3 steps
    monkeypatch.undo()
    _assert_same(chunked, _run(name, 0, foreach, compile="off"), **LAST_BIT.get(name, {}))


@pytest.mark.parametrize("name", ["adamw_smmf", "ademamix_smmf"])
def test_smmf_pieces_complete_the_column_sums_after_the_last_piece(name, monkeypatch):
    """SMMF's ``c`` is the normalized column sums of the whole square matrix: pieces are cut where
    the matrix's rows and the sign bytes are cut too, add their column sums to one accumulator,
    and ``c`` is stored after the last piece. Equal to the whole step up to the rounding of the
    column sums' order; the sign bits identical."""
    cut, original = [], chunking.pieces

    def spy(engine, group, unit, rows, *rest):
        cut.append(unit.view.global_shape)
        return original(engine, group, unit, rows, *rest)

    monkeypatch.setattr(chunking, "pieces", spy)
    chunked = _run(name, SMALL, compile="off")
    assert sorted(map(tuple, cut)) == sorted([(300, 300), (48, 1000), (60, 7, 80)] * 3)  # 3 steps
    monkeypatch.undo()
    _assert_same(chunked, _run(name, 0, compile="off"), rtol=1e-5, atol=1e-6)


def test_smmf_cuts_only_on_rows_of_its_square_matrix():
    from hfoptim.core.rule import FIRST_MOMENT, Slot
    from hfoptim.core.stats import ParamView
    from hfoptim.state.smmf import SMMF

    slot = Slot("exp_avg", FIRST_MOMENT)
    # (300, 300) is seen as 300 x 300: pieces of even rows keep the 8-element sign bytes whole
    assert SMMF().row_granularity(slot, ParamView(global_shape=torch.Size((300, 300)))) == 2
    # 32000 x 768 is seen as 5120 x 4800: a matrix row ends every 25 parameter rows
    assert SMMF().row_granularity(slot, ParamView(global_shape=torch.Size((32000, 768)))) == 25
    # rows of 1013 elements (a prime) seen as 1013 x 1009: no matrix row ends on a parameter
    # row before the last
    assert SMMF().row_granularity(slot, ParamView(global_shape=torch.Size((1009, 1013)))) == 0


@pytest.mark.parametrize("name", ["adafactor", "adamw_trust", "adamw_cautious", "adamw_factored", "adamw_gradnorm"])
def test_whole_tensor_statistics_keep_a_tensor_whole(name, monkeypatch):
    """Rules and modifiers that need a statistic of the whole tensor, and state that mixes rows,
    are only grouped, never cut; the result is still that of the unchunked step."""
    monkeypatch.setattr(chunking, "pieces", lambda *a: pytest.fail("cut a tensor that needs whole statistics"))
    chunked = _run(name, SMALL)
    monkeypatch.undo()
    _assert_same(chunked, _run(name, 0))


def test_a_piece_refuses_whole_tensor_statistics():
    stats = chunking.PieceStats()
    with pytest.raises(RuntimeError, match="whole tensor"):
        stats.norm([torch.ones(3, 4)], [None])


def test_rows_per_piece_prefers_equal_pieces():
    assert chunking.rows_per_piece(32000, 768, (64 << 20) // 64) == 1280  # 25 equal pieces
    assert chunking.rows_per_piece(10, 100, 300) == 2  # 5 pieces of 2 rows rather than 3+3+3+1
    assert chunking.rows_per_piece(7, 100, 300) == 3  # a prime: 3+3+1
    assert chunking.rows_per_piece(4, 1000, 10) == 1  # a row is the smallest piece
    # pieces of a multiple of the storage forms' granularity (SMMF: 25 rows of 32000x768)
    assert chunking.rows_per_piece(32000, 768, (64 << 20) // 64, 25) == 1000
    assert chunking.rows_per_piece(7, 100, 300, 2) == 2  # 2+2+2+1
    assert chunking.rows_per_piece(10, 1000, 10, 3) == 3  # the granularity is the smallest piece


def _memory_events(fn) -> list:
    """The profiler's memory events while ``fn`` ran, in order: every allocation (positive
    ``nbytes()``) and free (negative) of torch's CPU and CUDA allocators."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return sorted(events, key=lambda e: e.start_ns())


def _peak_bytes(fn) -> int:
    """Peak of the bytes torch allocated and still held while ``fn`` ran."""
    live = peak = 0
    for event in _memory_events(fn):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.slow
def test_an_embedding_step_stays_within_the_chunk_budget():
    """One plain-path adamw_8bit step of a 32000x768 embedding: about 48 bytes of temporaries
    per element unchunked (1.1 GiB), within the default budget (64 MiB on a CPU) in pieces; same
    numbers."""
    runs = []
    for chunk_bytes in (None, 0):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(32000, 768))
        opt = hfoptim.create_optimizer([p], "adamw_8bit", chunk_bytes=chunk_bytes, compile="off", lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()  # creates the state (kept, not transient)
        p.grad = torch.randn_like(p)
        runs.append((p, opt, _peak_bytes(opt.step)))
    (p, opt, peak), (q, ref, unchunked_peak) = runs
    assert peak <= chunking.DEFAULT_CHUNK_BYTES, peak
    assert unchunked_peak > 16 * p.numel()  # the measure sees the unchunked temporaries
    assert torch.equal(p, q)
    for key, value in ref.state[q].items():
        assert torch.equal(opt.state[p][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "dtype", "calls"),
    [
        ("adamw_8bit", torch.float32, 1),
        ("ademamix_8bit", torch.float32, 1),
        ("adan_8bit", torch.float32, 1),
        # fp32 copies of the bf16 parameter and gradient: 1 + 8 bytes per element, 4 pieces
        ("adamw_8bit", torch.bfloat16, 4),
    ],
)
def test_the_kernel_in_rows_of_one_block_steps_an_embedding_in_calls_of_its_temporaries(name, dtype, calls):
    """The compiled 8-bit step in rows of one block keeps what it computes in buffers of one
    block and allocates one scale per block and slot (and fp32 copies of a bf16 parameter and
    gradient): its calls are sized by that bound (compiled_step.block_rows_bytes), not by the
    plain path's 64 bytes per element. The 32000x768 embedding is one call within the default
    budget (25 on the plain path), the bf16 one four; the step holds at most the bound, and it
    computes what its kernel computes in 25 pieces (a budget of the bound times 1280 rows)."""
    bound = 1 if dtype == torch.float32 else 9
    compiled_step.reset()
    runs = []
    try:
        for chunk_bytes in (None, bound * 1280 * 768):
            torch.manual_seed(0)
            p = torch.nn.Parameter(torch.randn(32000, 768, dtype=dtype))
            opt = hfoptim.create_optimizer([p], name, chunk_bytes=chunk_bytes, compile="on", lr=1e-3)
            p.grad = torch.randn_like(p)
            opt.step()  # creates the state and compiles
            p.grad = torch.randn_like(p)
            group = opt.param_groups[0]
            units = opt.layout.units(opt, group)
            assert compiled_step.block_rows_bytes(opt, group, units, opt.layout.stats) == [bound]
            before = sum(compiled_step.calls.values())
            runs.append((p, opt, _peak_bytes(opt.step), sum(compiled_step.calls.values()) - before))
    finally:
        compiled_step.reset()
    (p, opt, peak, stepped), (q, ref, _, pieces) = runs
    assert (stepped, pieces) == (calls, 25)
    assert peak <= min(bound * p.numel(), chunking.DEFAULT_CHUNK_BYTES), peak
    assert torch.equal(p, q)
    for key, value in ref.state[q].items():
        assert torch.equal(opt.state[p][key], value), key


def test_the_default_chunk_budget_depends_on_the_device():
    """``chunk_bytes=None`` (the default) bounds a call at 64 MiB of temporaries on a CPU and at
    1 GiB on a GPU, whose per-call host cost outweighs a small piece's work; a number given is
    the budget on every device; anything else is refused, naming the option."""
    per_element = chunking.TRANSIENT_BYTES_PER_ELEMENT
    default = {"chunk_bytes": None}
    assert chunking.chunk_numel(default, torch.device("cpu")) == (64 << 20) // per_element
    assert chunking.chunk_numel(default, torch.device("cuda", 1)) == (1 << 30) // per_element
    assert chunking.chunk_numel({"chunk_bytes": 1 << 20}, torch.device("cuda")) == (1 << 20) // per_element
    assert chunking.chunk_numel({"chunk_bytes": 0}, torch.device("cuda")) is None
    p = torch.nn.Parameter(torch.zeros(4, 4))
    assert hfoptim.create_optimizer([p], "adamw_8bit").param_groups[0]["chunk_bytes"] is None
    for bad in (-1, 1.5, "64MiB", True):
        with pytest.raises(ValueError, match="chunk_bytes"):
            hfoptim.create_optimizer([p], "adamw_8bit", chunk_bytes=bad)


@pytest.mark.slow
def test_an_smmf_embedding_step_stays_within_the_chunk_budget():
    """adamw_smmf on the 32000x768 embedding: whole, its step holds the decoded fp32 moments of
    the tensor and more (about 20 bytes per element, 0.5 GiB); in pieces of whole rows of its
    square matrix, within the default budget, on the plain path and in the compiled kernels
    that ``compile="auto"`` gives its pieces."""
    for mode in ("auto", "off"):
        compiled_step.reset()
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(32000, 768))
        opt = hfoptim.create_optimizer([p], "adamw_smmf", lr=1e-3, compile=mode)
        p.grad = torch.randn_like(p)
        opt.step()  # creates the state
        p.grad = torch.randn_like(p)
        before = sum(compiled_step.calls.values())
        assert _peak_bytes(opt.step) <= chunking.DEFAULT_CHUNK_BYTES, mode
        assert (sum(compiled_step.calls.values()) - before > 1) == (mode == "auto")


def test_smmf_kernels_leave_their_moments_in_one_workspace_of_the_step():
    """The compiled SMMF step of pieces of several sizes writes each piece's new moments into the
    optimizer step's workspace (compiled_step.Workspace), and its encode overwrites them with
    their magnitudes and packs the signs in the mask's bytes: one allocation of a piece's size
    in the whole step (the workspace), where fresh moments and magnitudes of each piece's size
    left the process's heap in pieces of many sizes; the workspace is gone after the step. The
    numbers are the plain path's."""
    # fp64: (2 + 4) * 8 + 4 + 1 = 53 bytes of temporaries an element (block_rows_bytes), pieces
    # of at most 100 rows
    shapes, budget = [(512, 256), (96, 256), (384, 256)], 53 * 256 * 100
    runs, sizes, pieces = {}, [], 0
    for mode in ("on", "off"):
        compiled_step.reset()
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        opt = hfoptim.create_optimizer(params, "adamw_smmf", compile=mode, chunk_bytes=budget, **RULE_HP["adamw"])
        for t in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1
            if mode == "on" and t == 2:
                before = sum(compiled_step.calls.values())
                sizes = [e.nbytes() for e in _memory_events(opt.step) if e.nbytes() > 0]
                pieces = sum(compiled_step.calls.values()) - before
            else:
                opt.step()
        runs[mode] = (params, opt)
    compiled_step.reset()
    assert pieces >= 10  # 6 + 1 + 4 pieces in kernels
    piece_bytes = 8 * 256 * 32  # the smallest piece (the (96, 256) tensor's square matrix has 384 columns)
    assert sum(size >= piece_bytes for size in sizes) == 1, sorted(sizes)[-8:]
    assert runs["on"][1]._workspace is None
    _assert_same(runs["on"], runs["off"], atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "options"), [("adamw_8bit", {}), ("ademamix_8bit", {}), ("adamw_8bit", {"agc": 0.05})]
)
def test_compiled_pieces_equal_the_compiled_whole_step(name, options):
    """The compiled kernel of a piece (rows from 0, the whole shape's storage choice) computes
    what the kernel of the whole tensor computes; with AGC too (row norms of each piece's rows)."""
    compiled_step.reset()
    try:
        chunked = _run(name, SMALL, compile="on", **options)
        counts = {key[1]: n for key, n in compiled_step.calls.items()}
        assert counts[(60, 300)] == 5 * 3 and counts[(16, 1000)] == 3 * 3  # 5 and 3 pieces, 3 steps
        whole = _run(name, 0, compile="on", **options)
    finally:
        compiled_step.reset()
    _assert_same(chunked, whole)


def test_4bit_second_moments_stay_whole_on_the_plain_path(monkeypatch):
    """The 4-bit second moment's rank-1 scales take column maxima of the whole NEW moment: the
    plain path (one pass per operation) keeps such a tensor whole; the result is the unchunked
    step's."""
    monkeypatch.setattr(chunking, "pieces", lambda *a: pytest.fail("cut a 4-bit rank-1 tensor on the plain path"))
    chunked = _run("adamw_4bit", SMALL, compile="off")
    monkeypatch.undo()
    _assert_same(chunked, _run("adamw_4bit", 0, compile="off"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_4bit", "ademamix_4bit"])
def test_compiled_4bit_pieces_run_in_stages_and_equal_the_whole_step(name):
    """On the compiled path a 4-bit tensor over the budget is stepped as row pieces in stages
    (:class:`~hfoptim.core.stats.StagedPieceStats`): every piece's recording kernel returns its
    part of the second moment's column maxima (of 2-D and 3-D tensors), the parts are combined,
    and every piece's writing kernel codes its rows with them; the pieces decode with the old
    maxima (copies), which are replaced after the last piece. Codes, scales and parameters
    equal the compiled step of the whole tensors, bit for bit."""
    compiled_step.reset()
    before = chunking.planned["staged"]
    try:
        chunked = _run(name, SMALL, compile="on")
        recorded = {key[1]: n for key, n in compiled_step.recorded.items()}
        written = {key[1]: n for key, n in compiled_step.calls.items()}
        whole = _run(name, 0, compile="on")
    finally:
        compiled_step.reset()
    # (300, 300) in 5 pieces of 60 rows, (48, 1000) in 3 of 16, (60, 7, 80) in 2 of 30; 3 steps
    assert chunking.planned["staged"] - before == (5 + 3 + 2) * 3
    for shape, count in {(60, 300): 5 * 3, (16, 1000): 3 * 3, (30, 7, 80): 2 * 3}.items():
        assert recorded[shape] == count and written[shape] == count, shape
    _assert_same(chunked, whole)


def test_staged_pieces_run_uncompiled_after_a_failed_compilation(monkeypatch):
    """A staged piece whose compilation fails runs its stages uncompiled (the failure reported
    once): no piece goes to the plain path, which cannot take a statistic of the whole tensor,
    and the step is the whole tensor's."""

    def fail(key, *args):
        raise RuntimeError("no compiler here")

    compiled_step.reset()
    monkeypatch.setattr(compiled_step, "_run", fail)
    before = chunking.planned["staged"]
    try:
        with pytest.warns(RuntimeWarning, match="the fused optimizer step failed to compile") as warned:
            chunked = _run("adamw_4bit", SMALL, compile="on", steps=1)
        assert len([w for w in warned if "the fused optimizer step failed to compile" in str(w.message)]) == 1
        assert chunking.planned["staged"] - before == 5 + 3 + 2
    finally:
        compiled_step.reset()
    monkeypatch.undo()
    _assert_same(chunked, _run("adamw_4bit", 0, compile="off", steps=1), rtol=1e-6, atol=1e-7)


def test_a_parameter_one_process_holds_whole_counts_n_times_in_a_call(monkeypatch):
    """Calls are cut by global sizes (the same on every process); a parameter that one of N
    processes holds whole (a ZeRO partition's: no process boundary inside it) counts N times,
    so its process's calls hold at most limit / N of its elements, as a shard's of a parameter
    the N processes share."""
    from hfoptim.core.stats import ParamView

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    shape = torch.Size((768, 768))
    owned = ParamView(global_shape=shape, group="a group")
    shared = ParamView(global_shape=shape, local_rows=384, cuts=(384 * 768,), group="a group")
    assert chunking.call_numel(owned) == 2 * 768 * 768
    assert chunking.call_numel(shared) == 768 * 768
    assert chunking.call_numel(ParamView(global_shape=shape)) == 768 * 768
