"""SGD with momentum, the heavy-ball rule adaptive memory momentum (AM-SGD) is built on."""

from __future__ import annotations

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, Rule, Slot
from . import adaptive_memory


class SGDMRule(Rule):
    r"""SGD with heavy-ball momentum (Polyak 1964) in the moving-average form.

    .. math::
        d_t = \mu d_{t-1} + (1-\mu) g_t, \qquad
        p_t = p_{t-1} - \mathrm{lr}\,\frac{d_t}{1-\mu^t}

    The bias correction makes the first step the gradient itself (as torch's SGD, whose buffer
    starts at :math:`g_1`) and keeps the step's size that of a gradient, so ``lr`` is the
    gradient-descent step size for any ``momentum`` (torch's ``buf = mu buf + g`` moves
    :math:`1/(1-\mu)` times further at the same lr). ``momentum=0`` is plain SGD.

    ``adaptive_memory=True`` (AM-SGD, Topollai & Choromanska, arXiv 2510.04988;
    :mod:`hfoptim.rules.adaptive_memory`) replaces :math:`\mu` by :math:`\beta_t` of each tensor
    from the two-plane model,
    :math:`d_t = ((\beta_t+\lambda) d_{t-1} + (1-\beta_t) g_t)/(1+\lambda)`,
    :math:`p_t = p_{t-1} - \mathrm{lr}\, d_t` (no bias correction; ``momentum`` is then unused).

    Named ``sgdm`` (class ``SGDM``), not ``sgd``: the moving-average form is not torch's SGD, and
    the Trainer's built-in ``--optim sgd`` stays torch's. Weight decay coupled (``l2``, as torch's
    SGD) by default. Defaults: lr 1e-2, momentum 0.9,
    weight decay 0. State: ``exp_avg`` (:math:`d`).
    """

    name = "sgdm"
    class_name = "SGDM"
    paper = "Polyak 1964 (heavy ball); adaptive memory: arXiv 2510.04988"
    elementwise = True  # but not with adaptive memory (see is_elementwise)
    staged_stats = True  # adaptive memory's inner products (see Rule.staged_stats)
    orientation_free = True
    hyperparams = {
        "lr": HP(1e-2, low=0.0),
        "momentum": HP(0.9, low=0.0, high=1.0, high_open=True),
        "weight_decay": HP(0.0, low=0.0),
        **adaptive_memory.HPARAMS,
    }
    slots = (Slot("exp_avg", FIRST_MOMENT),)
    weight_decay_modes = ("l2", "decoupled", "cautious")

    def is_elementwise(self, group):
        return not group["adaptive_memory"]

    def update(self, ctx, p, g, s):
        if ctx.group["adaptive_memory"]:
            adaptive_memory.update_memory(ctx, s.exp_avg, g, ctx.group["am_lambda"])
            return s.exp_avg * 1.0
        mu = ctx.group["momentum"]
        s.exp_avg.lerp_(g, 1 - mu)
        return s.exp_avg / ctx.bias_correction(mu)
