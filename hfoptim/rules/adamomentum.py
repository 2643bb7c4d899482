"""AdaMomentum: Adam whose second moment is the EMA of the squared momentum, not of g^2."""

from __future__ import annotations

from ..core.hparams import HP, betas
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot

#: where eps enters: added to v every step (AdaBelief-style), or to the denominator (Adam-style)
EPS_ACCUMULATE = "accumulate"
EPS_DENOMINATOR = "denominator"


class AdaMomentumRule(Rule):
    r"""AdaMomentum (Wang, Kang, Qin, Wang, Xu, Zhang, Fu, "Rethinking Adam: A Twofold
    Exponential Moving Average Approach", arXiv 2106.11514).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t

        v_t = \beta_2 v_{t-1} + (1-\beta_2) m_t^2 + \epsilon \qquad (\texttt{eps\_mode="accumulate"})

        p_t = p_{t-1} - \mathrm{lr}\,\Big(\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)}} + \mathrm{wd}\,p_{t-1}\Big)

    The only change from Adam is :math:`m_t^2` in place of :math:`g_t^2` in the second moment:
    the momentum carries less noise than the gradient, so the step is scaled by the size of the
    direction actually taken.

    Where eps goes (``eps_mode``), as settled here: the authors' code was announced for after
    publication and is not public; the paper body could not be read here (only its abstract). The
    one public implementation found, H. Fassold's AdaMomentum port (kept in his ``AdaFamily``
    code, ``myu=1``, ``epsilon_mode=0``, derived from AdaBelief's code), adds eps to ``v`` in
    place every step, so eps accumulates in the state (to ``eps / (1 - beta2)`` in the long run)
    and no eps is added outside the root; that is the default ``"accumulate"``. The Adam-style
    reading ``"denominator"``, :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) m_t^2`,
    :math:`\hat m/(\sqrt{\hat v} + \epsilon)`, is kept as an option; the two agree at eps = 0
    (tested both ways).

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8 (the port's; the paper's unconfirmed),
    decoupled weight decay 0 (the port decays decoupled by default).
    """

    name = "adamomentum"
    class_name = "AdaMomentum"
    paper = "Rethinking Adam: A Twofold Exponential Moving Average Approach, arXiv 2106.11514"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.9, 0.999)),
        "eps": HP(1e-8, low=0.0),
        "eps_mode": HP(
            EPS_ACCUMULATE,
            kind="str",
            choices=(EPS_ACCUMULATE, EPS_DENOMINATOR),
            doc="accumulate: v += eps every step, no eps outside the root (the public port); "
            "denominator: Adam's m_hat / (sqrt(v_hat) + eps)",
        ),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (Slot("exp_avg", FIRST_MOMENT), Slot("exp_avg_sq", SECOND_MOMENT))
    preconditioned = True

    def update(self, ctx, p, g, s):
        b1, b2 = ctx.group["betas"]
        eps = ctx.group["eps"]
        s.exp_avg.lerp_(g, 1 - b1)
        s.exp_avg_sq.mul_(b2).addcmul_(s.exp_avg, s.exp_avg, value=1 - b2)
        if ctx.group["eps_mode"] == EPS_DENOMINATOR:
            return ctx.adam_direction(s.exp_avg, s.exp_avg_sq, b1, b2, eps)
        s.exp_avg_sq.add_(eps)
        num = s.exp_avg / ctx.bias_correction(b1)
        v_hat = s.exp_avg_sq / ctx.bias_correction(b2)
        return ctx.precondition(num, v_hat, 0.0, scratch=True)
