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
    hyperparams = {"cautious": HP(False, kind="bool")}
    suffix_kwargs = {"cautious": True}

    def apply(self, ctx, x, g, p):
        masks = [(u * gi > 0).to(u.dtype) for u, gi in zip(x, g)]
        means = ctx.mean(TensorList(masks, x.foreach))
        return TensorList(
            [u * (m / mean.clamp_min(1e-3)) for u, m, mean in zip(x, masks, means)], x.foreach
        )


class TrustRatio(Modifier):
    """LAMB layer-wise trust ratio (You et al. 2019, arXiv 1904.00962).

    ``u <- u * phi(||p||) / ||u||`` where both norms are positive (else unchanged),
    ``phi(x) = min(x, trust_clamp)`` (pytorch_optimizer's Lamb clamps at 10; None: no clamp).
    """

    name = "trust"
    stage = UPDATE
    switch = "trust_ratio"
    hyperparams = {
        "trust_ratio": HP(False, kind="bool"),
        "trust_clamp": HP(10.0, kind="optional_float", low=0.0, low_open=True),
    }
    suffix_kwargs = {"trust_ratio": True}

    def apply(self, ctx, x, g, p):
        clamp = ctx.group["trust_clamp"]
        p_norms = ctx.norm(p)
        u_norms = ctx.norm(x)
        out = []
        for u, pn, un in zip(x, p_norms, u_norms):
            if clamp is not None:
                pn = pn.clamp_max(clamp)
            ratio = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
            out.append(u * ratio)
        return TensorList(out, x.foreach)
