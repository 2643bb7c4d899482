"""Modifiers: options that change the gradient before a rule, or the update after it.

A modifier is switched on per parameter group by its option (``cautious=True``, ``agc=0.01``,
...), works with any rule where it makes sense, and takes every per-tensor statistic through the
step context, so it stays exact under sharding.
"""

from __future__ import annotations

from typing import ClassVar

from ..core.hparams import HP
from ..core.rule import Slot
from ..core.tensorlist import TensorList

GRAD = "grad"  # applied to the gradient before the rule
UPDATE = "update"  # applied to the rule's update direction
POST = "post"  # applied to the parameter after the update (a constraint with state: CPR)


class Modifier:
    name: ClassVar[str] = ""
    #: GRAD or UPDATE
    stage: ClassVar[str] = GRAD
    #: its options; ``switch`` turns it on when truthy
    hyperparams: ClassVar[dict[str, HP]] = {}
    switch: ClassVar[str] = ""
    #: what the registry-name suffix (e.g. "_cautious") sets
    suffix_kwargs: ClassVar[dict] = {}
    #: per-tensor state the modifier keeps (in ``optimizer.state[p]``, next to the rule's); each
    #: slot's ``when`` must say whether the group enables the modifier
    slots: ClassVar[tuple[Slot, ...]] = ()
    # ``per_unit`` and ``row_local`` are two questions with all four answers in use, so both are
    # declared: per-row statistics (centralization, AGC's unit norms) are per_unit and row-local;
    # whole-tensor statistics (cautious masking's mean, the trust ratio's norms) neither; a
    # per-matrix statistic (a spectral norm) per_unit but not row-local; no statistic at all
    # row-local but not per_unit. ``per_unit`` decides whether a Conv1D weight may be stepped as
    # stored (RuleOptimizer.layout_free: a transpose swaps rows and columns), ``row_local`` whether a
    # large tensor may be stepped in pieces of whole rows (hfoptim.core.chunking).
    #: True when it takes statistics per output unit (row) or per matrix, which follow the
    #: parameter's layout; False when its statistics are over the whole tensor only (or none)
    per_unit: ClassVar[bool] = True
    #: True when, on tensors of 2+ dims, the result for a row depends only on that row (per-row
    #: statistics at most): the engine may then step a large tensor in pieces of whole rows
    row_local: ClassVar[bool] = False
    #: True when, on 0-/1-D tensors, it takes a statistic of the whole vector (AGC's and soft
    #: clipping's unit is then the vector): a shard of a vector is then not row-local, even when
    #: ``row_local`` holds for matrices (see :meth:`rows_apart`)
    vector_stats: ClassVar[bool] = False
    #: True when every statistic of the whole tensor it needs is a sum, sum of squares or norm
    #: asked of the statistics backend (``ctx.norm``, ``ctx.mean``, ``ctx.stats.sum_sq``; per-row
    #: ones allowed): a shard of whole rows may then take the compiled kernel in stages, the
    #: statistic completed over the processes between kernels
    #: (:func:`hfoptim.core.compiled_step.shard_staged`)
    staged_stats: ClassVar[bool] = False

    def enabled(self, group: dict) -> bool:
        value = group[self.switch]
        return value is not None and value is not False

    def rows_apart(self, global_shape) -> bool:
        """Whether the rows of a tensor of ``global_shape`` may be stepped apart (in pieces, or as
        shards with no statistic of another process): ``row_local``, and for a 0-/1-D tensor (whose
        "rows" are its elements) no statistic of the whole vector."""
        return self.row_local and (len(global_shape) >= 2 or not self.vector_stats)

    def incompatible(self, rule) -> str | None:
        """Why this modifier cannot run with ``rule``, or None."""
        return None

    def check_options(self, group: dict) -> str | None:
        """What is wrong with the group's options for this modifier (an option given that it
        would not use, one it needs that is missing), or None. Called for every group."""
        return None

    def apply(self, ctx, x: TensorList, g: TensorList, p: TensorList) -> TensorList:
        """Return the modified ``x`` (the gradient, or the update) as a new list; never write
        into ``x``, ``g`` or ``p``. (A POST modifier writes ``p`` in place instead: ``x`` is then
        what :meth:`prepare` returned, ``g`` the gradient.)"""
        raise NotImplementedError

    def prepare(self, ctx, p: TensorList):
        """POST modifiers: called before the update with the parameters as they were; the result
        is handed to :meth:`apply` after it."""
        return None
