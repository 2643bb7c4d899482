"""SMMF: Adam-style update with square-matricized, factored moments."""

from __future__ import annotations

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot


class SMMFRule(Rule):
    r"""SMMF (Park & Lee 2024, "SMMF: Square-Matricized Momentum Factorization for
    Memory-Efficient Optimization", arXiv 2412.08894, AAAI 2025; Algorithm 1 and the authors'
    code KwangryeolPark/SMMF).

    .. math::
        \beta_m(t) = \beta_1\, \mathrm{growth}^{\,t-1},\qquad \beta_v(t) = 1 - t^{\,\mathrm{decay}}

        M_t = \beta_m(t)\, \hat M_{t-1} + (1-\beta_m(t))\, G_t,\qquad
        V_t = \beta_v(t)\, \hat V_{t-1} + (1-\beta_v(t))\, G_t^2

        p \leftarrow p - \mathrm{lr}\,\Big(\frac{M_t}{\sqrt{V_t} + \epsilon} + \mathrm{wd}\; p\Big)

    No bias correction (``beta_v(1) = 0`` makes ``V_1 = G_1^2``). ``\hat M, \hat V`` are the
    moments decompressed from storage; the update uses the full ``M_t, V_t`` and they are
    compressed again afterwards (the paper's decompress -> update -> compress order).

    **Storage** is separate from this math: by default both moments use ``"smmf"``
    (:mod:`hfoptim.state.smmf`: square matricization ``(n/i, i)`` of every tensor, 1-D included,
    rank-1 non-negative factors, the first moment's sign as 1 bit per element); ``state="fp32"``
    keeps both dense (the fp32 twin); other forms (``"factored"``, ``"8bit"``, ...) replace the
    factors of the slots they can hold.

    **decay_rate**: the authors' code defaults to -0.5, its docstring (and Adafactor) says -0.8;
    we follow the code, -0.5. Without ``beta1`` (None) the rule keeps no first moment and divides
    the gradient itself, as the authors' code.

    Weight decay: decoupled (the authors' ``weight_decay_mode='adamw'``, default), ``"l2"`` or
    ``"cautious"``. ``"l2"`` is the paper's coupled decay (``G <- G + wd p`` before both moments);
    it is **not** what the authors' ``'adam'`` mode does: their ``step`` computes the decayed
    gradient into a local variable that is never used (``_factorized_adam`` and ``_adam`` read
    ``params.grad`` again), so their ``'adam'`` mode applies no decay at all
    (KwangryeolPark/Official.SMMF, ``SMMF/SMMF.py`` at commit 9735ca33eb4694cb9602821f64de3b8b0d12de46).
    To reproduce their ``'adam'`` runs, use ``weight_decay=0``. The authors' ``vector_reshape=False`` (dense state for
    1-D tensors) is not an option: pick another storage form for those instead.

    Defaults (authors' code): ``lr=1e-3``, ``beta1=0.9``, ``eps=1e-8``, ``weight_decay=0``,
    ``decay_rate=-0.5``, ``growth_rate=0.999``.
    """

    name = "smmf"
    #: the update of each element reads only that element (the factors are storage, decoded whole)
    elementwise = True
    class_name = "SMMF"
    paper = "SMMF: Square-Matricized Momentum Factorization for Memory-Efficient Optimization, arXiv 2412.08894"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "beta1": HP(0.9, kind="optional_float", low=0.0, high=1.0, doc="first-moment coefficient; None: none"),
        "eps": HP(1e-8, low=0.0),
        "weight_decay": HP(0.0, low=0.0),
        "decay_rate": HP(-0.5, low=-1.0, high=0.0, doc="beta_v(t) = 1 - t^decay_rate"),
        "growth_rate": HP(0.999, low=0.0, high=1.0, doc="beta_m(t) = beta1 * growth_rate^(t-1)"),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT, when=lambda group: group["beta1"] is not None),
        Slot("exp_avg_sq", SECOND_MOMENT),
    )
    default_state = {"exp_avg": "smmf", "exp_avg_sq": "smmf"}
    preconditioned = True

    def update(self, ctx, p, g, s):
        group = ctx.group
        b1, growth, decay = group["beta1"], group["growth_rate"], group["decay_rate"]
        s.exp_avg_sq.lerp_(g.square(), ctx.per_step(lambda t: t**decay))
        if b1 is None:
            num = g
        else:
            s.exp_avg.lerp_(g, ctx.per_step(lambda t: 1.0 - b1 * growth ** (t - 1)))
            num = s.exp_avg
        return ctx.precondition(num, s.exp_avg_sq, group["eps"])
