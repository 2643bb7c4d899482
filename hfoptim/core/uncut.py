"""Shards that no process boundary cuts: stepped by their owner as on one process.

A sharded layout gives every process a unit of every parameter, an empty one where it holds
nothing, so that the statistics' collectives match. A parameter that no boundary cuts
(``view.cuts == ()``: a ZeRO-1/2 partition holds it entirely, FSDP2 gives its single row to
one process) is held whole by one process, its *owner*, and by no other, and every statistic of
it is the owner's alone. Stepping it as a shard would still cost a collective per statistic,
and each one makes the processes wait for one another: each steps its own parameters in turn
between the collectives, so the step lasts about the sum of both processes' work instead of the
longer one (ZeRO-2, 2 processes, ``adamw_4bit`` on the 100M set: 72 all-reduces and 570 ms of
waiting in a 1290 ms step).

So, decided from what every process shares (the cuts and the global shape):

* the owner steps the unit as a parameter held whole (:func:`as_held_whole`: one process's
  kernel, row pieces and statistics, no collective);
* the other processes skip it: they hold none of its elements;
* after the step, the state every process keeps of it that is a statistic of the whole tensor
  (the 4-bit second moment's column maxima, a factored form's column sums, a rule's per-tensor
  scalars: the stored tensors that do not follow the rows) is copied from the owner to the
  others by :func:`mirror`, one SUM all-reduce per process group for the whole step, where the
  others send zeros. Every process then holds exactly the state it held before this path
  existed, and exactly what one process stepping the whole model holds.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..state import resolve
from .layout import Unit
from .stats import ParamView

#: uncut parameters' units this process stepped as held whole ("owned") and skipped
#: ("elsewhere"), over every step (the tests read it)
stepped: dict[str, int] = {"owned": 0, "elsewhere": 0}


def uncut(view: ParamView) -> bool:
    """Whether ``view`` is a shard of a parameter that no process boundary cuts (the same answer
    on every process): one process holds all of it, the others nothing."""
    return view.sharded and not view.cuts and view.global_numel > 0


def owns(view: ParamView) -> bool:
    """Whether this process holds all of the uncut parameter ``view`` is a shard of."""
    return view.rows == view.global_rows and view.valid is None


def as_held_whole(unit: Unit) -> Unit:
    """``unit`` (its owner's shard of an uncut parameter) as a parameter held whole."""
    return dataclasses.replace(unit, view=ParamView(global_shape=unit.view.global_shape))


def split(units: list[Unit]) -> tuple[list[Unit], list[Unit], list[Unit]]:
    """``units`` as ``(shared, held, uncut)``: the units stepped as shards (cut parameters, and
    parameters held whole anyway), the uncut parameters this process owns as held whole, and
    every uncut unit as it was (for :func:`mirror`), in order."""
    shared, held, cut_free = [], [], []
    for unit in units:
        if not uncut(unit.view):
            shared.append(unit)
            continue
        cut_free.append(unit)
        if owns(unit.view):
            held.append(as_held_whole(unit))
            stepped["owned"] += 1
        elif not unit.param.numel():
            stepped["elsewhere"] += 1
        else:
            first, rows = unit.view.row_start, unit.view.rows
            raise RuntimeError(
                f"hfoptim internal error: a shard of rows [{first}, {first + rows}) of a parameter of shape "
                f"{tuple(unit.view.global_shape)} that no process boundary cuts"
            )
    return shared, held, cut_free


def share(units: list[Unit]) -> int:
    """How many processes share the uncut parameters of ``units`` (held whole by one of them):
    the owner steps them on that share of the step's memory budget
    (:func:`~hfoptim.core.chunking.plan`), as the shards of parameters they all share."""
    import torch.distributed as dist

    return max((dist.get_world_size(u.view.group) for u in units), default=1)


def whole_tensor_shapes(engine, group: dict, view: ParamView) -> dict[str, tuple]:
    """The stored tensors of a parameter that every process keeps whole, whatever rows it holds,
    and their shapes (the same everywhere): those a process holding none of its rows still has
    elements of."""
    none_here = ParamView(global_shape=view.global_shape, row_start=0, local_rows=0, group=view.group)
    meta = torch.empty(none_here.local_shape, device="meta")
    shapes = {}
    for slot in engine.rule.active_slots(group):
        codec = resolve.codec_for(engine.rule, slot, group, view)
        shapes.update((k, tuple(s)) for k, s in codec.shapes(slot, none_here, meta).items() if math.prod(s))
    return dict(sorted(shapes.items()))


def mirror(engine, pending: list[tuple[dict, list[Unit]]], stats) -> None:
    """Copy the whole-tensor state of the uncut units of ``pending`` (``(group, units)`` pairs,
    the same on every process) from their owners to the other processes: one SUM all-reduce per
    process group over all of them, the non-owners' tensors zeroed first (``x + 0`` is ``x``)."""
    tensors, views = [], []
    for group, units in pending:
        for unit in units:
            shapes = whole_tensor_shapes(engine, group, unit.view)
            if not shapes or any(unit.state[k].is_meta for k in shapes):
                continue
            mine = owns(unit.view)
            for key, shape in shapes.items():
                t = unit.state[key]
                if tuple(t.shape) != shape:
                    raise RuntimeError(
                        f"hfoptim internal error: state {key!r} of a parameter of shape "
                        f"{tuple(unit.view.global_shape)} has shape {tuple(t.shape)}, expected {shape} on every process"
                    )
                if not mine:
                    t.zero_()
                tensors.append(t)
                views.append(unit.view)
    if not tensors:
        return
    for t, total in zip(tensors, stats.all_reduce(tensors, views)):
        if total is not t:
            t.copy_(total)
