"""The kit's own trace of its kernels: ``make_fx`` and inductor, without dynamo.

A compiled step kernel (:mod:`hfoptim.core.compiled_step`) is one Python function run once per
parameter shape over tensors whose shapes, dtypes and layout its key fixes, with every other
argument (the rule, its options, the storage forms) fixed by the key too. Dynamo, which
``torch.compile`` runs first, interprets that function bytecode by bytecode to build the graph
and its guards: about 6700 instructions for one 8-bit AdamW kernel, 0.4 s each time, in every
new process even when inductor's disk cache holds the compiled code (1.7 s of a 3.8 s first step
of ``adamw_8bit`` on the 100M set with a warm cache, 2-core Intel Xeon, torch 2.13; 2.1-2.3 s
instead of 3.5-3.6 without dynamo). The kit checks no guards (its
key decides), so it does not need dynamo: :class:`TracedKernel` runs the function once under
``make_fx`` on fake copies of its tensor arguments (the Python runs natively; 0.1 s) and hands the
graph to inductor's ``compile_fx``, whose graph caches then answer a new process as they answer
``torch.compile``. The graph computes what dynamo's does. Dynamo rewrites a few operations on the
way (an ``addcmul_`` with a value into a fused multiply-add; a 0-d tensor where ATen takes a number
into its value): the kit's traced code passes numbers there. ``tests/test_tracing.py`` compares the
two routes bit for bit, parameters and state, for the 8-bit, 4-bit, bf16 and dense forms of
several rules.

While it traces, :func:`is_traced` is true, as it is under ``torch.compile``: the kit's code then
takes its traced forms (operations inductor fuses well, no reads of data or addresses).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

#: True while :class:`TracedKernel` traces (see :func:`is_traced`)
_tracing = False
#: a tensor's place among the leaves of a kernel's output (the others are constants, None included)
_TENSOR = object()
#: the most elements of a tensor a kernel may read besides its arguments (baked into the graph as
#: a constant): the code tables are 256-32768 entries. A larger one would be data of the first call
#: (where dynamo makes it an input of the graph), so such a trace counts as failed.
MAX_CONSTANT_NUMEL = 1 << 16


def is_traced() -> bool:
    """Whether the code runs to be traced into a graph instead of computing: under
    ``torch.compile`` (dynamo), or while :class:`TracedKernel` traces a kernel."""
    return _tracing or torch.compiler.is_compiling()


def kept_constant(cache: dict, key, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` when missing (a code table, bit weights): kept only when
    made outside a trace. Made while :class:`TracedKernel` traces, it is a fake tensor of that
    trace: kept, the next trace would bake it into its graph as a constant and the compiled
    kernel fail at its first call (it has no data), and an eager step would fail on it. So a
    trace makes its own copy (a constant of its graph), and the first eager call keeps one."""
    found = cache.get(key)
    if found is None:
        found = make()
        if not is_traced():
            cache[key] = found
    return found


@contextlib.contextmanager
def _traced():
    global _tracing
    before, _tracing = _tracing, True
    try:
        yield
    finally:
        _tracing = before


@contextlib.contextmanager
def _quiet_fake_tensor_errors():
    """While inside, the records torch's fake tensors log at error level (with a traceback) when an
    operation fails on them are dropped: in :meth:`TracedKernel._trace` the error is raised as
    :class:`TraceFailed`, which the kit handles and reports once (a kernel of one row count, or
    torch.compile's trace, takes over), so torch's traceback would only alarm."""

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    fake_tensor_log = logging.getLogger("torch._subclasses.fake_tensor")
    fake_tensor_log.addFilter(below_error)
    try:
        yield
    finally:
        fake_tensor_log.removeFilter(below_error)


def _broadcast_first(op: torch._ops.OpOverload) -> Callable:
    """``op`` with its tensor operands expanded to their broadcast shape first, where that shape
    holds a symbol; NotImplemented (``op`` as it is) otherwise.

    Fake tensors' shape functions of ``lerp``, ``addcmul`` and ``addcdiv`` broadcast their
    operands with ATen's ``expand``, which takes only concrete sizes: with a first dimension traced
    as a symbol (:class:`TracedKernel`'s ``symbolic_rows``) and a 0-d tensor operand, as AdEMAMix's
    slow weight is under a ``t_beta3`` warm-up, they fail ("SymIntArrayRef expected to contain
    only concrete integers", torch 2.13). Expanded before the operation, the sizes reach
    ``expand`` through the trace, which takes symbols. An expand is a view: inductor reads the
    operand with a zero stride either way, and computes the same numbers.

    Over concrete sizes the operation is left as it is: expanded first, SMMF's step (outer
    products of its factors, viewed to the parameter's shape) gave inductor index expressions
    whose simplification ran for over 15 minutes."""

    def expanded_first(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        if all(isinstance(size, int) for size in shape) or all(t.shape == shape for t in tensors):
            return NotImplemented
        return op(*(a.expand(shape) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)

    return expanded_first


#: operations the kit's traces rewrite (make_fx's ``decomposition_table``): :func:`_broadcast_first`
_DECOMPOSED = {
    op: _broadcast_first(op)
    for op in (
        torch.ops.aten.lerp.Tensor, torch.ops.aten.lerp_.Tensor, torch.ops.aten.addcmul.default,
        torch.ops.aten.addcmul_.default, torch.ops.aten.addcdiv.default, torch.ops.aten.addcdiv_.default,
    )
}  # fmt: skip


def _follow(args: tuple, path: tuple) -> Any:
    """The leaf of ``args`` at the pytree key ``path``."""
    for key in path:
        args = key.get(args)
    return args


class TraceFailed(Exception):
    """``make_fx`` could not trace the function (what dynamo would handle with a graph break)."""


class TracedKernel:
    """``fn`` compiled for the tensors of its first call's arguments.

    The first call traces ``fn`` with ``make_fx`` over fake copies of the tensors among its
    arguments (found by ``torch.utils._pytree``: inside tuples, lists and dicts), with every
    other argument as it is at that call, and compiles the graph with inductor (``options``:
    inductor's configuration for it). A later call must pass arguments of the same structure,
    tensors of the same shapes, strides, dtypes and devices, and the same non-tensor values:
    the caller's key guarantees it; nothing here checks it. Tensors ``fn`` writes in place are
    written by the compiled code; what ``fn`` returns (None, or a structure of tensors and
    constants) comes back in the same structure.

    With ``symbolic_rows`` the tensors of one or more dimensions may have another row count (their
    first dimension, the same for all of them) at later calls than at the first: the kernel is
    traced and compiled for any count of two or more.

    Raises :class:`TraceFailed` when ``make_fx`` cannot trace ``fn`` (or, with ``symbolic_rows``,
    when the compiled code assumes something of the row count); errors of inductor's compilation
    are raised as they come."""

    def __init__(self, fn: Callable, options: dict[str, Any], symbolic_rows: bool = False):
        self.fn, self.options = fn, options
        #: whether the first dimension of every tensor argument of one or more dims is traced as a
        #: symbol (the row count, the same for all of them), so that the kernel serves any count
        self.symbolic_rows = symbolic_rows
        self._compiled: Callable | None = None
        #: where each tensor argument sits in ``args`` (pytree key paths), found at the first call
        self._tensor_paths: list[tuple] = []
        self._out_spec = None
        #: the output's leaves, :data:`_TENSOR` where the compiled graph returns a tensor
        self._out_constants: list = []

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = self._first_call(args)
        # the tensors by the paths of the first call, not by flattening every argument again:
        # a kernel's arguments hold about sixty leaves (the group's hyperparameters), a handful
        # of them tensors, and a flatten cost as much as the kernel of a 256x256 8-bit step
        tensors = [_follow(args, path) for path in self._tensor_paths]
        results = iter(self._compiled(*tensors))
        out = [next(results) if constant is _TENSOR else constant for constant in self._out_constants]
        return tree_unflatten(out, self._out_spec)

    def _first_call(self, args: tuple) -> Callable:
        """Trace and compile ``fn`` for ``args``; keep where its tensors sit."""
        with_paths, spec = tree_flatten_with_path(args)
        leaves = [leaf for _, leaf in with_paths]
        where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self._tensor_paths = [with_paths[i][0] for i in where]
        tensors = [leaves[i] for i in where]
        fake_mode, fakes = self._fakes(tensors)
        return self._compile(self._trace(leaves, spec, where, fakes), fakes, fake_mode)

    def _fakes(self, tensors: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        """A fake tensor mode with a shape environment and fake copies of ``tensors`` in it, which
        the trace and inductor share. Static shapes, as dynamo's under
        ``torch.compile(dynamic=False)`` (inductor's graph caches bypass a compilation without a
        shape environment; symbolic sizes everywhere cost 5-8 s of a first step from an empty cache,
        ``adamw_8bit`` on the 100M set with AVX2 kernels: 29-33 s, 19-21 s with static fakes, 24 s
        under dynamo), but with ``symbolic_rows`` each tensor's first dimension (of one or more
        dims), a symbol of its own: the caller passes tensors of one row count, and
        :func:`_check_any_rows` confirms that the compiled code assumes nothing else of them."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        fakes = []
        with fake_mode:
            for t in tensors:
                if self.symbolic_rows and t.dim():
                    dims = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)
                    context = StatelessSymbolicContext(dynamic_sizes=dims, constraint_sizes=[None] * t.dim())
                    fakes.append(fake_mode.from_tensor(t, symbolic_context=context))
                else:
                    fakes.append(fake_mode.from_tensor(t, static_shapes=True))
        return fake_mode, fakes

    def _trace(self, leaves: list, spec, where: list[int], tensors: list[torch.Tensor]) -> torch.fx.GraphModule:
        from torch.fx.experimental.proxy_tensor import make_fx

        def graph(*inputs):
            filled = list(leaves)
            for i, t in zip(where, inputs):
                filled[i] = t
            out_leaves, self._out_spec = tree_flatten(self.fn(*tree_unflatten(filled, spec)))
            self._out_constants = [_TENSOR if isinstance(x, torch.Tensor) else x for x in out_leaves]
            return [x for x in out_leaves if isinstance(x, torch.Tensor)]

        try:
            # real tensors the function reads besides its arguments (code tables) become constants
            trace = make_fx(graph, decomposition_table=_DECOMPOSED, tracing_mode="fake", _allow_non_fake_inputs=True)
            with _traced(), torch.no_grad(), _quiet_fake_tensor_errors():
                gm = trace(*tensors)
        except Exception as error:
            raise TraceFailed(f"{type(error).__name__}: {error}") from error
        for node in gm.graph.nodes:
            constant = getattr(gm, node.target, None) if node.op == "get_attr" else None
            if isinstance(constant, torch.Tensor) and constant.numel() > MAX_CONSTANT_NUMEL:
                raise TraceFailed(
                    f"the function reads a tensor of {constant.numel()} elements besides its arguments; "
                    "traced, it would be a constant of the graph"
                )
        return gm

    def _compile(self, gm: torch.fx.GraphModule, fakes, fake_mode) -> Callable:
        from torch._guards import TracingContext, tracing
        from torch._inductor.compile_fx import compile_fx

        with tracing(TracingContext(fake_mode)), torch.no_grad():
            compiled = compile_fx(gm, fakes, config_patches=self.options)
        if self.symbolic_rows:
            _check_any_rows(fake_mode.shape_env)
        return compiled


def _check_any_rows(shape_env) -> None:
    """Raise :class:`TraceFailed` unless every assumption the trace and compilation of a kernel for
    any number of rows made (the shape environment's guards) holds for every row count: with
    every symbol (each tensor's first dimension) one and the same count, each must be true."""
    for guard in shape_env.guards:
        symbols = guard.expr.free_symbols
        rows = next(iter(symbols), None)  # sizes are positive integer symbols
        same = guard.expr.xreplace({symbol: rows for symbol in symbols}).simplify()
        if same != True:  # noqa: E712 (a sympy boolean, equal to True once proven)
            raise TraceFailed(f"the kernel depends on the number of rows: {guard.expr}")


def table_lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` (``table`` 1-d, ``index`` integer, in range, any shape) keeping
    ``index``'s shape.

    Eagerly one flat ``index_select`` (3x faster on CPU than advanced indexing). Traced, a
    ``gather`` from the table broadcast along ``index``'s leading dimensions: inductor (torch 2.13)
    reads an indexing ``table[i]`` as Python indexing, where a negative ``i`` counts from the end,
    and adds a select per element (``i + len`` where ``i < 0``, in 64-bit vectors on the CPU),
    which a gather's indices (never negative) do not need. Same entries either way. Measured
    compiled alone, the 8-bit encode of 4.1M values on a 2-core Intel Xeon: 2.02 -> 1.18 ms with
    AVX-512 kernels, 1.92 -> 1.65 with AVX2 ones."""
    if not is_traced():
        return table.index_select(0, index.reshape(-1).to(torch.int32)).view(index.shape)
    if index.dim() == 0:
        return table[index.long()]
    return table.expand(*index.shape[:-1], table.numel()).gather(-1, index.long())
