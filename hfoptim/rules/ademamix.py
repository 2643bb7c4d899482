"""AdEMAMix: Adam with a second, slow first moment that is mixed into the numerator."""

from __future__ import annotations

import math

import torch

from ..core.hparams import HP, betas
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot


def _at_most(x, cap: float):
    """``min(x, cap)`` for a number, or a 0-d tensor (the compiled path traces the step as one:
    Python's ``min`` would branch on its value and break the graph)."""
    return x.clamp(max=cap) if isinstance(x, torch.Tensor) else min(x, cap)


def _exp(x):
    return x.exp() if isinstance(x, torch.Tensor) else math.exp(x)


def alpha_at(t: int, alpha: float, t_alpha: float | None) -> float:
    """Linear warm-up of the mixing weight: ``min(t alpha / T_alpha, alpha)``; ``alpha`` when
    ``T_alpha`` is None. ``t`` may be a 0-d tensor (then so is the result)."""
    if t_alpha is None:
        return alpha
    return _at_most(t * alpha / t_alpha, alpha)


def beta3_at(t: int, beta1: float, beta3: float, t_beta3: float | None) -> float:
    """Warm-up of the slow EMA coefficient, linear in the half-life (paper, Sec. 3):

    ``min(exp(ln b1 ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)``, ``b3`` when ``T`` is None.

    Two edge cases the formula leaves undefined are given their limits: ``b3 <= b1`` (the
    schedule would start above its end) returns ``b3``; ``b1 = 0`` (``ln 0``) returns
    ``min(b3^(T/t), b3)``.
    """
    if t_beta3 is None or beta3 <= beta1:
        return beta3
    s = t / t_beta3
    if beta1 == 0.0:
        return _at_most(beta3 ** (1.0 / s), beta3)
    ln1, ln3 = math.log(beta1), math.log(beta3)
    return _at_most(_exp(ln1 * ln3 / ((1.0 - s) * ln3 + s * ln1)), beta3)


class AdEMAMixRule(Rule):
    r"""AdEMAMix (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better, Faster,
    Older", arXiv 2409.03137, Algorithm 1).

    .. math::
        m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) g, \qquad
        m_2 \leftarrow \beta_3(t)\, m_2 + (1-\beta_3(t))\, g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2

        p &\leftarrow p - \mathrm{lr}\Big(\frac{m_1/(1-\beta_1^t) + \alpha(t)\, m_2}
             {\sqrt{v/(1-\beta_2^t)} + \epsilon} + \mathrm{wd}\; p\Big)

    The slow EMA ``m2`` is **not** bias-corrected and is added to the numerator before the
    division. Warm-up schedulers with separate lengths (``None`` = no warm-up), as the paper and
    bitsandbytes:

    * ``alpha(t) = min(t alpha / t_alpha, alpha)``
    * ``beta3(t) = min(exp(ln b1 ln b3 / ((1 - t/t_beta3) ln b3 + (t/t_beta3) ln b1)), b3)``

    The paper sets both lengths to the total number of steps. ``t`` is each parameter's own step.

    Defaults: ``betas=(0.9, 0.999, 0.9999)``, ``alpha=5`` (bitsandbytes and pytorch_optimizer; the
    paper sweeps alpha in 2..10 and Apple's reference code ``apple/ml-ademamix`` defaults to 2),
    ``eps=1e-8``, ``lr=1e-3``, ``weight_decay=0`` (Apple's reference; bitsandbytes uses 1e-2),
    decoupled weight decay as AdamW. ``denominator="atan2"``/``"softplus"`` replace the eps
    division of the whole numerator ``m1_hat + alpha m2``.

    **Passes.** The numerator is formed in units of ``m1`` as ``m1 + alpha(t)(1-b1^t) m2`` (one
    pass, one temporary) and handed to :meth:`~hfoptim.core.context.StepContext.adam_direction`,
    which moves ``1 - b1^t`` and ``sqrt(1 - b2^t)`` into the denominator (into the second
    argument of atan2): the same quotient up to rounding, without bias-corrected copies of
    ``m1`` and ``v``.

    Differences from the anchors (tested in ``tests/test_ademamix.py``): pytorch_optimizer has one
    warm-up length ``t_alpha_beta3`` for both schedules (equal to ours with
    ``t_alpha == t_beta3``); Apple's code interpolates half-lives with ``ln(beta + 1e-8)`` and drops
    the ``min``; bitsandbytes stores ``[m1, m2]`` stacked in one ``state1`` tensor and computes in
    fp32. Beyond the paper: ``b3 <= b1`` with a beta3 warm-up gives ``b3`` throughout (the formula
    would fall below ``b3`` after ``t_beta3``), ``b1 = 0`` uses the formula's limit.
    """

    name = "ademamix"
    adam_arguments = True  # its betas[:2] and eps are Adam's: the Trainer's adam_beta1/2, adam_epsilon apply
    elementwise = True
    class_name = "AdEMAMix"
    paper = "The AdEMAMix Optimizer: Better, Faster, Older, arXiv 2409.03137"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.9, 0.999, 0.9999), doc="(beta1 fast EMA, beta2 second moment, beta3 slow EMA)"),
        "alpha": HP(5.0, low=0.0, doc="weight of the slow EMA in the numerator"),
        "t_alpha": HP(None, kind="optional_float", low=0.0, low_open=True, doc="alpha warm-up steps; None: none"),
        "t_beta3": HP(None, kind="optional_float", low=0.0, low_open=True, doc="beta3 warm-up steps; None: none"),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT),
        Slot("exp_avg_slow", FIRST_MOMENT),
        Slot("exp_avg_sq", SECOND_MOMENT),
    )
    preconditioned = True

    def update(self, ctx, p, g, s):
        b1, b2, b3 = ctx.group["betas"]
        alpha, t_alpha, t_beta3 = ctx.group["alpha"], ctx.group["t_alpha"], ctx.group["t_beta3"]
        slow_weight = ctx.per_step(lambda t: 1.0 - beta3_at(t, b1, b3, t_beta3))
        # alpha(t) (1 - b1^t): the slow EMA's weight in units of m1 (see "Passes" above)
        slow_mix = ctx.per_step(lambda t: alpha_at(t, alpha, t_alpha) * (1.0 - b1**t))

        s.exp_avg.lerp_(g, 1 - b1)
        s.exp_avg_slow.lerp_(g, slow_weight)
        s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)

        num = s.exp_avg.plus_scaled(s.exp_avg_slow, slow_mix)  # m1 + alpha(t) (1 - b1^t) m2
        return ctx.adam_direction(num, s.exp_avg_sq, b1, b2, ctx.group["eps"])
