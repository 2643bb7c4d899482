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
    staged_stats = True  # the mask's mean, a whole-tensor sum (see Modifier.staged_stats)
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

    When no other update modifier follows (``ctx.last_update_modifier``) the step is taken as
    LAMB writes it: the modifier returns ``r`` with the ratios as the engine's per-tensor factors
    (``ctx.update_scales``) and marks the decay as applied (``ctx.decay_applied``), so the
    engine's one pass ``p <- p - lr ratio r`` is the whole step, where scaling ``r`` and
    subtracting ``wd p`` here, then the engine's decay and update, took four.
    """

    name = "trust"
    staged_stats = True  # whole-tensor norms (see Modifier.staged_stats)
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
        # the direction ``r`` (one fused pass) is formed in the rule's update when that is a
        # temporary of the step (no full-size allocation), else in a temporary of this modifier
        fold = decay_inside and ctx.last_update_modifier
        decay = p * wd if decay_inside and not fold else None
        if not decay_inside:
            direction = x
        elif ctx.owned(x, p, g):
            direction = x.add_(p, alpha=wd)
        else:
            direction = x.plus_scaled(p, wd)
        if not len(direction):
            return direction
        # the ratios of all the tensors at once (a handful of operations on a vector of norms,
        # not on each tensor's 0-d norms)
        p_norms = torch.stack(list(ctx.norm(p)))
        u_norms = torch.stack(list(ctx.norm(direction)))
        if clamp is not None:
            p_norms = p_norms.clamp_max(clamp)
        ratios = torch.where((p_norms > 0) & (u_norms > 0), p_norms / u_norms, torch.ones_like(p_norms)).unbind()
        if fold:
            ctx.decay_applied, ctx.update_scales = True, list(ratios)
            return direction
        if not decay_inside:
            return TensorList([r * ratio for r, ratio in zip(direction, ratios)], x.foreach)
        return TensorList([r.mul_(ratio).sub_(d) for r, ratio, d in zip(direction, ratios, decay)], x.foreach)


class NormLoss(Modifier):
    r"""Norm Loss (Georgiou et al. 2021, "Norm Loss: An efficient yet effective regularization
    method for deep neural networks", arXiv 2103.06583): the loss
    :math:`f \sum_i (1 - \lVert w_i \rVert)^2` over the output units ``w_i`` of a tensor (rows of a
    2+-D tensor over all their other dimensions, the whole tensor for 0-/1-D), applied as a
    decoupled step like AdamW's weight decay (the seed's form, as in Ranger21):

    .. math::
        p \leftarrow p\,\Big(1 - \mathrm{lr}\; 2 f \big(1 - \tfrac{1}{\lVert w_i \rVert + \epsilon}\big)\Big)
        \;-\; \mathrm{lr}\, u

    with the norms of the parameter before this step. It pulls every row toward unit norm
    (shrinks rows longer than 1, grows shorter ones). Implemented as the last update modifier,
    ``u <- u + 2 f (1 - 1/(||w_i|| + eps)) p``, so the engine's ``p - lr u`` takes the step and any
    per-tensor step size a rule sets (Adafactor) applies to it as to the update.

    ``norm_loss`` is ``f`` (the ``_normloss`` suffix sets Ranger21's 1e-4; the paper's value is
    unconfirmed), ``norm_loss_eps`` 1e-8 (Ranger21 uses its Adam eps, 1e-8). Row norms come from
    the step context's row statistics, exact when rows are split by sharding. Unlike
    pytorch_optimizer's ``unit_norm`` (dimension 1 only for 3-D tensors) a unit here is always a
    whole output row. Ranger21's original code applied it once per parameter group to the
    whole concatenation; not copied. With ``weight_decay_mode="cautious"`` the decay's mask
    ``1[u p >= 0]`` sees the update with this pull included.
    """

    name = "normloss"
    row_local = True  # per-row norms of matrices
    vector_stats = True  # a vector's norm (see Modifier.rows_apart)
    staged_stats = True  # row norms, a vector's norm (see Modifier.staged_stats)
    stage = UPDATE
    switch = "norm_loss"
    hyperparams = {
        "norm_loss": HP(None, kind="optional_float", low=0.0, low_open=True, doc="factor f of the norm loss"),
        "norm_loss_eps": HP(1e-8, low=0.0, doc="added to each row norm"),
    }
    suffix_kwargs = {"norm_loss": 1e-4}

    def apply(self, ctx, x, g, p):
        f, eps = ctx.group["norm_loss"], ctx.group["norm_loss_eps"]
        # a matrix's units are its rows (one statistics call for the list); a vector's is the
        # vector (a row piece of a matrix has no whole norm to give, so only vectors ask for one)
        rows = ctx.row_sums(p, square=True)
        vectors = [i for i, r in enumerate(rows) if r is None]
        whole = {}
        if vectors:
            whole = dict(zip(vectors, ctx.stats.norm([p.tensors[i] for i in vectors], [ctx.views[i] for i in vectors])))
        out = []
        for i, (u, pi, r) in enumerate(zip(x, p, rows)):
            norm = whole[i] if r is None else r.sqrt().view(-1, *([1] * (pi.dim() - 1)))
            out.append(u + pi * ((1.0 - 1.0 / (norm + eps)) * (2.0 * f)))
        return TensorList(out, x.foreach)
