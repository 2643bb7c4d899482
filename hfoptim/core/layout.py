"""Layouts: how the parameters an optimizer holds map to the tensors a rule updates.

The engine steps *units*. A unit is the part of one parameter that this process updates: the
local tensor (written in place), its gradient (read-only), the optimizer state kept for it, and a
:class:`~hfoptim.core.stats.ParamView` saying what part of the whole parameter it is.

:class:`LocalLayout` is the plain case: every parameter is one whole unit. The sharding layer
adds layouts for FSDP2 (DTensor shards), DeepSpeed ZeRO-1/2 (segments of a flat partition) and
ZeRO-3 (per-parameter partitions), each with the matching statistics backend, so rules never
know whether they run sharded.

:func:`canonical_units` then shows each unit to the rules through its parameter's layout
(:mod:`hfoptim.core.param_layout`): a Conv1D weight transposed, a fused expert tensor as one unit
per expert.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .param_layout import ParamLayout
from .stats import LocalStats, ParamView


@dataclass
class Unit:
    """One tensor to update: ``param`` (in place), ``grad`` (read-only), ``state``, ``view``."""

    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    view: ParamView
    #: the parameter object that owns this unit (for messages and state_dict validation)
    owner: torch.Tensor
    #: called after the update when ``param`` is a working copy (a ZeRO row cut by a partition
    #: boundary is padded to whole rows): writes the owned elements back
    writeback: Callable[[], None] | None = None
    #: the model parameter this unit belongs to when ``owner`` is not it (a ZeRO flat partition)
    source: torch.Tensor | None = None
    #: True for a unit seen through its parameter's canonical layout (a transposed Conv1D weight,
    #: one matrix of a fused expert tensor): see :func:`canonical_units`
    canonical: bool = False


class Layout:
    """Base of layouts. Every process of a sharded run must get the same units (an empty one for
    a parameter it holds nothing of) in the same order, so the statistics' collectives match."""

    stats: LocalStats

    #: False when a ``step()`` call may see only some of the parameters (DeepSpeed steps its
    #: parameter groups / ZeRO-3 sub-groups one at a time); ``partial_step_reason`` says why
    steps_all_parameters: bool = True
    partial_step_reason: str = ""

    def view(self, p: torch.Tensor) -> ParamView:
        raise NotImplementedError

    def units(self, optimizer, group: dict) -> list[Unit]:
        raise NotImplementedError

    def units_without_grad(self, optimizer, group: dict) -> list[Unit]:
        """Every parameter's unit, gradient or not (to create state without a step: the
        parameter stands in for its gradient). Layouts whose units are not the parameters
        themselves (FSDP2 local shards, ZeRO segments) override it."""
        return [Unit(p, p, optimizer.state[p], self.view(p), p) for p in group["params"]]

    def register(self, params: list[torch.Tensor]) -> None:
        """Parameters the optimizer was given (``add_param_group``)."""

    def regroup_transposed(self, units: list[Unit], returns: list | None) -> list[Unit]:
        """Sharded transposed weights (``Conv1D``) over whole output units (see
        :func:`canonical_units`); a layout that shards parameters provides it."""
        raise ParamLayoutError(
            f"hfoptim internal error: {type(self).__name__} holds sharded transposed weights but cannot move them "
            f"to whole output units"
        )

    def for_step(self, optimizer) -> Layout:
        """The layout to step with (a layout may hand over to another, e.g. when FSDP2 swapped
        the parameters for DTensors after the optimizer was built)."""
        return self

    def export_state(self, optimizer, state_dict: dict) -> dict:
        """``optimizer.state_dict()`` as saved (FSDP2: shard state as DTensors for DCP)."""
        return state_dict

    def import_state(self, optimizer, state_dict: dict) -> dict:
        """The inverse of :meth:`export_state`, for this run's shards (before validation)."""
        return state_dict

    def check_param_state(self, optimizer, pid, p: torch.Tensor, pstate: dict, group: dict) -> None:
        """Raise ``ValueError`` when ``pstate`` is not the state ``optimizer`` keeps for ``p``
        (:func:`check_state_shapes` of the whole parameter; sharded layouts check their shard)."""
        check_state_shapes(optimizer, pid, p, pstate, group)

    def after_load(self, optimizer) -> None:
        """Called at the end of ``load_state_dict``."""

    def mean_loss(self, loss: float) -> float:
        """The loss a loss-driven rule sees: the mean over the data-parallel processes (all
        processes of the default group when torch.distributed is initialized; one all-reduce)."""
        return mean_over(loss)


def check_state_shapes(optimizer, pid, param: torch.Tensor, pstate: dict, group: dict, view: ParamView | None = None):
    """The one check of a parameter's loaded state against what ``optimizer`` keeps for it in
    ``group``: the same keys, and every tensor of the expected shape. ``view``: the part this
    process holds (a shard: the local shapes); None: the whole parameter. Raises ``ValueError``
    naming the parameter, the keys or the shape."""
    if not pstate:
        return  # read before its first step (optimizer.state[p] is a defaultdict): torch loads it
    expected = optimizer.expected_state_shapes(param, group, view)
    if set(pstate) != set(expected):
        held = "" if view is None else " for its shard"
        raise ValueError(
            f"state_dict entry for parameter {pid} has keys {sorted(pstate)}, but {type(optimizer).__name__} "
            f"({optimizer.rule.name}, state={group['state']!r}) keeps {sorted(expected)}{held}: it was saved by "
            f"another optimizer or with another state form"
        )
    for key, shape in expected.items():
        value = pstate[key]
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(shape):
            of = (
                f"a parameter of shape {tuple(param.shape)}"
                if view is None
                else f"this process's shard of rows [{view.row_start}, {view.row_start + view.rows}) of a parameter "
                f"of shape {tuple(view.global_shape)}"
            )
            raise ValueError(
                f"state_dict entry {key!r} for parameter {pid} has shape {tuple(value.shape)}, expected "
                f"{tuple(shape)} for {of}"
            )


def mean_over(loss: float, group=None) -> float:
    """The loss a loss-driven rule (AdaLo, ...) sees under data parallelism: the mean of ``loss``
    over ``group`` (None: the default group), in float64, one all-reduce, so every process takes
    the same step size."""
    if not dist.is_available() or not dist.is_initialized():
        return loss
    size = dist.get_world_size(group)
    if size == 1:
        return loss
    buf = torch.tensor([loss], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        buf = buf.cuda()
    dist.all_reduce(buf, group=group)
    return float(buf.item()) / size


#: the step-time choice of layout, ``choose(optimizer, local) -> Layout``: installed by
#: :mod:`hfoptim.distributed.select`, the layer above that knows the sharded layouts (``import
#: hfoptim`` imports it), so this module never imports upward
_choose_for_step: Callable | None = None


def install_layout_choice(choose: Callable) -> None:
    """Set the function :meth:`LocalLayout.for_step` hands over to (see :data:`_choose_for_step`)."""
    global _choose_for_step
    _choose_for_step = choose


class LocalLayout(Layout):
    """Every parameter is held whole by this process."""

    def __init__(self, foreach: bool = True):
        self.foreach = foreach
        self.stats = LocalStats(foreach=foreach)
        self.known: dict[int, tuple] = {}

    def view(self, p: torch.Tensor) -> ParamView:
        return ParamView.of(p)

    def register(self, params: list[torch.Tensor]) -> None:
        for p in params:
            self.known[id(p)] = (weakref.ref(p), tuple(p.shape))

    def for_step(self, optimizer) -> Layout:
        """Hands over to the sharding layer when the parameters turned out to be sharded, and
        refuses tensors it cannot step exactly (see :mod:`hfoptim.distributed.select`)."""
        if _choose_for_step is None:
            raise RuntimeError(
                "hfoptim.distributed was not imported, so sharded parameters could not be recognised: "
                "import hfoptim (it imports hfoptim.distributed) before stepping"
            )
        return _choose_for_step(optimizer, self)

    def units(self, optimizer, group: dict) -> list[Unit]:
        """Units of the parameters of ``group`` that have a gradient this step."""
        return [Unit(p, p.grad, optimizer.state[p], self.view(p), p) for p in group["params"] if p.grad is not None]


class ParamLayoutError(RuntimeError):
    """A parameter whose layout (Conv1D, fused experts) cannot be stepped exactly as it is held."""


def split_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rows`` that process ``rank`` of ``world`` holds when they are
    split like ``torch.chunk`` (FSDP2's ``Shard(0)``: ``ceil(rows / world)`` each, the last ones
    shorter or empty)."""
    size = -(-rows // world) if world else rows
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def transposed_view(view: ParamView) -> ParamView:
    """Where the canonical ``(out, in, *kernel)`` matrix of a sharded transposed parameter
    (stored ``(in, out, *kernel)``, a ``Conv1D`` weight) is stepped: this process's run of whole
    canonical rows (output units), split over the view's process group like ``torch.chunk``.

    The stored shard (whole input rows under FSDP2, a flat segment under ZeRO) holds a slice of
    every output unit's column; :func:`canonical_units` moves the elements so that each process
    holds whole output units instead, which every per-output-unit statistic, 8-bit row and
    whole-matrix operation then sees as an ordinary row shard."""
    import torch.distributed as dist

    shape = tuple(view.global_shape)
    canonical = torch.Size((shape[1], shape[0], *shape[2:]))
    world, rank = dist.get_world_size(view.group), dist.get_rank(view.group)
    start, stop = split_rows(canonical[0], world, rank)
    row_len = math.prod(canonical[1:])
    starts = {split_rows(canonical[0], world, r)[0] for r in range(world)}
    cuts = tuple(sorted(s * row_len for s in starts if 0 < s < canonical[0]))
    return ParamView(global_shape=canonical, row_start=start, local_rows=stop - start, cuts=cuts, group=view.group)


def canonical_units(units: list[Unit], layouts: dict[int, ParamLayout], init_batched, regroup=None) -> list[Unit]:
    """The units as the rules see them: each unit whose parameter has a non-default layout (looked
    up in ``layouts`` by ``id`` of its source parameter; absent: stepped as stored) replaced by its
    canonical view (:mod:`hfoptim.core.param_layout`):

    * ``transposed`` without batch axes (``Conv1D``): one unit over the transposed views of the
      parameter and its gradient (``(out, in)``; writes reach the parameter), with state of the
      canonical shape. Sharded (FSDP2 shards a Conv1D weight along its input features, ZeRO cuts
      it anywhere), its elements are first moved so that each process holds whole output units
      (:func:`transposed_view`): ``regroup(units)`` (the sharding layer's, one exchange for all
      of them) returns the units over those rows, the update is sent back after the step;
    * batch axes (fused experts): one unit per matrix, over views of the parameter and gradient
      (transposed when the layout is), whose state is a dict of views into the parameter's state,
      which keeps every matrix's state stacked on one leading axis (``init_batched(state,
      units)`` creates it).

    A sharded batch of matrices is viewed so only when that is exact: FSDP2 shards a fused expert
    tensor by whole experts (dim 0), so each local expert is a whole matrix (the ZeRO layout cuts
    its segments at matrix boundaries itself); a transposed fused expert tensor cut by a ZeRO
    segment raises :class:`ParamLayoutError`."""
    out: list[Unit] = []
    moved: list[int] = []
    for unit in units:
        source = unit.source if unit.source is not None else unit.owner
        layout = layouts.get(id(source))
        if layout is None or layout.is_default or unit.canonical:
            out.append(unit)
            continue
        shape = tuple(unit.view.global_shape)
        if unit.view.sharded and layout.batch == 0:
            if regroup is None:
                raise ParamLayoutError(
                    f"hfoptim internal error: a sharded parameter of shape {shape} with layout {layout.spelling!r} "
                    f"reached a layout that cannot move its elements to whole output units"
                )
            moved.append(len(out))
            out.append(unit)
            continue
        if unit.view.sharded and (unit.view.valid is not None or unit.writeback is not None):
            raise ParamLayoutError(
                f"a parameter of shape {shape} with layout {layout.spelling!r} ({layout.kind}) is sharded by flat "
                f"segments (DeepSpeed ZeRO) that cut its transposed matrices: their per-output-unit and per-matrix "
                f"statistics would be computed on a slice. hfoptim steps a fused expert tensor stored (E, in, out) "
                f"exactly when it is held whole or sharded by expert (FSDP2). Steps the layout cannot change run "
                f"on any shard: fp32 state with an elementwise rule (adamw, ademamix, adan, ...). Else declare "
                f"param_layouts={{name: 'batch_out_in'}} to step each matrix as stored"
            )
        if layout.batch == 0:
            p, g = unit.param.transpose(0, 1), unit.grad.transpose(0, 1)
            view = ParamView.of(p)
            out.append(Unit(p, g, unit.state, view, unit.owner, source=unit.source, canonical=True))
            continue
        inner = shape[layout.batch :]
        local = unit.param.view(-1, *inner)
        grads = unit.grad.view(-1, *inner)
        if layout.transposed:
            local, grads = local.transpose(1, 2), grads.transpose(1, 2)
        subs = [
            Unit(local[e], grads[e], {}, ParamView.of(local[e]), unit.owner, source=unit.source, canonical=True)
            for e in range(local.shape[0])
        ]
        if not subs:
            continue
        stacked = unit.state
        if not stacked:
            init_batched(stacked, subs)
        for e, sub in enumerate(subs):
            sub.state.update({k: v[e] for k, v in stacked.items()})
        out.extend(subs)
    if moved:
        for i, unit in zip(moved, regroup([out[i] for i in moved])):
            out[i] = unit
    return out
