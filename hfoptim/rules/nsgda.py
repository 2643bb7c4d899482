"""nSGDA: SGD with momentum whose step is normalized per tensor."""

from __future__ import annotations

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, Rule, Slot


class NSGDARule(Rule):
    r"""Normalized SGD with momentum (nSGDA), as studied in Jelassi, Dobre, Mensch, Li & Gidel
    2022, "Dissecting adaptive methods in GANs", arXiv 2210.04319 (first titled "Adam is no better
    than normalized SGD: Dissecting how adaptivity improves GAN performance"): the momentum
    direction divided by its norm, one norm per tensor (layer-wise normalization), with ``eps``
    in the denominator and weight decay added here.

    With coupled weight decay (``weight_decay_mode="l2"``, the default) folded into the gradient:

    .. math::
        m \leftarrow \mu m + (1-\mu)(g + \mathrm{wd}\, p), \qquad
        \hat m = m / (1-\mu^t)

        p \leftarrow p - \mathrm{lr}\,\frac{m}{\lVert \hat m \rVert\,(1-\mu^t) + \epsilon}

    The norm is the L2 norm of the **whole tensor** (through the step context, so it stays the
    whole tensor's norm when the parameter is sharded). The bias correction cancels in exact
    arithmetic (``||m_hat|| (1 - mu^t) = ||m||``), so the step is ``m / (||m|| + eps)``, computed
    that way: every step moves each tensor by ``lr`` in L2 norm (less while ``||m||`` is near
    eps). ``weight_decay_mode="decoupled"``/``"cautious"`` decay the parameter instead.

    Defaults (the paper gives no reference implementation; these are hfoptim's): ``lr=4e-5``,
    ``momentum=0.9``, ``weight_decay=1e-2``, ``eps=1e-8``.
    State: ``exp_avg`` (m).
    """

    orientation_free = True  # the norm of the whole tensor
    name = "nsgda"
    staged_stats = True  # the momentum's norm (see Rule.staged_stats)
    class_name = "NSGDA"
    paper = "Dissecting adaptive methods in GANs, arXiv 2210.04319"
    hyperparams = {
        "lr": HP(4e-5, low=0.0),
        "momentum": HP(0.9, low=0.0, high=1.0, high_open=True),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(1e-2, low=0.0),
    }
    slots = (Slot("exp_avg", FIRST_MOMENT),)
    weight_decay_modes = ("l2", "decoupled", "cautious")

    def update(self, ctx, p, g, s):
        mu, eps = ctx.group["momentum"], ctx.group["eps"]
        s.exp_avg.lerp_(g, 1 - mu)
        denominators = [n + eps for n in ctx.norm(s.exp_avg)]
        return s.exp_avg / denominators
