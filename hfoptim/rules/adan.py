"""Adan: adaptive Nesterov momentum through an EMA of gradient differences."""

from __future__ import annotations

import torch

from ..core.hparams import HP, betas
from ..core.rule import BUFFER, FIRST_MOMENT, SECOND_MOMENT, Rule, Slot


def _after_first_step(t):
    """0 at a parameter's first step, 1 after; on the compiled path ``t`` is a traced 0-d tensor
    and the comparison stays a tensor (a Python branch on it would break the graph)."""
    if isinstance(t, torch.Tensor):
        return (t > 1).to(torch.float32)
    return 0.0 if t == 1 else 1.0


class AdanRule(Rule):
    r"""Adan (Xie, Zhou, Li, Lin & Yan 2022, "Adan: Adaptive Nesterov Momentum Algorithm for
    Faster Optimizing Deep Models", arXiv 2208.06677, Algorithm 1; official code sail-sg/Adan).

    With :math:`d_t = g_t - g_{t-1}` (:math:`d_1 = 0`), betas in the code form (1 - paper betas):

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        n \leftarrow \beta_2 n + (1-\beta_2) d, \qquad
        v \leftarrow \beta_3 v + (1-\beta_3) (g + \beta_2 d)^2

        u &= \frac{m/(1-\beta_1^t) + \beta_2\, n/(1-\beta_2^t)}{\sqrt{v/(1-\beta_3^t)} + \epsilon}

        p &\leftarrow \frac{p - \mathrm{lr}\, u}{1 + \mathrm{lr}\,\mathrm{wd}}
           \quad\text{(``weight_decay_mode="proximal"``, the official default)}

    ``weight_decay_mode="decoupled"`` is the official ``no_prox=True``:
    ``p <- p (1 - lr wd) - lr u``; ``"cautious"`` and ``"l2"`` are also accepted.

    Defaults (official code): ``lr=1e-3``, ``betas=(0.98, 0.92, 0.99)``, ``eps=1e-8``,
    ``weight_decay=0`` (the official README suggests 0.02 for most tasks). State:
    ``exp_avg`` (m), ``exp_avg_diff`` (n), ``exp_avg_sq`` (v) and ``prev_grad`` (the gradient of
    the previous step as the rule saw it, after gradient modifiers and ``l2`` decay; the official
    code keeps ``-g`` as ``neg_pre_grad``). The official ``max_grad_norm`` (global clipping) is
    not a rule option: clip before ``step()`` (e.g. the Trainer's ``max_grad_norm``).
    ``denominator="atan2"``/``"softplus"`` apply to the whole numerator.

    Differences from the anchor pytorch_optimizer.Adan (tested in ``tests/test_adan.py``): it
    keeps ``-g_prev`` as ``previous_grad``, names proximal decay ``weight_decouple=False`` and
    decoupled decay ``weight_decouple=True``, and divides ``sqrt(v)/sqrt(bc3)`` where we take
    ``sqrt(v/bc3)`` (equal up to rounding).
    """

    name = "adan"
    elementwise = True
    class_name = "Adan"
    paper = "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing Deep Models, arXiv 2208.06677"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.98, 0.92, 0.99), doc="(beta1 gradient, beta2 difference, beta3 second moment), code form"),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT),
        Slot("exp_avg_diff", FIRST_MOMENT),
        Slot("exp_avg_sq", SECOND_MOMENT),
        Slot("prev_grad", BUFFER),
    )
    weight_decay_modes = ("proximal", "decoupled", "cautious", "l2")
    preconditioned = True

    def update(self, ctx, p, g, s):
        b1, b2, b3 = ctx.group["betas"]
        # d = g - g_prev in the buffer of the previous gradient, which serves below as the
        # denominator's scratch and takes g at the end: no full-size temporary but the update
        # itself (a fresh temporary per tensor costs more than a pass over it: page faults)
        d = s.prev_grad.rsub_(g)
        # d_1 = 0: the stored previous gradient does not exist yet at a parameter's first step
        has_previous = ctx.per_step(_after_first_step)
        if not isinstance(has_previous, float) or has_previous != 1.0:  # a first step, or traced
            d.mul_(has_previous)

        s.exp_avg.lerp_(g, 1 - b1)
        s.exp_avg_diff.lerp_(d, 1 - b2)
        if b2 > 0:  # (g + b2 d)^2 as b2^2 (d + g / b2)^2: one pass over d, not two
            d.add_(g, alpha=1.0 / b2)
            s.exp_avg_sq.mul_(b3).addcmul_(d, d, value=(1 - b3) * b2 * b2)
        else:
            s.exp_avg_sq.mul_(b3).addcmul_(g, g, value=1 - b3)

        num = (s.exp_avg / ctx.bias_correction(b1)).add_scaled_(
            s.exp_avg_diff, ctx.per_step(lambda t: b2 / (1.0 - b2**t))
        )
        v_hat = d.set_scaled_(s.exp_avg_sq, ctx.per_step(lambda t: 1.0 / (1.0 - b3**t)))
        u = ctx.precondition(num, v_hat, ctx.group["eps"], scratch=True)
        s.prev_grad.copy_(g)
        return u
