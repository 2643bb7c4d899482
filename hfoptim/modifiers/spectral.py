"""Warm-up-free step control (AdamW^2): cap each weight matrix's step relative to the matrix, in
spectral norm."""

from __future__ import annotations

import torch

from ..core.hparams import HP
from ..core.stats import LocalStats, ParamView
from ..core.tensorlist import TensorList
from .base import UPDATE, Modifier

#: tau of the ``_spectralcap`` suffix (ours: the paper's value could not be read here)
DEFAULT_TAU = 0.05
#: power iterations per matrix and step (ours, likewise)
DEFAULT_ITERS = 5


#: the golden ratio's fractional part: the start vector's components are frac(i * GOLDEN)
GOLDEN = 0.6180339887498949


def start_vector(n: int, like: torch.Tensor) -> torch.Tensor:
    """The power iteration's start vector for matrices of ``n`` columns: ``frac(i * GOLDEN)``,
    ``i = 1 .. n``, scaled to unit length (computed in float64, returned in ``like``'s dtype and
    device). Spread over (0, 1) like uniform noise but pure arithmetic: the same on every process
    and step, and no random generator inside a ``torch.compile`` graph (one would break it). It is
    far from orthogonal to the all-ones direction (a constant gradient's singular vector)."""
    i = torch.arange(1, n + 1, dtype=torch.float64, device=like.device)
    v = torch.frac(i * GOLDEN)
    return (v / v.norm()).to(like.dtype)


def top_singular_values(
    stats: LocalStats, matrices: list[torch.Tensor], views: list[ParamView], iters: int
) -> list[torch.Tensor]:
    r"""Estimate :math:`\sigma_1` of each matrix (a tensor of 2+ dims seen as
    ``(rows, prod(other dims))``) by ``iters`` power iterations on :math:`A^\top A` from a fixed
    start vector :math:`v_0`: :math:`v_{k+1} = A^\top A v_k / \|A^\top A v_k\|`, then
    :math:`\sigma_1 \approx \|A v_K\|` (a lower bound that tightens with ``iters``).

    Sharded, each process holds some rows of :math:`A`: :math:`A v` is a per-row statistic
    (rows cut by a ZeRO partition boundary are completed by the statistics backend),
    :math:`A^\top y` a column statistic and :math:`\|A v\|` a total, so the estimate is the
    whole matrix's, equal on every process; two small all-reduces per iteration for the whole
    list of matrices."""
    flat = [m.reshape(v.rows, v.row_len) for m, v in zip(matrices, views)]
    vecs = [start_vector(v.row_len, m) for m, v in zip(flat, views)]
    for _ in range(iters):
        cols = _rmatvec(stats, flat, _matvec(stats, flat, vecs, views), views)
        vecs = [c / c.norm().clamp_min(torch.finfo(c.dtype).tiny) for c in cols]
    rows = _matvec(stats, flat, vecs, views)
    return [s.sqrt() for s in stats.sum_sq(rows, views)]


def _matvec(stats: LocalStats, flat: list, vecs: list, views: list[ParamView]) -> list[torch.Tensor]:
    """``A x`` per matrix: a matrix product where the matrix is held whole, per-row sums of
    ``A * x`` through the statistics backend for shards (one collective for all of them)."""
    out = [a @ x if not v.sharded else None for a, x, v in zip(flat, vecs, views)]
    shards = [i for i, v in enumerate(views) if v.sharded]
    if shards:
        sums = stats.row_sums([flat[i] * vecs[i] for i in shards], [views[i] for i in shards])
        for i, y in zip(shards, sums):
            out[i] = y
    return out


def _rmatvec(stats: LocalStats, flat: list, rows: list, views: list[ParamView]) -> list[torch.Tensor]:
    """``A^T y`` per matrix (``y`` one value per local row), likewise: column sums of
    ``A * y[:, None]`` for shards, so rows cut by a partition boundary count once."""
    out = [y @ a if not v.sharded else None for a, y, v in zip(flat, rows, views)]
    shards = [i for i, v in enumerate(views) if v.sharded]
    if shards:
        sums = stats.col_sums([flat[i] * rows[i][:, None] for i in shards], [views[i] for i in shards])
        for i, c in zip(shards, sums):
            out[i] = c
    return out


class SpectralCap(Modifier):
    r"""AdamW^2's update-size control (Qi, He, Ye, Li, Zi, Dai, Zou, Xiao, "Taming Transformer
    Without Using Learning Rate Warmup", ICLR 2025, arXiv 2505.21910), for any rule.

    Per weight matrix :math:`W` (every tensor of 2+ dims, as ``(rows, prod(other dims))``), with
    :math:`u_t` the update direction the rule (and the modifiers before this one) produced and
    :math:`\mathrm{lr}_t` the step size the engine applies:

    .. math::
        \mathrm{lr}'_t = \min\Big(\mathrm{lr}_t,\ \tau\, \frac{\sigma_1(W_{t-1})}{\sigma_1(u_t)}\Big)

    i.e. :math:`u_t` is scaled by :math:`\tau \sigma_1(W_{t-1}) / (\mathrm{lr}_t \sigma_1(u_t))`
    where the step's spectral norm would exceed :math:`\tau` times the matrix's. By Weyl's
    inequality the singular values of :math:`W` then move by at most :math:`\tau \sigma_1(W)` per
    step, which the paper uses to keep the spectral energy of :math:`W_q^\top W_k` from
    concentrating in a few directions (the model crash that warm-up otherwise prevents).
    :math:`\sigma_1` comes from :func:`top_singular_values` (power iteration), exact under
    sharding. Decoupled weight decay is applied apart, as the engine does for every rule.

    Settled here: the abstract compares the ratio :math:`\sigma_1(\nabla W_t)/\sigma_1(W_{t-1})`
    with "a threshold" and bounds the learning rate by "a weighted multiple"
    :math:`\tau \sigma_1(W_{t-1})/\sigma_1(\nabla W_t)`; we read threshold and weight as one
    :math:`\tau` applied to the actual step :math:`\mathrm{lr}_t u_t` (so the cap is continuous).
    The paper's :math:`\tau`, the number of power iterations and the exact set of matrices could
    not be read here (no code found): ``spectral_cap`` (= :math:`\tau`, suffix default 0.05) and
    ``spectral_cap_iters`` (5) are ours. Vectors (biases, norms) are left alone; a matrix with
    :math:`\sigma_1(W) = 0` (LoRA's zero-initialised B) is not capped, since the cap would
    freeze it at zero forever. Per parameter group, ``spectral_cap=None`` switches it off (e.g.
    for embeddings).
    """

    name = "spectralcap"
    stage = UPDATE
    switch = "spectral_cap"
    hyperparams = {
        "spectral_cap": HP(
            None,
            kind="optional_float",
            low=0.0,
            low_open=True,
            doc="tau: each matrix's step is at most tau * sigma1(W) in spectral norm (AdamW^2, arXiv 2505.21910)",
        ),
        "spectral_cap_iters": HP(DEFAULT_ITERS, kind="int", low=1, doc="power iterations for sigma1"),
    }
    suffix_kwargs = {"spectral_cap": DEFAULT_TAU}

    def apply(self, ctx, x, g, p):
        tau = ctx.group["spectral_cap"]
        index = [i for i, v in enumerate(ctx.views) if len(v.global_shape) >= 2]
        if not index:
            return x
        views = [ctx.views[i] for i in index]
        sigmas = top_singular_values(
            ctx.stats, [p[i] for i in index] + [x[i] for i in index], views + views, ctx.group["spectral_cap_iters"]
        )
        out = list(x)
        for k, i in enumerate(index):
            sigma_w, sigma_u = sigmas[k], sigmas[len(index) + k]
            lr = ctx.lr[i] if isinstance(ctx.lr, list) else ctx.lr
            step, limit = sigma_u * lr, sigma_w * tau
            scale = torch.where((step > limit) & (sigma_w > 0), limit / step, 1.0)
            out[i] = x[i] * scale.to(x[i].dtype)
        return TensorList(out, x.foreach)
