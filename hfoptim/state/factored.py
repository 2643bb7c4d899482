r"""Factored second moment: Adafactor's row and column statistics (Shazeer & Stern 2018,
arXiv 1804.04235, section 3), for any rule with a second moment.

A tensor with two or more dimensions is seen as the matrix ``V`` of shape
``(shape[0], prod(shape[1:]))`` -- output units by everything else. (Adafactor's code and
torch.optim.Adafactor factor the last two dimensions instead, batching the leading ones; for a
convolution ``(out, in, kh, kw)`` that keeps ``out*in*(kh+kw)`` numbers, ours keeps
``out + in*kh*kw``. Rows along dimension 0 are also what FSDP2 shards, so a shard holds whole
rows.) Stored, in the compute dtype (fp32 for fp32/bf16/fp16 parameters):

* ``"<slot>.row"``: ``R = V 1`` (row sums, shape ``(rows,)``)
* ``"<slot>.col"``: ``C = 1^T V`` (column sums, shape ``(cols,)``)

.. math::
    \mathrm{decode}(R, C) = \frac{R\,C}{1^\top C}\quad(\text{outer product}; 1^\top C = 1^\top R),\qquad
    \mathrm{encode}(V) = (V 1,\; 1^\top V)

**The precision fix.** Common code forms ``(R / mean(R)).rsqrt() * C.rsqrt()``: two reciprocal
square roots of numbers far from 1, each rounded in the working precision. Here the decode
forms ``(R / 1^T C)`` (a number in [0, 1]) times ``C`` in the compute dtype (fp32 at least), so
the product has the magnitude of ``V`` itself (no overflow or underflow of ``R C``), and the
consumer takes the one square root last (``u = m / sqrt(V_hat)``).

**Why storing row/column sums of the updated V is Adafactor.** The rule updates the decoded
``V_hat_{t-1}`` as usual, ``V_t = b V_hat_{t-1} + (1-b) G^2``; the sums are linear, and
``V_hat_{t-1} 1 = R_{t-1} (1^T C_{t-1}) / (1^T R_{t-1}) = R_{t-1}`` because both factors sum to
the same total, so ``V_t 1 = b R_{t-1} + (1-b) G^2 1``: exactly Adafactor's EMA of row
statistics (and likewise for columns). Tested in tests/test_factored_smmf_shared.py.

Within a step the rule works on the full ``V_t`` (for AdamW: the exact current ``G^2`` term);
a rule whose paper divides by the factored ``V_hat_t`` (Adafactor) calls ``ctx.stored``.

**Range.** The rank-1 value of a tiny row and a tiny column can fall below the smallest normal
float even where every element of ``V`` was at least ``eps1``; the decode floors ``V_hat`` at that
number (``torch.finfo(dtype).tiny``, fp32: 1.2e-38) once the state is non-zero, so ``G / sqrt(V_hat)``
stays finite instead of becoming inf or NaN. (The common form keeps this range by taking the
roots before the product, at the cost of the second rounding.)

One-dimensional tensors (and scalars, and empty tensors) stay dense under ``"<slot>"``, as in
Adafactor.

**The total.** ``1^T R = 1^T C`` (both sum every element of ``V``); the decode takes ``1^T C``.
``C`` is the one factor every process holds whole, so the total needs no collective when the
parameter is sharded.

Sharding: the row sums of a shard's rows are local; the column sums are completed across the
processes -- by the stats backend inside the step (``stats.col_sums``, the plain path), or by one
all-reduce after the compiled kernels of a bucket, which leave this process's partial sums in
``"<slot>.col"`` (:meth:`Factored.shard_sums`; :mod:`hfoptim.core.compiled_step`).
"""

from __future__ import annotations

import math

import torch

from ..core.rule import SECOND_MOMENT, Slot
from ..core.stats import ParamView
from .codec import Codec, Dense

_DENSE = Dense()


def factored_cols(view: ParamView) -> int | None:
    """Columns of the 2-D view ``(shape[0], prod(shape[1:]))``, or None for a 0-/1-D or empty
    tensor (kept dense)."""
    shape = view.global_shape
    if len(shape) < 2 or view.global_numel == 0:
        return None
    return math.prod(shape[1:])


class Factored(Codec):
    """Adafactor row and column sums; see the module docstring."""

    name = "factored"
    fusable = True
    kinds = frozenset({SECOND_MOMENT})

    @staticmethod
    def _keys(slot: Slot) -> tuple[str, str]:
        return f"{slot.name}.row", f"{slot.name}.col"

    def shard_local(self, slot, view):
        """A shard of whole rows is stepped alone: its row sums are its own, and the column sums it
        leaves are completed after the step (:meth:`shard_sums`)."""
        return True

    def shard_sums(self, slot, view):
        """The column sums of a factored matrix."""
        return () if factored_cols(view) is None else (self._keys(slot)[1],)

    def shapes(self, slot, view, p):
        cols = factored_cols(view)
        if cols is None:
            return _DENSE.shapes(slot, view, p)
        row, col = self._keys(slot)
        return {row: (p.numel() // cols,), col: (cols,)}

    def init(self, slot, value, view, *, stats=None):
        cols = factored_cols(view)
        if cols is None:
            return _DENSE.init(slot, value, view)
        row, col = self._keys(slot)
        matrix = value.reshape(-1, cols)
        return {row: stats.row_sum(matrix, view).clone(), col: stats.col_sum(matrix, view).clone()}

    def decode(self, slot, stored, view, dtype, *, stats=None):
        return self.decode_many(slot, [stored], [view], dtype, stats=stats)[0]

    def decode_many(self, slot, stored, views, dtype, *, stats=None):
        out = [_DENSE.decode(slot, s, v, dtype) if factored_cols(v) is None else None for s, v in zip(stored, views)]
        index = [i for i, v in enumerate(out) if v is None]
        row, col = self._keys(slot)
        tiny = torch.finfo(dtype).tiny
        for i in index:
            r, c = stored[i][row].to(dtype), stored[i][col].to(dtype)
            total = c.sum()  # = 1^T R, with C held whole on every process (see "The total")
            v = (r / total.clamp_min(tiny)).unsqueeze(1) * c.unsqueeze(0)
            v.clamp_min_(torch.where(total > 0, tiny, 0.0))  # see "Range" in the module docstring
            out[i] = v.reshape(r.numel(), *views[i].global_shape[1:])  # this process's rows
        return out

    def encode(self, slot, stored, value, view, *, stats=None):
        self.encode_many(slot, [stored], [value], [view], stats=stats)

    def encode_many(self, slot, stored, values, views, *, stats=None):
        index = []
        for i, (s, x, v) in enumerate(zip(stored, values, views)):
            if factored_cols(v) is None:
                _DENSE.encode(slot, s, x, v)
            else:
                index.append(i)
        if not index:
            return
        row, col = self._keys(slot)
        matrices = [values[i].reshape(-1, factored_cols(views[i])) for i in index]
        vs = [views[i] for i in index]
        for i, r, c in zip(index, stats.row_sums(matrices, vs), stats.col_sums(matrices, vs)):
            stored[i][row].copy_(r)
            stored[i][col].copy_(c)
