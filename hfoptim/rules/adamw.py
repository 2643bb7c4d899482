"""AdamW: the baseline every other rule is measured against."""

from __future__ import annotations

from ..core.hparams import HP, betas
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot
from . import adaptive_memory


def nesterov_numerator(ctx, m, g, b1: float):
    """NAdam-style Nesterov first moment (Dozat 2016; optax's ``nesterov=True`` form):
    ``b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)``."""
    ahead = ctx.per_step(lambda t: b1 / (1.0 - b1 ** (t + 1)))
    now = ctx.per_step(lambda t: (1.0 - b1) / (1.0 - b1**t))
    return (m * ahead).add_(g * now)


class AdamWRule(Rule):
    r"""AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101; Adam: Kingma & Ba 2015).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

        p_t = p_{t-1} - \mathrm{lr}\,\Big(\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}
              + \mathrm{wd}\, p_{t-1}\Big)

    ``nesterov=True`` replaces the bias-corrected first moment by the NAdam look-ahead
    ``b1 m_t/(1-b1^(t+1)) + (1-b1) g_t/(1-b1^t)`` (optax's form). Defaults as torch.optim.AdamW.

    ``adaptive_memory=True`` (AM-AdamW, arXiv 2510.04988; :mod:`hfoptim.rules.adaptive_memory`)
    replaces the constant :math:`\beta_1` by :math:`\beta_t` of each tensor from the two-plane
    model, :math:`m_t = ((\beta_t+\lambda) m_{t-1} + (1-\beta_t) g_t)/(1+\lambda)`, and drops
    the first moment's bias correction: :math:`p_t = p_{t-1} - \mathrm{lr}\,(m_t /
    (\sqrt{\hat v_t} + \epsilon) + \mathrm{wd}\, p_{t-1})`; ``betas[0]`` is then unused.
    """

    name = "adamw"
    elementwise = True  # but not with adaptive memory (see is_elementwise)
    staged_stats = True  # adaptive memory's inner products (see Rule.staged_stats)
    orientation_free = True  # elementwise, or (adaptive memory) whole-tensor inner products only
    adam_arguments = True  # its betas[:2] and eps are Adam's: the Trainer's adam_beta1/2, adam_epsilon apply
    class_name = "AdamW"
    paper = "Decoupled Weight Decay Regularization, arXiv 1711.05101"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.9, 0.999)),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(1e-2, low=0.0),
        "nesterov": HP(False, kind="bool"),
        **adaptive_memory.HPARAMS,
    }
    slots = (Slot("exp_avg", FIRST_MOMENT), Slot("exp_avg_sq", SECOND_MOMENT))
    preconditioned = True

    def is_elementwise(self, group):
        return not group["adaptive_memory"]

    def check_options(self, group):
        if group["adaptive_memory"] and group["nesterov"]:
            return (
                "nesterov=True looks ahead with the constant betas[0], which adaptive_memory=True replaces "
                "by a coefficient chosen each step: use one of the two"
            )
        return None

    def update(self, ctx, p, g, s):
        b1, b2 = ctx.group["betas"]
        if ctx.group["adaptive_memory"]:
            adaptive_memory.update_memory(ctx, s.exp_avg, g, ctx.group["am_lambda"])
            s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            return ctx.adam_direction(s.exp_avg, s.exp_avg_sq, 0.0, b2, ctx.group["eps"])
        s.exp_avg.lerp_(g, 1 - b1)
        s.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        if not ctx.group["nesterov"]:
            return ctx.adam_direction(s.exp_avg, s.exp_avg_sq, b1, b2, ctx.group["eps"])
        num = nesterov_numerator(ctx, s.exp_avg, g, b1)
        v_hat = s.exp_avg_sq / ctx.bias_correction(b2)
        return ctx.precondition(num, v_hat, ctx.group["eps"], scratch=True)
