"""The kit's own trace of its kernels (hfoptim.core.tracing): make_fx and inductor, no dynamo.

What a kernel must keep from torch.compile: in-place writes reach the caller's tensors, the
output comes back in its structure, later calls compute with their own tensors (nothing of the
first call is baked in but what the key fixes), the kit's code takes its traced forms, and a
function make_fx cannot trace is reported as such (the compiled path then lets torch.compile
trace it: checked here against the kit's trace, bit for bit)."""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim.core import compiled_step, kernel_build, tracing
from hfoptim.core.tracing import TracedKernel, TraceFailed, is_traced

pytestmark = pytest.mark.skipif(not compiled_step.compile_available(torch.device("cpu")), reason="no torch.compile")


def _step(p, grad, state, scale, name):
    """In place: ``p -= scale * grad``, ``state["m"] += grad``; returns a constant and a tensor."""
    p.sub_(grad * scale)
    state["m"].add_(grad)
    return name, p.abs().amax()


def test_a_traced_kernel_writes_in_place_and_returns_its_structure():
    kernel = TracedKernel(_step, {})
    for seed in (0, 1):  # the second call computes with its own tensors, not the first call's
        torch.manual_seed(seed)
        p, grad, m = torch.randn(64, 32), torch.randn(64, 32), torch.randn(64, 32)
        scale = torch.tensor(0.5 + seed)
        expect_p, expect_m = p - grad * scale, m + grad
        # later calls take their tensors from where the first call's were, among other leaves
        name, amax = kernel(p, grad, {"count": 3, "m": m, "beta": 0.9}, scale, "label")
        assert name == "label"
        torch.testing.assert_close(p, expect_p)
        torch.testing.assert_close(m, expect_m)
        torch.testing.assert_close(amax, expect_p.abs().amax())


def test_a_kernel_returning_none_returns_none():
    def add_in_place(x, y):
        x.add_(y)

    x = torch.zeros(8)
    assert TracedKernel(add_in_place, {})(x, torch.ones(8)) is None
    torch.testing.assert_close(x, torch.ones(8))


def test_the_kit_code_sees_a_trace_only_while_tracing():
    seen = []

    def record(x):
        seen.append(is_traced())
        return x * 2

    assert not is_traced()
    TracedKernel(record, {})(torch.ones(4))
    assert seen == [True] and not is_traced() and not tracing._tracing


def test_a_function_make_fx_cannot_trace_is_reported():
    def data_dependent(x):
        if x.sum() > 0:  # a branch on a value: dynamo breaks the graph here, make_fx cannot
            return x * 2
        return x

    with pytest.raises(TraceFailed, match="data-dependent|Data dependent|symbolic"):
        TracedKernel(data_dependent, {})(torch.ones(4))
    assert not tracing._tracing


BIG = torch.ones(1 << 17)


def test_a_large_tensor_read_besides_the_arguments_is_no_constant_of_the_graph():
    """Dynamo makes such a tensor an input of the graph; make_fx would bake in its first value."""

    def reads_global(x):
        return x + BIG[: x.numel()].reshape(x.shape)

    with pytest.raises(TraceFailed, match="besides its arguments"):
        TracedKernel(reads_global, {})(torch.ones(8))


def _steps(name: str) -> tuple[list[torch.Tensor], list[dict]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 128)), torch.nn.Parameter(torch.randn(512))]
    opt = hfoptim.create_optimizer(params, name, compile="on", lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    states = [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]
    return [p.detach().clone() for p in params], states


#: rules and storage forms whose kernels both routes compile: the 8-bit forms in the fast suite
ROUTES = [
    "adamw_8bit",
    *(
        pytest.param(name, marks=pytest.mark.slow)
        for name in ("adamw", "ademamix_8bit", "adan_8bit", "adamw_bf16", "adamw_4bit", "adafactor", "lamb", "amos")
    ),
]


@pytest.mark.parametrize("name", ROUTES)
def test_where_the_kit_trace_fails_torch_compile_traces_the_same_kernel(name, monkeypatch):
    compiled_step.reset()
    kit = _steps(name)
    assert compiled_step.traced == {"kit": 2, "dynamo": 0}

    def fails(self, *args):
        raise TraceFailed("as a test")

    compiled_step.reset()
    monkeypatch.setattr(TracedKernel, "_trace", fails)
    dynamo = _steps(name)
    assert compiled_step.traced == {"kit": 0, "dynamo": 2}
    assert kernel_build._kit_codegen  # a failed trace is no failed compilation: the kit's code generation stays
    assert compiled_step._failed is None and sum(compiled_step.calls.values()) == 6
    # the same computation either way: the same numbers, bit for bit
    for p, q in zip(*(kit[0], dynamo[0])):
        assert torch.equal(p, q)
    for mine, theirs in zip(kit[1], dynamo[1]):
        for key, value in mine.items():
            assert torch.equal(theirs[key], value), key
    compiled_step.reset()


def test_where_inductor_fails_on_the_kit_graph_torch_compile_takes_every_kernel(monkeypatch, caplog):
    """A platform the kit's route does not serve (inductor fails on its graph, torch.compile's
    compiles): that kernel and every later one are traced by torch.compile, with the kit's code
    generation kept, and the numbers are the kit's."""
    compiled_step.reset()
    kit = _steps("adamw_8bit")

    def fails(self, *args):
        raise RuntimeError("inductor failed, as a test")

    compiled_step.reset()
    monkeypatch.setattr(TracedKernel, "_compile", fails)
    with caplog.at_level("INFO", logger="hfoptim.core.compiled_step"):
        dynamo = _steps("adamw_8bit")
    assert compiled_step.traced == {"kit": 0, "dynamo": 2}  # the second kernel went to torch.compile at once
    assert not compiled_step._kit_traces and kernel_build._kit_codegen and compiled_step._failed is None
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "kit's own trace" in r.getMessage()]
    assert len(warned) == 1 and "inductor failed, as a test" in warned[0].getMessage()
    for p, q in zip(kit[0], dynamo[0]):
        assert torch.equal(p, q)
    for mine, theirs in zip(kit[1], dynamo[1]):
        for key, value in mine.items():
            assert torch.equal(theirs[key], value), key
    compiled_step.reset()
    assert compiled_step._kit_traces


@pytest.mark.slow
def test_a_step_the_user_compiles_whole_traces_the_kernel_into_their_graph():
    """``torch.compile(opt.step)``: dynamo traces the step, the kernel's Python included (it
    cannot trace the kit's make_fx), and the numbers are those of the kit's own kernels."""
    compiled_step.reset()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256, 128))
    q = torch.nn.Parameter(p.detach().clone())
    theirs = hfoptim.create_optimizer([p], "adamw_8bit", compile="on", lr=1e-2)
    ours = hfoptim.create_optimizer([q], "adamw_8bit", compile="on", lr=1e-2)
    step = torch.compile(theirs.step)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        step()
        ours.step()
    assert compiled_step.traced == {"kit": 1, "dynamo": 0}  # ours only: the user's graph took theirs
    assert sum(compiled_step.calls.values()) == 3
    assert torch.equal(p, q)
    for key, value in ours.state[q].items():
        assert torch.equal(theirs.state[p][key], value), key
    compiled_step.reset()


def test_constants_made_while_tracing_are_not_kept(monkeypatch):
    """The kit's small constants (SMMF's bit weights and sign table, the 4-bit and 8-bit code
    tables) are cached per device. Made for the first time inside a trace, one is a fake tensor
    of that trace: kept, the next kernel's trace baked it into its graph and the compiled kernel
    failed at its first call (``compile="on"`` with SMMF state of LoRA's A and B, two shapes of
    one square matrix: every parameter then ran the plain path), and an eager step failed on
    it. A trace makes its own; the first eager call keeps a real one."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import make_fx

    from hfoptim.state import dynamic_code, fourbit, smmf

    caches = {"bits": {}, "signs": {}, "4bit": {}, "8bit": {}}
    monkeypatch.setattr(smmf, "_BIT_WEIGHTS", caches["bits"])
    monkeypatch.setattr(smmf, "_SIGN_TABLES", caches["signs"])
    monkeypatch.setattr(fourbit.LINEAR4, "_cache", caches["4bit"])
    monkeypatch.setattr(dynamic_code.UNSIGNED, "_cache", caches["8bit"])

    def made(packed, y):
        signs = smmf.signs(packed, 16, torch.float32)
        levels, _ = fourbit.LINEAR4.tables(y.device)
        table, _ = dynamic_code.UNSIGNED.tables(y.device)
        return signs, smmf.unpack_bits(packed, 16), levels[:3] * y, table[:3] * y

    packed, y = torch.tensor([5, 200], dtype=torch.uint8), torch.ones(3)
    with tracing._traced():
        make_fx(made, tracing_mode="fake", _allow_non_fake_inputs=True)(packed, y)
    assert all(not cache for cache in caches.values())
    signs, bits, levels, table = made(packed, y)  # eagerly, after the trace
    assert bits.tolist() == [bool(b >> k & 1) for b in (5, 200) for k in range(8)]
    torch.testing.assert_close(signs, bits.float() * 2 - 1)
    torch.testing.assert_close(levels, fourbit.LINEAR4.table[:3])
    torch.testing.assert_close(table, dynamic_code.UNSIGNED.table[:3])
    kept = [t for cache in caches.values() for value in cache.values() for t in torch.utils._pytree.tree_leaves(value)]
    assert len(kept) == 6 and not any(isinstance(t, FakeTensor) for t in kept)


def _scale_rows(x, y):
    """In place: ``x += 2 y``; returns the per-row sums of ``x``."""
    x.add_(y * 2)
    return x.sum(dim=1, keepdim=True)


def test_a_kernel_traced_for_any_number_of_rows_serves_every_row_count():
    """With ``symbolic_rows`` one compilation computes for tensors of any row count (two or more),
    the same numbers as the uncompiled function."""
    kernel = TracedKernel(_scale_rows, {}, symbolic_rows=True)
    for rows in (5, 2, 300):
        x, y = torch.randn(rows, 8), torch.randn(rows, 8)
        expect_x = x + y * 2
        sums = kernel(x, y)
        torch.testing.assert_close(x, expect_x)
        torch.testing.assert_close(sums, expect_x.sum(dim=1, keepdim=True))
    assert kernel._compiled is not None


def test_a_kernel_that_depends_on_its_row_count_is_not_traced_for_any():
    def branches_on_rows(x):
        return x * 2 if x.shape[0] > 4 else x * 3  # a guard on the row count: not any count

    with pytest.raises(TraceFailed, match="number of rows"):
        TracedKernel(branches_on_rows, {}, symbolic_rows=True)(torch.ones(8, 4))
    x = torch.ones(8, 4)  # for one row count it compiles
    torch.testing.assert_close(TracedKernel(branches_on_rows, {})(x), x * 2)


def test_a_zero_dim_operand_broadcasts_over_any_number_of_rows():
    """Fake tensors' shape functions of lerp, addcmul and addcdiv broadcast with ATen's expand,
    which takes no symbols: the kit's trace expands their operands first
    (tracing._broadcast_first). A 0-d weight, as AdEMAMix's under its warm-ups, then traces for
    any number of rows, with the numbers of the eager operations."""

    def mixes(x, y, weight):
        x.lerp_(y, weight)
        return torch.addcmul(x, weight, y), torch.addcdiv(x, y, weight + 1)

    kernel = TracedKernel(mixes, {}, symbolic_rows=True)
    for rows in (3, 40):
        x, y, weight = torch.randn(rows, 16), torch.randn(rows, 16), torch.tensor(0.3)
        expect_x = x.clone().lerp_(y, weight)
        products, quotients = kernel(x, y, weight)
        torch.testing.assert_close(x, expect_x)
        torch.testing.assert_close(products, torch.addcmul(expect_x, weight, y))
        torch.testing.assert_close(quotients, torch.addcdiv(expect_x, y, weight + 1))


def test_operands_of_concrete_sizes_are_left_as_torch_traces_them():
    """Only a broadcast over a symbolic size is rewritten (tracing._broadcast_first): over
    concrete sizes, expanding first changed the kernels inductor built, and SMMF's compiled step
    never finished compiling."""
    from hfoptim.core.tracing import _DECOMPOSED

    x, column, weight = torch.randn(3, 4), torch.randn(3, 1), torch.tensor(0.5)
    for op, rewrite in _DECOMPOSED.items():
        assert rewrite(x.clone(), column, weight) is NotImplemented, op


_TEST_OPS = torch.library.Library("hfoptim_test_tracing", "DEF")
_TEST_OPS.define("fails_on_fakes(Tensor x) -> Tensor")
_TEST_OPS.impl("fails_on_fakes", lambda x: x * 2, "CPU")


def _fails_on_fakes_meta(x):
    raise RuntimeError("no shape for this input")


_TEST_OPS.impl("fails_on_fakes", _fails_on_fakes_meta, "Meta")


def test_a_trace_that_fails_on_fake_tensors_is_reported_once_by_the_kit_not_by_torch():
    """An operation whose shape function fails on the trace's fake tensors: the kit raises
    TraceFailed (and handles it: torch.compile or a kernel of one row count takes over, said
    once), so torch's fake tensors log no error with a traceback meanwhile; outside the trace
    their log is as it was."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    keep = Keep(level=logging.DEBUG)
    fake_tensor_log.addHandler(keep)
    try:
        with pytest.raises(TraceFailed, match="no shape for this input"):
            TracedKernel(torch.ops.hfoptim_test_tracing.fails_on_fakes, {})(torch.ones(4))
        assert not [r for r in records if r.levelno >= logging.ERROR]
        assert not fake_tensor_log.filters
        fake_tensor_log.error("after the trace")
        assert [r.getMessage() for r in records] == ["after the trace"]
    finally:
        fake_tensor_log.removeHandler(keep)
