"""Modifiers of the update direction, applied after the rule (in this order)."""

from __future__ import annotations

import torch

from ..core.hparams import HP
from ..core.tensorlist import TensorList
from .base import UPDATE, Modifier


class CautiousMask(Modifier):
    """Cautious optimizers (Liang et al. 2024, arXiv 2411.16085).

    ``mask = 1[u * g > 0]``; ``u <- u * mask / max(mean(mask), 1e-3)`` (the renormalization of
    the authors' later code, also used by pytorch_optimizer; the first code used
    ``numel / (sum(mask) + 1)``).
    """

    name = "cautious"
    stage = UPDATE
    switch = "cautious"
    per_unit = False  # the mean of the mask over the whole tensor
    hyperparams = {"cautious": HP(False, kind="bool")}
    suffix_kwargs = {"cautious": True}

    def apply(self, ctx, x, g, p):
        masks = [(u * gi > 0).to(u.dtype) for u, gi in zip(x, g)]
        means = ctx.mean(TensorList(masks, x.foreach))
        return TensorList([u * (m / mean.clamp_min(1e-3)) for u, m, mean in zip(x, masks, means)], x.foreach)


class TrustRatio(Modifier):
    """LAMB layer-wise trust ratio (You et al. 2019, arXiv 1904.00962, Algorithm 2).

    With decoupled weight decay (LAMB's form) the decay is part of the direction the ratio
    measures: ``r = u + wd p``, ``p <- p - lr phi(||p||) / ||r|| r``. The engine applies the
    decoupled decay after this modifier, so the modifier returns ``ratio * r - wd p`` and the
    engine's ``p (1 - lr wd) - lr (ratio r - wd p)`` is exactly the LAMB step. With the other
    decay forms (l2: already in the gradient; cautious, proximal) the ratio scales ``u`` alone.

    ``phi(x) = min(x, trust_clamp)`` (pytorch_optimizer's Lamb clamps at 10; None: no clamp); the
    ratio is 1 where either norm is 0. ``||p||`` is the norm before this step's update.
    """

    name = "trust"
    stage = UPDATE
    switch = "trust_ratio"
    per_unit = False  # norms of the whole tensor
    hyperparams = {
        "trust_ratio": HP(False, kind="bool"),
        "trust_clamp": HP(10.0, kind="optional_float", low=0.0, low_open=True),
    }
    suffix_kwargs = {"trust_ratio": True}

    def apply(self, ctx, x, g, p):
        clamp = ctx.group["trust_clamp"]
        wd = ctx.group["weight_decay"]
        decay_inside = ctx.group["weight_decay_mode"] == "decoupled" and wd != 0
        direction = x + p * wd if decay_inside else x
        p_norms = ctx.norm(p)
        u_norms = ctx.norm(direction)
        out = []
        for i, (r, pn, un) in enumerate(zip(direction, p_norms, u_norms)):
            if clamp is not None:
                pn = pn.clamp_max(clamp)
            ratio = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
            out.append(r * ratio - p[i] * wd if decay_inside else r * ratio)
        return TensorList(out, x.foreach)
