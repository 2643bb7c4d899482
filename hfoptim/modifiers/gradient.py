"""Modifiers of the gradient, applied before the rule (in this order)."""

from __future__ import annotations

import torch

from ..core.hparams import HP
from ..core.tensorlist import TensorList
from .base import GRAD, Modifier


def _unit_sum_sq(ctx, x: TensorList) -> list[torch.Tensor]:
    """Sum of squares per unit: per row (dim 0) for tensors with 2+ dims, whole tensor for 1-D,
    shaped to broadcast against the tensor. Two statistics calls for the list (the rows of the
    matrices, the totals of the vectors)."""
    rows = ctx.row_sums(x, square=True)
    vectors = [i for i, r in enumerate(rows) if r is None]
    whole = {}
    if vectors:
        whole = dict(zip(vectors, ctx.stats.sum_sq([x.tensors[i] for i in vectors], [ctx.views[i] for i in vectors])))
    return [whole[i] if r is None else r.view(-1, *([1] * (t.dim() - 1))) for i, (t, r) in enumerate(zip(x, rows))]


def _unit_numel(ctx, i: int, t: torch.Tensor) -> int:
    shape = ctx.views[i].global_shape
    return ctx.numel(i) // shape[0] if len(shape) > 1 else ctx.numel(i)


class AdaptiveGradientClipping(Modifier):
    """Adaptive gradient clipping (NFNets, Brock et al. 2021, arXiv 2102.06171).

    Per unit (row of a matrix or filter, whole vector for 1-D):
    ``g <- g * c max(||p||, eps) / max(||g||, 1e-6)`` where ``||g|| > c max(||p||, eps)``.
    As in the NFNets code, the 1e-6 floor only guards the division; the trigger uses the true
    ``||g||``.
    """

    name = "agc"
    row_local = True  # per-row norms of matrices
    vector_stats = True  # a vector's norm (see Modifier.rows_apart)
    staged_stats = True  # row norms, a vector's norm (see Modifier.staged_stats)
    stage = GRAD
    switch = "agc"
    hyperparams = {
        "agc": HP(None, kind="optional_float", low=0.0, low_open=True, doc="clip factor c (NFNets: 0.01)"),
        "agc_eps": HP(1e-3, low=0.0, doc="floor of the parameter norm"),
    }
    suffix_kwargs = {"agc": 0.01}

    def apply(self, ctx, x, g, p):
        clip, eps = ctx.group["agc"], ctx.group["agc_eps"]
        p_norm = _unit_sum_sq(ctx, p)
        x_norm = _unit_sum_sq(ctx, x)
        out = []
        for t, pn, xn in zip(x, p_norm, x_norm):
            max_norm = pn.sqrt().clamp_min(eps) * clip
            xn = xn.sqrt()
            out.append(torch.where(xn > max_norm, t * (max_norm / xn.clamp_min(1e-6)), t))
        return TensorList(out, x.foreach)


class SoftClip(Modifier):
    """Soft clipping: the gradient's RMS is limited to the parameter's RMS.

    Per tensor (per output row for tensors with 2+ dims):
    ``g <- g * min(rms(g), max(rms(p), eps)) / rms(g)``, ``rms(g)`` floored at 1e-12.

    ``soft_clip_eps`` (default 1e-12, the source's floor) bounds the parameter RMS from below.
    A tensor that starts at zero (LoRA's B matrix, zero-initialised biases) would otherwise get
    a gradient of RMS 1e-12 and barely move: raise it (e.g. to 1e-3, as AGC's floor) there.
    """

    name = "softclip"
    row_local = True  # per-row RMS of matrices
    vector_stats = True  # a vector's RMS (see Modifier.rows_apart)
    staged_stats = True  # row RMS, a vector's RMS (see Modifier.staged_stats)
    stage = GRAD
    switch = "soft_clip"
    hyperparams = {
        "soft_clip": HP(False, kind="bool"),
        "soft_clip_eps": HP(1e-12, low=0.0, low_open=True, doc="floor of the parameter RMS"),
    }
    suffix_kwargs = {"soft_clip": True}

    def apply(self, ctx, x, g, p):
        floor = ctx.group["soft_clip_eps"]
        p_sq = _unit_sum_sq(ctx, p)
        x_sq = _unit_sum_sq(ctx, x)
        out = []
        for i, (t, ps, xs) in enumerate(zip(x, p_sq, x_sq)):
            n = _unit_numel(ctx, i, t)
            rms_x = (xs / n).sqrt().clamp_min(1e-12)
            rms_p = (ps / n).sqrt().clamp_min(floor)
            out.append(t * (torch.minimum(rms_x, rms_p) / rms_x))
        return TensorList(out, x.foreach)


class GradientCentralization(Modifier):
    """Gradient centralization (Yong et al. 2020, arXiv 2004.01461).

    For tensors with 2+ dims: ``g <- g - mean(g over all dims but 0)``; 1-D tensors unchanged.
    """

    name = "gc"
    stage = GRAD
    switch = "centralize"
    row_local = True  # row means only
    hyperparams = {"centralize": HP(False, kind="bool")}
    suffix_kwargs = {"centralize": True}

    def apply(self, ctx, x, g, p):
        out = []
        for i, (t, row_sum) in enumerate(zip(x, ctx.row_sums(x))):  # one statistics call for the list
            if row_sum is None:
                out.append(t)
            else:
                row_mean = row_sum / _unit_numel(ctx, i, t)
                out.append(t - row_mean.view(-1, *([1] * (t.dim() - 1))))
        return TensorList(out, x.foreach)


class GradientNormalization(Modifier):
    """Gradient normalization per tensor: ``g <- g / (||g||_2 + eps)``.

    The norm is the whole tensor's L2 norm (through the step context, so exact when the
    parameter is sharded); the result is a new tensor, never ``p.grad``. Applied last among the
    gradient modifiers (after clipping and centralization). Ranger21 and pytorch_optimizer's
    ``normalize_gradient`` divide by the standard deviation instead (``g / (std(g) + 1e-8)``,
    tensors of 3+ elements only): a different statistic, not this option.
    """

    name = "gradnorm"
    staged_stats = True  # the whole tensor's norm (see Modifier.staged_stats)
    stage = GRAD
    switch = "normalize_grad"
    hyperparams = {
        "normalize_grad": HP(False, kind="bool"),
        "normalize_grad_eps": HP(1e-8, low=0.0, doc="added to the gradient's norm"),
    }
    suffix_kwargs = {"normalize_grad": True}

    def apply(self, ctx, x, g, p):
        eps = ctx.group["normalize_grad_eps"]
        return x / [n + eps for n in ctx.norm(x)]
