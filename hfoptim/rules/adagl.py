"""AdaGL: Adam over a truncated Grünwald-Letnikov fractional derivative of the gradient sequence,
with a step-size factor from the latest gradient change."""

from __future__ import annotations

from ..core.hparams import HP, betas
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot
from ..core.tensorlist import TensorList

#: the most past gradients a parameter may keep (one state tensor each)
MAX_HISTORY = 32

#: how |g_t - g_{t-1}| enters the step factor
CONTROL_ELEMENTWISE = "elementwise"
CONTROL_MEAN = "mean"


def gl_coefficients(alpha: float, terms: int) -> list[float]:
    r"""Grünwald-Letnikov weights :math:`c_j = (-1)^j \binom{\alpha}{j}`, ``j = 0 .. terms-1``,
    by the recursion :math:`c_0 = 1`, :math:`c_j = c_{j-1} (1 - (\alpha + 1)/j)` (equal to the
    Gamma-function form :math:`(-1)^j \Gamma(\alpha+1) / (\Gamma(j+1) \Gamma(\alpha-j+1))`)."""
    out = [1.0]
    for j in range(1, terms):
        out.append(out[-1] * (1.0 - (alpha + 1.0) / j))
    return out


def _history_slot(j: int) -> Slot:
    return Slot(f"grad_{j}", FIRST_MOMENT, when=lambda group, j=j: group["history"] >= j)


class AdaGLRule(Rule):
    r"""AdaGL (Chen, Zhang, Mu, "An Adaptive Learning Rate Deep Learning Optimizer Using Long and
    Short-Term Gradients Based on G-L Fractional-Order Derivative", Neural Processing Letters
    56, 2024, doi 10.1007/s11063-024-11571-7).

    With :math:`K` = ``history`` past gradients (``grad_1`` .. ``grad_K`` hold
    :math:`g_{t-1} .. g_{t-K}`, zero before the first step, so early steps have fewer terms):

    .. math::
        D_t = \sum_{j=0}^{K} c_j\, g_{t-j}, \qquad c_j = (-1)^j \binom{\alpha}{j}

        m_t = \beta_1 m_{t-1} + (1-\beta_1) D_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) D_t^2

        C_t = 1.1 - \frac{1}{2\,(1 + |g_t - g_{t-1}|)} \in [0.6, 1.1)

        p_t = p_{t-1} - \mathrm{lr}\, C_t\, \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    :math:`D_t` is the long-term part (a G-L fractional difference of order :math:`\alpha` over
    the recent gradients); :math:`C_t` is the short-term part, near 0.6 where the gradient
    barely changes, near 1.1 where it changes fast.

    Settled here (no authors' code is public; the paper body could not be read here, only its
    abstract and secondary summaries):

    * Number of terms: the summaries write the sum as :math:`\sum_{j=0}^{10}` (the current
      gradient and 10 past ones, 11 terms) and call it "truncated to 10 terms"; one public port
      keeps 10 gradients including the current one. Default ``history=10`` (11 terms, the formula
      as written); ``history=9`` is the port's reading. Both are tested.
    * :math:`|g_t - g_{t-1}|`: elementwise as written (``step_control="elementwise"``, one
      :math:`C` per element, default) or the mean over the whole tensor as the port computes it
      (``"mean"``, one :math:`C` per tensor, exact under sharding). At the first step
      :math:`g_0 = 0` (the port does the same).
    * :math:`\alpha`: the paper's value is unconfirmed. It must lie in (0, 1): there every
      :math:`c_j, j \ge 1` is negative and :math:`\sum_j c_j > 0`, so a steady gradient still
      gives a descent direction (:math:`\alpha \to 0` is Adam); at :math:`\alpha = 1`,
      :math:`D_t = g_t - g_{t-1}` ignores a steady gradient, and above 1 the truncated sum turns
      negative (the port's default 1.5: :math:`\sum_{j\le 10} c_j = -0.009`, so Adam's
      normalisation would climb a steady slope). Default 0.5 is ours.

    State: ``history`` past gradients (signed, first-moment-like: the 8-bit, bf16 and SMMF
    forms compress them too), ``exp_avg`` and ``exp_avg_sq``. The history is shifted by one
    each step (``grad_1`` takes :math:`g_t`). It stores the gradient the rule saw (after L2
    decay, gradient modifiers and ``maximize``).

    Defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8 (the summaries' and the port's), decoupled
    weight decay 0.
    """

    name = "adagl"
    staged_stats = True  # the mean change of the gradient (see Rule.staged_stats)
    class_name = "AdaGL"
    paper = (
        "An Adaptive Learning Rate Deep Learning Optimizer Using Long and Short-Term Gradients Based on "
        "G-L Fractional-Order Derivative, Neural Processing Letters 2024"
    )
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "betas": betas((0.9, 0.999)),
        "eps": HP(1e-8, low=0.0),
        "alpha": HP(
            0.5,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
            doc="fractional order of the G-L difference (0: Adam; >= 1 ignores or climbs a steady gradient)",
        ),
        "history": HP(10, kind="int", low=1, high=MAX_HISTORY, doc="past gradients in the G-L sum (terms - 1)"),
        "step_control": HP(
            CONTROL_ELEMENTWISE,
            kind="str",
            choices=(CONTROL_ELEMENTWISE, CONTROL_MEAN),
            doc="|g_t - g_(t-1)| per element (as written) or its mean over the tensor (the port)",
        ),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT),
        Slot("exp_avg_sq", SECOND_MOMENT),
        *(_history_slot(j) for j in range(1, MAX_HISTORY + 1)),
    )
    preconditioned = True

    def update(self, ctx, p, g, s):
        group = ctx.group
        b1, b2 = group["betas"]
        k = group["history"]
        past = [getattr(s, f"grad_{j}") for j in range(1, k + 1)]
        coeffs = gl_coefficients(group["alpha"], k + 1)
        d = g.clone()
        for c, older in zip(coeffs[1:], past):
            d.add_(older, alpha=c)
        change = (g - past[0]).abs_()
        if group["step_control"] == CONTROL_MEAN:
            change = TensorList(ctx.mean(change), g.foreach)
        control = TensorList([1.1 - 0.5 / (1.0 + c) for c in change], g.foreach)
        for newer, older in zip(reversed(past[:-1]), reversed(past[1:])):
            older.copy_(newer)
        past[0].copy_(g)
        s.exp_avg.lerp_(d, 1 - b1)
        s.exp_avg_sq.mul_(b2).addcmul_(d, d, value=1 - b2)
        direction = ctx.adam_direction(s.exp_avg, s.exp_avg_sq, b1, b2, group["eps"])
        if group["step_control"] == CONTROL_MEAN:
            return direction * list(control)
        return direction.mul_(control)
