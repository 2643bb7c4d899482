"""SM3: a second moment kept as maxima over a cover of the tensor (rows, columns, ...)."""

from __future__ import annotations

import torch

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, STATISTIC, Rule, Slot
from ..core.tensorlist import TensorList


def _row_shape(shape: tuple) -> tuple:
    """``acc_row``: one value per row (dim 0) of a 2+-D tensor, per element of a 0-/1-D one."""
    return tuple(shape[:1]) if len(shape) >= 2 else tuple(shape)


def _rest_shape(shape: tuple) -> tuple:
    """``acc_rest``: the accumulators of dims 1..k-1 one after the other (none for 0-/1-D)."""
    return (sum(shape[1:]),) if len(shape) >= 2 else (0,)


class SM3Rule(Rule):
    r"""SM3-II (Anil, Gupta, Koren & Singer 2019, "Memory-Efficient Adaptive Optimization",
    arXiv 1901.11150, Algorithm SM3-II), with optional momentum.

    For a tensor of shape ``(n_0, ..., n_{k-1})``, k >= 2, one accumulator vector per dimension,
    ``\mu^{(d)} \in R^{n_d}`` (zero at the start); for an element ``i = (i_0, ..., i_{k-1})``:

    .. math::
        \nu_t(i) = \min_d \mu^{(d)}_{t-1}(i_d) + g_t(i)^2,\qquad
        \mu^{(d)}_t(j) = \max_{i:\, i_d = j} \nu_t(i)

        u_t = g_t / \sqrt{\nu_t + \epsilon},\qquad
        b_t = m\, b_{t-1} + (1-m)\, u_t\ \ (\text{momentum } m > 0),\qquad
        p_t = p_{t-1} - \mathrm{lr}\,(b_t \text{ or } u_t)

    For a matrix the cover is its rows and columns: ``nu_ij = min(R_i, C_j) + g_ij^2``,
    ``R_i = max_j nu_ij``, ``C_j = max_i nu_ij``. Tensors of 0 or 1 dimensions are their own
    cover: Adagrad, ``nu_t = nu_{t-1} + g_t^2`` per element.

    ``beta = 0`` (default) is the paper's SM3-II above (sums of squares, no decay), as in
    google-research's sm3/sm3.py (TensorFlow 1, read at 0c1bbe5: ``u = (1-m) g rsqrt(nu + 1e-30)``,
    ``b <- m b + u``, the same update). ``beta > 0`` is pytorch_optimizer's exponential-moving-
    average form, ``nu_t = beta min_d mu + (1 - beta) g^2``, whose accumulators then keep their
    maximum, ``mu_t = max(mu_{t-1}, max nu_t)``. ``eps`` (1e-30, as both codes) only keeps
    ``g / sqrt(nu)`` finite where a gradient and its accumulators are all zero; the paper has
    none. Momentum as both codes: ``b = m b + (1 - m) u``.

    Defaults (pytorch_optimizer's): ``lr=0.1``, ``momentum=0``, ``beta=0``, ``eps=1e-30``,
    ``weight_decay=0`` (google-research's code has no defaults). The authors' README warms the
    learning rate up quadratically over the first ~5% of steps and does not decay it.

    **Sharding.** The row maxima of the rows a process holds are local; the maxima of the other
    dimensions are maxima over all rows, combined with one MAX all-reduce for all the tensors of
    a bucket (``ctx.stats.dim_absmax``, the per-dimension maxima 4-bit state uses too), so the
    accumulators are the whole tensor's.

    **State and bytes.** ``acc_row`` (``n_0`` values; ``numel`` for 0-/1-D tensors) and
    ``acc_rest`` (``n_1 + ... + n_{k-1}``), fp32, plus ``momentum_buffer`` (``numel``) when
    ``momentum > 0``. A 4096x4096 matrix keeps 8192 values, 4 bytes x (m + n) / (m n) = 0.002
    bytes/param: the same as Adafactor's factored second moment (row and column sums), and
    Adafactor without ``beta1`` likewise keeps no first moment. For a 4-D convolution SM3 keeps
    ``n_0 + n_1 + n_2 + n_3`` values where Adafactor (ours) keeps ``n_0 + n_1 n_2 n_3``. With
    momentum SM3 adds 4 bytes/param (or 1 with ``state="8bit"``, which stores only the
    momentum). The accumulators are SM3's own cover, never compressed again: ``factored``,
    ``shared`` and ``smmf`` storage are refused.
    """

    name = "sm3"
    staged_stats = True  # the accumulators' per-dimension maxima (see Rule.staged_stats)
    class_name = "SM3"
    paper = "Memory-Efficient Adaptive Optimization, arXiv 1901.11150"
    hyperparams = {
        "lr": HP(0.1, low=0.0),
        "momentum": HP(0.0, low=0.0, high=1.0, high_open=True, doc="m of b = m b + (1-m) u; 0: no momentum"),
        "beta": HP(0.0, low=0.0, high=1.0, high_open=True, doc="0: SM3-II sums; > 0: EMA of squares"),
        "eps": HP(1e-30, low=0.0, doc="added to nu under the square root"),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("acc_row", STATISTIC, shape=_row_shape),
        Slot("acc_rest", STATISTIC, shape=_rest_shape),
        Slot("momentum_buffer", FIRST_MOMENT, when=lambda group: group["momentum"] > 0),
    )
    refused_state = {
        form: "SM3's second moment already is its own cover of per-dimension maxima (acc_row, acc_rest), kept "
        "in fp32; only its momentum can be stored otherwise (state='8bit' or 'bf16' with momentum > 0)"
        for form in ("factored", "shared", "smmf")
    }

    def update(self, ctx, p, g, s):
        beta, eps = ctx.group["beta"], ctx.group["eps"]
        nus, matrices = [], []
        for i, (gi, row, rest) in enumerate(zip(g, s.acc_row, s.acc_rest)):
            if gi.dim() < 2:  # Adagrad (or its EMA form) per element
                nu = row * beta if beta > 0 else row.clone()
                nus.append(nu.addcmul_(gi, gi, value=1 - beta))
                continue
            nu = _cover_min(row, rest, gi.shape)
            if beta > 0:
                nu.mul_(beta)
            nus.append(nu.addcmul_(gi, gi, value=1 - beta))
            matrices.append(i)
        # nu >= 0, so its per-dimension maxima of |nu| are SM3's cover: dimension 0 -> acc_row,
        # the others concatenated -> acc_rest
        maxima = ctx.stats.dim_absmax([nus[i] for i in matrices], [ctx.views[i] for i in matrices])
        for i, per_dim in zip(matrices, maxima):
            _keep(s.acc_row[i], per_dim[0], beta)
            _keep(s.acc_rest[i], torch.cat(per_dim[1:]), beta)
        for i, gi in enumerate(g):
            if gi.dim() < 2:
                _keep(s.acc_row[i], nus[i], beta)
        u = TensorList(nus, g.foreach).add_(eps).sqrt_().rdiv_(g)  # g / sqrt(nu + eps), in place
        if ctx.group["momentum"] > 0:
            s.momentum_buffer.lerp_(u, 1 - ctx.group["momentum"])
            return s.momentum_buffer.clone()
        return u


def _cover_min(row: torch.Tensor, rest: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``min_d mu^(d)(i_d)`` for every element of a (local) tensor of ``shape``, a new tensor."""
    k = len(shape)
    out = row.view(-1, *([1] * (k - 1))).expand(shape).clone()
    start = 0
    for d in range(1, k):
        n = shape[d]
        acc = rest[start : start + n].view(*([1] * d), n, *([1] * (k - 1 - d)))
        torch.minimum(out, acc, out=out)
        start += n
    return out


def _keep(acc: torch.Tensor, new: torch.Tensor, beta: float) -> None:
    """SM3-II replaces the accumulator by the new maxima; the EMA form keeps the larger."""
    if beta > 0:
        torch.maximum(acc, new, out=acc)
    else:
        acc.copy_(new)
