"""Modifiers: options that change the gradient before a rule, or the update after it.

A modifier is switched on per parameter group by its option (``cautious=True``, ``agc=0.01``,
...), works with any rule where it makes sense, and takes every per-tensor statistic through the
step context, so it stays exact under sharding.
"""

from __future__ import annotations

from typing import ClassVar

from ..core.hparams import HP
from ..core.tensorlist import TensorList

GRAD = "grad"  # applied to the gradient before the rule
UPDATE = "update"  # applied to the rule's update direction


class Modifier:
    name: ClassVar[str] = ""
    #: GRAD or UPDATE
    stage: ClassVar[str] = GRAD
    #: its options; ``switch`` turns it on when truthy
    hyperparams: ClassVar[dict[str, HP]] = {}
    switch: ClassVar[str] = ""
    #: what the registry-name suffix (e.g. "_cautious") sets
    suffix_kwargs: ClassVar[dict] = {}
    #: True when, on tensors of 2+ dims, the result for a row depends only on that row (per-row
    #: statistics at most): the engine may then step a large tensor in pieces of whole rows
    row_local: ClassVar[bool] = False

    def enabled(self, group: dict) -> bool:
        value = group[self.switch]
        return value is not None and value is not False

    def incompatible(self, rule) -> str | None:
        """Why this modifier cannot run with ``rule``, or None."""
        return None

    def apply(self, ctx, x: TensorList, g: TensorList, p: TensorList) -> TensorList:
        """Return the modified ``x`` (the gradient, or the update) as a new list; never write
        into ``x``, ``g`` or ``p``."""
        raise NotImplementedError
