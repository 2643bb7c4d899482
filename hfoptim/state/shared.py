r"""Shared second moment: one value per row, or per tensor (Adam-mini, Zhang et al. 2024,
arXiv 2406.16793; Amos, Tian & Parikh 2022, arXiv 2210.11693), for any rule with a second
moment.

* a tensor with two or more dimensions keeps one value per row of its ``(shape[0], rest)`` view
  -- one per output neuron, Adam-mini's partition for most weight matrices (Adam-mini further
  splits query/key weights by head and keeps embeddings per token; here every 2+-D tensor is
  split by dimension 0, which needs no knowledge of the model);
* a 1-D tensor or a scalar keeps one value for the whole tensor (Amos's per-tensor ``v``;
  Adam-mini's choice for biases and norm weights).

.. math::
    \mathrm{encode}(V)_i = \frac{1}{\mathrm{cols}} \sum_j V_{ij}\quad(\text{row means}),\qquad
    \mathrm{decode}(s)_{ij} = s_i

Stored under ``"<slot>.row"`` (shape ``(rows,)``) or ``"<slot>.mean"`` (shape ``()``), in the
compute dtype; an empty tensor stays dense. Means are linear, so storing the mean of the updated ``V_t = b V_hat_{t-1} +
(1-b) G^2`` is Adam-mini's EMA of the block mean of ``G^2``. Within a step the rule divides by
the full ``V_t`` (whose newest term is the exact ``G_t^2``), then the row mean is kept; Adam-mini
divides by the block mean of step t itself -- the two differ by that one ``(1-b) G_t^2`` term.

Sharding: row sums of a shard's rows are local (the compiled kernel steps a shard of whole rows
alone); the per-tensor mean goes through ``stats.sum``.
"""

from __future__ import annotations

import math

from ..core.rule import SECOND_MOMENT, Slot
from .codec import Codec, Dense

_DENSE = Dense()


class Shared(Codec):
    """One second-moment value per row (2+-D) or per tensor (0-/1-D); see the module docstring."""

    name = "shared"
    fusable = True
    kinds = frozenset({SECOND_MOMENT})

    @staticmethod
    def _key(slot: Slot, view) -> str:
        return f"{slot.name}.row" if len(view.global_shape) >= 2 else f"{slot.name}.mean"

    def shard_local(self, slot, view):
        """The row means of a matrix's shard of whole rows are its own; a vector's mean is not."""
        return len(view.global_shape) >= 2 or view.global_numel == 0

    def shapes(self, slot, view, p):
        if view.global_numel == 0:  # empty: nothing to share
            return _DENSE.shapes(slot, view, p)
        if len(view.global_shape) >= 2:
            return {self._key(slot, view): (p.shape[0],)}
        return {self._key(slot, view): ()}

    def init(self, slot, value, view, *, stats=None):
        if view.global_numel == 0:  # empty: nothing to share
            return _DENSE.init(slot, value, view)
        shape = (value.shape[0],) if len(view.global_shape) >= 2 else ()
        stored = {self._key(slot, view): value.new_zeros(shape)}
        self.encode(slot, stored, value, view, stats=stats)
        return stored

    def decode(self, slot, stored, view, dtype, *, stats=None):
        if view.global_numel == 0:  # empty: nothing to share
            return _DENSE.decode(slot, stored, view, dtype)
        shape = view.global_shape
        s = stored[self._key(slot, view)].to(dtype)
        if len(shape) >= 2:
            return s.reshape(-1, *([1] * (len(shape) - 1))).expand(s.numel(), *shape[1:]).clone()
        return s.expand(view.local_shape).clone()  # this process's elements

    def encode(self, slot, stored, value, view, *, stats=None):
        self.encode_many(slot, [stored], [value], [view], stats=stats)

    def encode_many(self, slot, stored, values, views, *, stats=None):
        rows, whole = [], []
        for i, (s, x, v) in enumerate(zip(stored, values, views)):
            if v.global_numel == 0:  # empty: nothing to share
                _DENSE.encode(slot, s, x, v)
            else:
                (rows if len(v.global_shape) >= 2 else whole).append(i)
        # one reduction for the row sums of all matrices, one for the totals of all vectors
        sums = stats.row_sums([values[i] for i in rows], [views[i] for i in rows]) if rows else []
        for i, r in zip(rows, sums):
            stored[i][self._key(slot, views[i])].copy_(r / math.prod(views[i].global_shape[1:]))
        totals = stats.sum([values[i] for i in whole], [views[i] for i in whole]) if whole else []
        for i, t in zip(whole, totals):
            stored[i][self._key(slot, views[i])].copy_(t / max(views[i].global_numel, 1))
