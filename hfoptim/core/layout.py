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


class LocalLayout:
    """Every parameter is held whole by this process."""

    def __init__(self, foreach: bool = True):
        self.stats = LocalStats(foreach=foreach)

    def view(self, p: torch.Tensor) -> ParamView:
        return ParamView.of(p)

    def units(self, optimizer, group: dict) -> list[Unit]:
        """Units of the parameters of ``group`` that have a gradient this step."""
        return [
            Unit(p, p.grad, optimizer.state[p], self.view(p), p) for p in group["params"] if p.grad is not None
        ]
