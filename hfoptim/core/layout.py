"""Layouts: how the parameters an optimizer holds map to the tensors a rule updates.

The engine steps *units*. A unit is the part of one parameter that this process updates: the
local tensor (written in place), its gradient (read-only), the optimizer state kept for it, and a
:class:`~hfoptim.core.stats.ParamView` saying what part of the whole parameter it is.

:class:`LocalLayout` is the plain case: every parameter is one whole unit. The sharding layer
adds layouts for FSDP2 (DTensor shards), DeepSpeed ZeRO-1/2 (segments of a flat partition) and
ZeRO-3 (per-parameter partitions), each with the matching statistics backend, so rules never
know whether they run sharded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

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

    def register(self, params: list[torch.Tensor]) -> None:
        """Parameters the optimizer was given (``add_param_group``)."""

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
        """Raise ``ValueError`` when ``pstate`` is not the state ``optimizer`` keeps for ``p``."""
        optimizer._check_param_state(pid, p, pstate, group)

    def after_load(self, optimizer) -> None:
        """Called at the end of ``load_state_dict``."""

    def mean_loss(self, loss: float) -> float:
        """The loss a loss-driven rule sees: the mean over the data-parallel processes (all
        processes of the default group when torch.distributed is initialized; one all-reduce)."""
        from ..distributed.loss import mean_over

        return mean_over(loss)


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
        from ..distributed.select import layout_for_step

        return layout_for_step(optimizer, self)

    def units(self, optimizer, group: dict) -> list[Unit]:
        """Units of the parameters of ``group`` that have a gradient this step."""
        return [Unit(p, p.grad, optimizer.state[p], self.view(p), p) for p in group["params"] if p.grad is not None]
