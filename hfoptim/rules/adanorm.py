"""AdaNorm (Adam form): the first moment is fed gradients whose norm is lifted to its running average."""

from __future__ import annotations

import torch

from ..core.hparams import HP, betas
from ..core.rule import FIRST_MOMENT, SCALAR, SECOND_MOMENT, Rule, Slot
from ..core.tensorlist import TensorList


class AdaNormRule(Rule):
    r"""AdaNorm, Adam form "AdamNorm" (Dubey et al. 2023, "AdaNorm: Adaptive Gradient Norm
    Correction based Optimizer for CNNs", WACV 2023, arXiv 2210.06364; official code
    shivram1987/AdaNorm, ``AdamNorm.py``).

    Per tensor, with :math:`\|g_t\|` the L2 norm of the whole tensor:

    .. math::
        e_t = \gamma e_{t-1} + (1-\gamma) \|g_t\|, \quad e_0 = 0

        s_t = \begin{cases} \dfrac{e_t}{\|g_t\|} g_t & e_t > \|g_t\| \\ g_t & \text{otherwise}\end{cases}

        m_t = \beta_1 m_{t-1} + (1-\beta_1) s_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \quad (\text{the raw gradient})

        p_t = p_{t-1} - \mathrm{lr}\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

    A gradient whose norm falls below the running average of norms is scaled up to it (only in
    the first moment), so steps do not shrink where gradients transiently become small. ``e``
    is one number per tensor (slot ``exp_grad_norm``); the norm is taken through the step
    context, so it is the norm of the whole parameter under sharding. A zero gradient is left
    as is (the official code would divide by zero).

    Defaults from the paper / official code: lr 1e-3, betas (0.9, 0.999), gamma 0.95 (hard-coded
    there), eps 1e-8, weight decay 0 in coupled (L2) form (``weight_decouple=False`` there).

    Intended differences: pytorch_optimizer's ``AdaNorm`` defaults to betas (0.9, 0.99) (ours
    follow the paper), names gamma ``r``, and applies weight decay decoupled by default. The
    official code also adds eps to ``exp_avg_var`` in place every step (an AdaBelief leftover);
    we follow the paper's update.
    """

    orientation_free = True  # the norm of the whole tensor
    name = "adanorm"
    staged_stats = True  # the gradient's norm (see Rule.staged_stats)
    adam_arguments = True  # its betas[:2] and eps are Adam's: the Trainer's adam_beta1/2, adam_epsilon apply
    class_name = "AdaNorm"
    paper = "AdaNorm: Adaptive Gradient Norm Correction based Optimizer for CNNs, arXiv 2210.06364"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.9, 0.999)),
        "gamma": HP(0.95, low=0.0, high=1.0, high_open=True, doc="EMA coefficient of the gradient norm"),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT),
        Slot("exp_avg_sq", SECOND_MOMENT),
        Slot("exp_grad_norm", SCALAR),
    )
    weight_decay_modes = ("l2", "decoupled", "cautious")
    preconditioned = True

    def update(self, ctx, p, g, s):
        b1, b2 = ctx.group["betas"]
        gamma = ctx.group["gamma"]
        norms = ctx.norm(g)
        s.exp_grad_norm.lerp_(TensorList(norms, g.foreach), 1 - gamma)
        scales = [torch.where((e > n) & (n > 0), e / n, torch.ones_like(n)) for e, n in zip(s.exp_grad_norm, norms)]
        s.exp_avg.lerp_(g * scales, 1 - b1)
        s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        num = s.exp_avg / ctx.bias_correction(b1)
        v_hat = s.exp_avg_sq / ctx.bias_correction(b2)
        return ctx.precondition(num, v_hat, ctx.group["eps"], scratch=True)
