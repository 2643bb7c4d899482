"""Kernels for any number of rows (hfoptim.core.compiled_step): tensors of two or more dimensions
held whole, of several shapes in one call, share one compiled kernel per row shape
(``shape[1:]``), options and storage form, instead of one per shape; under ``compile="auto"`` the
small tensors of a call join the kernel that a large tensor of theirs compiled.

The numbers are those of a kernel compiled for the one shape (the same traced code; the sizes
are read at run time instead of baked in): checked bit for bit here, and against the plain path
and the float64 references by the rest of the suite, which now runs these kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import hfoptim
from hfoptim.core import compiled_step
from tests.harness import DEVICE

HP = dict(lr=3e-3, weight_decay=0.05, eps=1e-7)
#: rows of 64 elements (whole 8-bit blocks: 1 per row; 4-bit: 2); each over state_min_numel
SHAPES = [(128, 64), (192, 64), (320, 64)]


def _run(name: str, shapes, compile: str, static: bool = False, steps: int = 3):
    """``steps`` steps of ``name`` on fixed gradients; with ``static`` the kernels are compiled
    per shape, as before kernels of any rows."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in shapes]
    opt = hfoptim.create_optimizer(params, name, compile=compile, **HP)
    grads = [[torch.randn_like(p) for p in params] for _ in range(steps)]
    with pytest.MonkeyPatch.context() as patch:
        if static:
            patch.setattr(compiled_step, "_any_rows", lambda *args: False)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
    engine = getattr(opt, "optimizer", opt)
    return params, [engine.state[p] for p in params]


@pytest.mark.parametrize(
    "name", ["adamw_8bit", *(pytest.param(n, marks=pytest.mark.slow) for n in ("ademamix_8bit", "adamw_4bit", "adamw"))]
)
def test_one_kernel_for_every_row_count_same_numbers(name):
    """Three shapes of 64-element rows: one graph (no recompilation for the other two), three
    parameters stepped by it at every step, and parameters and state bit for bit those of
    kernels compiled for each shape."""
    compiled_step.reset()
    counters.clear()
    params, states = _run(name, SHAPES, "on")
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, dict(counters["stats"])
    assert sorted(key[1] for key in compiled_step.calls) == sorted(SHAPES)
    assert sum(compiled_step.calls.values()) == 3 * len(SHAPES)

    compiled_step.reset()
    counters.clear()
    static_params, static_states = _run(name, SHAPES, "on", static=True)
    assert counters["stats"]["unique_graphs"] == len(SHAPES)
    for p, q, state, static_state in zip(params, static_params, states, static_states):
        assert torch.equal(p, q)
        assert state.keys() == static_state.keys()
        for key, value in state.items():
            assert torch.equal(value, static_state[key]), key


def test_auto_small_tensors_join_the_kernel_of_a_large_one():
    """``compile="auto"``: a tensor of AUTO_MIN_NUMEL elements or more compiles its kernel; the
    small tensors of its row shape in the same call take it too (no compilation of their own),
    and a small tensor of another row shape stays on the plain path. Their numbers are those of
    ``compile="on"``, which runs the same kernel."""
    large = (compiled_step.AUTO_MIN_NUMEL // 64 + 8, 64)
    shapes = [(128, 64), large, (96, 48), (64, 64)]
    compiled_step.reset()
    counters.clear()
    params, states = _run("adamw_8bit", shapes, "auto")
    assert sorted(key[1] for key in compiled_step.calls) == sorted([(128, 64), large, (64, 64)])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

    compiled_step.reset()
    on_params, on_states = _run("adamw_8bit", shapes, "on")
    for i, (p, q) in enumerate(zip(params, on_params)):
        if shapes[i] == (96, 48):  # plain here, a kernel there: equal up to rounding
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            continue
        assert torch.equal(p, q), shapes[i]
        for key, value in states[i].items():
            assert torch.equal(value, on_states[i][key]), (shapes[i], key)


def test_a_single_shape_keeps_its_own_kernel():
    """A kind of a single shape in its call keeps a kernel of that shape (cheaper to compile and
    to load from the cache than one of any rows)."""
    compiled_step.reset()
    _run("adamw_8bit", [(128, 64), (128, 64)], "on", steps=1)
    assert [key[1] for key in compiled_step._compiled] == [(128, 64)]


def test_auto_small_tensors_alone_stay_plain():
    """Without a large tensor of their row shape in the call, small tensors pay no compilation."""
    compiled_step.reset()
    _run("adamw_8bit", [(128, 64), (192, 64)], "auto", steps=1)
    assert not compiled_step.calls
