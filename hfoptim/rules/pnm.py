"""Positive-Negative Momentum: two momenta, updated on alternate steps, combined with weights
(1 + beta0) and -beta0; SGD form (PNM) and Adam form (AdaPNM)."""

from __future__ import annotations

import math

import torch

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot
from ..core.tensorlist import TensorList


def _pn_betas(default: tuple) -> HP:
    """``(beta1, [beta2,] beta0)``: EMA coefficients in [0, 1), the PNM weight beta0 >= 0."""

    def check(values):
        if any(b >= 1.0 for b in values[:-1]):
            return "every beta but the last (beta0) must be < 1"
        return None

    return HP(default, kind="floats", low=0.0, length=len(default), check=check)


def pnm_momentum(ctx, s, first: str, second: str, g: TensorList, beta1: float, beta0: float) -> TensorList:
    """Update this step's momentum and return the combination
    ``((1 + beta0) m_pos - beta0 m_neg) / noise_norm(beta0)``. Per parameter, by the parity of
    ITS step count: on odd steps slot ``first`` is the positive momentum (updated now,
    ``m <- beta1^2 m + (1 - beta1^2) g``) and ``second`` the negative one; on even steps they
    swap.

    On the compiled path (one parameter, its step a traced 0-d tensor) the choice is made by
    arithmetic, not by a Python branch on the step (which would break the traced graph): both
    slots take the EMA step with weight ``(1 - beta1^2)`` times 1 or 0 (a lerp by 0 leaves a value
    as it is), and the combination weights are ``(1 + beta0, -beta0)`` or the reverse."""
    a, b = getattr(s, first), getattr(s, second)
    weight = 1 - beta1**2
    if not any(isinstance(t, torch.Tensor) for t in ctx.steps):
        pos = TensorList([x if t % 2 == 1 else y for t, x, y in zip(ctx.steps, a, b)], a.foreach)
        neg = TensorList([y if t % 2 == 1 else x for t, x, y in zip(ctx.steps, a, b)], a.foreach)
        pos.lerp_(g, weight)
        return (pos * (1 + beta0)).sub_(neg, alpha=beta0).div_(noise_norm(beta0))
    (t,), (x,), (y,), (grad,) = ctx.steps, a.tensors, b.tensors, g.tensors
    odd = (t % 2).to(grad.dtype)  # 1 on odd steps, 0 on even ones
    x.lerp_(grad, weight * odd)
    y.lerp_(grad, weight * (1 - odd))
    on_first = odd * (1 + 2 * beta0) - beta0  # 1 + beta0 on odd steps, -beta0 on even ones (the weights sum to 1)
    combined = (x * on_first).add_(y * (1 - on_first)).div_(noise_norm(beta0))
    return TensorList([combined], a.foreach)


def noise_norm(beta0: float) -> float:
    """``sqrt((1 + beta0)^2 + beta0^2)``: keeps the noise scale of the combined momentum."""
    return math.sqrt((1 + beta0) ** 2 + beta0**2)


class PNMRule(Rule):
    r"""Positive-Negative Momentum, SGD form (Xie et al. 2021, "Positive-Negative Momentum:
    Manipulating Stochastic Gradient Noise to Improve Generalization", ICML 2021,
    arXiv 2103.17182, Algorithm 1; official code zeke-xie/Positive-Negative-Momentum).

    .. math::
        m_t = \beta_1^2 m_{t-2} + (1-\beta_1^2) g_t

        p_t = p_{t-1} - \mathrm{lr}\,\frac{(1+\beta_0) m_t - \beta_0 m_{t-1}}{\sqrt{(1+\beta_0)^2+\beta_0^2}}

    Two buffers hold the momenta of odd and even steps (``pos_momentum`` is updated on odd
    steps, ``neg_momentum`` on even steps, as in the official code). The parity is that of each
    parameter's own step counter, so parameters that start late alternate on their own.
    ``betas = (beta1, beta0)``; beta0 = 0 is momentum with coefficient beta1^2.

    Defaults: betas (0.9, 1.0) (paper and official code), weight decay 0 in decoupled form
    (official ``decoupled=True``). The official code has no default learning rate; lr 1e-3 here,
    as pytorch_optimizer's ``PNM``.
    """

    name = "pnm"
    elementwise = True
    class_name = "PNM"
    paper = "Positive-Negative Momentum, arXiv 2103.17182"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": _pn_betas((0.9, 1.0)),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (Slot("pos_momentum", FIRST_MOMENT), Slot("neg_momentum", FIRST_MOMENT))
    weight_decay_modes = ("decoupled", "cautious", "l2")

    def update(self, ctx, p, g, s):
        b1, b0 = ctx.group["betas"]
        return pnm_momentum(ctx, s, "pos_momentum", "neg_momentum", g, b1, b0)


class AdaPNMRule(Rule):
    r"""Positive-Negative Momentum, Adam form "AdaPNM" (Xie et al. 2021, arXiv 2103.17182,
    Algorithm 2; official code zeke-xie/Positive-Negative-Momentum, ``adapnm.py``).

    .. math::
        m_t = \beta_1^2 m_{t-2} + (1-\beta_1^2) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        v^{\max}_t = \max(v^{\max}_{t-1}, v_t) \ \text{(AMSGrad, default)}

        p_t = p_{t-1} - \frac{\mathrm{lr}}{1-\beta_1^t}\,
              \frac{\big((1+\beta_0) m_t - \beta_0 m_{t-1}\big)/\sqrt{(1+\beta_0)^2+\beta_0^2}}
                   {\sqrt{v^{\max}_t/(1-\beta_2^t)}+\epsilon}

    ``exp_avg`` holds the momentum of odd steps, ``neg_exp_avg`` that of even steps (per
    parameter step parity); ``max_exp_avg_sq`` exists only with ``amsgrad=True``.
    ``betas = (beta1, beta2, beta0)``. The first-moment bias correction is ``1 - beta1^t`` as
    in the paper and the official code.

    Defaults from the official code: lr 1e-3, betas (0.9, 0.999, 1.0), eps 1e-8, amsgrad True,
    weight decay 0 in decoupled form. pytorch_optimizer's ``AdaPNM`` computes the same update
    (``ams_bound`` is our ``amsgrad``), adding 1e-15 to the second moment before the root.
    """

    name = "adapnm"
    adam_arguments = True  # its betas[:2] and eps are Adam's: the Trainer's adam_beta1/2, adam_epsilon apply
    elementwise = True
    class_name = "AdaPNM"
    paper = "Positive-Negative Momentum, arXiv 2103.17182"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": _pn_betas((0.9, 0.999, 1.0)),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(0.0, low=0.0),
        "amsgrad": HP(True, kind="bool", doc="divide by the running maximum of the second moment"),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT),
        Slot("neg_exp_avg", FIRST_MOMENT),
        Slot("exp_avg_sq", SECOND_MOMENT),
        Slot("max_exp_avg_sq", SECOND_MOMENT, when=lambda group: group["amsgrad"]),
    )
    weight_decay_modes = ("decoupled", "cautious", "l2")
    preconditioned = True

    def update(self, ctx, p, g, s):
        b1, b2, b0 = ctx.group["betas"]
        num = pnm_momentum(ctx, s, "exp_avg", "neg_exp_avg", g, b1, b0)
        s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        second = s.exp_avg_sq
        if ctx.group["amsgrad"]:
            s.max_exp_avg_sq.maximum_(s.exp_avg_sq)
            second = s.max_exp_avg_sq
        num.div_(ctx.bias_correction(b1))
        v_hat = second / ctx.bias_correction(b2)
        return ctx.precondition(num, v_hat, ctx.group["eps"], scratch=True)
