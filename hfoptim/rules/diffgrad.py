"""diffGrad: Adam whose step is damped where the gradient changes little."""

from __future__ import annotations

from ..core.hparams import HP, betas
from ..core.rule import BUFFER, FIRST_MOMENT, SECOND_MOMENT, Rule, Slot


class DiffGradRule(Rule):
    r"""diffGrad (Dubey et al. 2019, "diffGrad: An Optimization Method for Convolutional Neural
    Networks", arXiv 1909.11015; official code shivram1987/diffGrad, ``diffGrad_v2.py``).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

        \xi_t = \mathrm{sigmoid}(|g_{t-1} - g_t|) \quad (g_0 = 0)

        p_t = p_{t-1} - \mathrm{lr}\, \frac{\xi_t\, m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

    The friction coefficient :math:`\xi_t \in [0.5, 1)` scales the Adam step down where the
    gradient barely changes. ``prev_grad`` starts at zero, so the first step uses
    :math:`\xi_1 = \mathrm{sigmoid}(|g_1|)`, as the official code (and pytorch_optimizer) does;
    it stores the gradient the rule saw (after L2 decay, gradient modifiers and ``maximize``).

    Defaults from the paper / official code: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay
    0 in coupled (L2) form, as the official code adds it to the gradient.

    Intended differences from the official code and pytorch_optimizer's ``DiffGrad``: they add
    eps to the *uncorrected* :math:`\sqrt{v_t}` (Adam's "efficient" form,
    ``lr sqrt(1-b2^t)/(1-b1^t) * xi m / (sqrt(v) + eps)``); we follow the paper's Algorithm 1,
    :math:`\hat m/(\sqrt{\hat v}+\epsilon)`, like :class:`~hfoptim.rules.adamw.AdamWRule`. The
    two agree exactly at eps = 0 and differ by eps-sized terms otherwise (tested both ways).
    """

    name = "diffgrad"
    adam_arguments = True  # its betas[:2] and eps are Adam's: the Trainer's adam_beta1/2, adam_epsilon apply
    elementwise = True
    class_name = "DiffGrad"
    paper = "diffGrad: An Optimization Method for Convolutional Neural Networks, arXiv 1909.11015"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.9, 0.999)),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT),
        Slot("exp_avg_sq", SECOND_MOMENT),
        Slot("prev_grad", BUFFER),
    )
    weight_decay_modes = ("l2", "decoupled", "cautious")
    preconditioned = True

    def update(self, ctx, p, g, s):
        b1, b2 = ctx.group["betas"]
        s.exp_avg.lerp_(g, 1 - b1)
        s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        # in place on the one temporary: friction, then the numerator (two allocations fewer)
        friction = (s.prev_grad - g).abs_().sigmoid_()
        s.prev_grad.copy_(g)
        num = friction.mul_(s.exp_avg).div_(ctx.bias_correction(b1))
        v_hat = s.exp_avg_sq / ctx.bias_correction(b2)
        return ctx.precondition(num, v_hat, ctx.group["eps"], scratch=True)
