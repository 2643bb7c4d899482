"""Bounded step memory (hfoptim.core.chunking): tensors stepped in groups and in row pieces.

A chunked step must compute exactly what the unchunked step computes (parameters and every
state tensor bit for bit, on both engine paths), cut only what it may cut, and keep the step's
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


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert set(oa.state[p]) == set(ob.state[q])
        for key, value in oa.state[p].items():
            assert torch.equal(value, ob.state[q][key]), key


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "name",
    ["adamw_8bit", "ademamix_8bit", "adan_8bit", "adapnm_8bit", "adamw_bf16", "adamw", "diffgrad", "adamw_gc"],
)
def test_a_step_in_pieces_equals_the_whole_step(name, foreach, monkeypatch):
    cut, original = [], chunking.pieces

    def spy(engine, group, unit, rows):
        cut.append(unit.view.global_shape)
        return original(engine, group, unit, rows)

    monkeypatch.setattr(chunking, "pieces", spy)
    chunked = _run(name, SMALL, foreach, compile="off")
    assert sorted(map(tuple, cut)) == sorted([(300, 300), (48, 1000), (60, 7, 80)] * 3)  # 3 steps
    monkeypatch.undo()
    _assert_same(chunked, _run(name, 0, foreach, compile="off"))


@pytest.mark.parametrize("name", ["adafactor", "adamw_trust", "adamw_cautious", "adamw_factored", "adamw_agc"])
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


def _peak_bytes(fn) -> int:
    """Peak of the bytes torch allocated and still held while ``fn`` ran (profiler memory
    events: every allocation and free of torch's CPU and CUDA allocators)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.slow
def test_an_embedding_step_stays_within_the_chunk_budget():
    """One plain-path adamw_8bit step of a 32000x768 embedding: about 48 bytes of temporaries
    per element unchunked (1.1 GiB), within the default 64 MiB budget in pieces; same numbers."""
    runs = []
    for chunk_bytes in (chunking.DEFAULT_CHUNK_BYTES, 0):
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
@pytest.mark.parametrize("name", ["adamw_8bit", "ademamix_8bit"])
def test_compiled_pieces_equal_the_compiled_whole_step(name):
    """The compiled kernel of a piece (rows from 0, the whole shape's storage choice) computes
    what the kernel of the whole tensor computes."""
    compiled_step.reset()
    try:
        chunked = _run(name, SMALL, compile="on")
        counts = {key[1]: n for key, n in compiled_step.calls.items()}
        assert counts[(60, 300)] == 5 * 3 and counts[(16, 1000)] == 3 * 3  # 5 and 3 pieces, 3 steps
        whole = _run(name, 0, compile="on")
    finally:
        compiled_step.reset()
    _assert_same(chunked, whole)
