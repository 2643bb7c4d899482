"""Amos: a shared per-tensor second moment, a shape-derived scale and decaying weight decay."""

from __future__ import annotations

import math

import torch

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, SCALAR, Rule, Slot
from ..core.tensorlist import TensorList

#: jestimator's default epsilon: the smallest positive normal float32, 2^-125 ~ 2.4e-38
JESTIMATOR_EPS = 1.0 / (1 << 125)
#: eta of a vector (bias, norm scale), as jestimator's examples and pytorch_optimizer
VECTOR_ETA = 0.5


def shape_eta(global_shape, gain: float) -> float:
    """The expected scale of a tensor's entries from its (global) shape, torch layout
    ``(out, in, *kernel)``: ``0.5`` for 0-D/1-D tensors, else ``sqrt(gain / fan_in)`` with
    ``fan_in = numel / shape[0]`` (He initialisation for ``gain = 2``)."""
    if len(global_shape) <= 1:
        return VECTOR_ETA
    fan_in = math.prod(global_shape) // global_shape[0]
    return math.sqrt(gain / max(fan_in, 1))


class AmosRule(Rule):
    r"""Amos (Tian & Parikh 2022, "Amos: An Adam-style Optimizer with Adaptive Weight Decay
    towards Model-Oriented Scale", arXiv 2210.11693; JAX reference google-research/jestimator
    ``amos.py``, which this rule follows).

    Per tensor, with :math:`\xi` the learning rate, :math:`\eta` the expected scale of the
    tensor's entries, :math:`\zeta` the decay speed and :math:`\bar{g^2}` the mean of :math:`g^2`
    over the **whole** tensor (one shared second moment, a scalar per tensor):

    .. math::
        v &\leftarrow \beta v + (1-\beta)\, \bar{g^2}, \qquad
        r = \frac{1-\beta^t}{\max(v, \epsilon)}

        \gamma &= \frac{\xi^2\, r\, \bar{g^2}}{\sqrt{1 + \zeta\sqrt{\xi}\, b}}, \qquad
        \delta = \frac{\xi\eta\sqrt{r}\; g + \tfrac12 \gamma\, p}{1 + \zeta\sqrt{\xi\eta}\, b}

        p &\leftarrow p - \delta, \qquad b \leftarrow b + \gamma (1 + b)

    :math:`\tfrac12\gamma p` is Amos's adaptive weight decay and :math:`b` (state ``decay``) makes
    both the decay and the step size decay over training. The engine applies ``lr``, so the rule
    returns :math:`u = \delta / \xi` (computed without dividing, exact for ``lr = 0``); an LR
    schedule changes :math:`\xi` each step as jestimator's callable learning rate does.

    :math:`\eta`: ``eta`` if given (per parameter group: e.g. ``sqrt(1/fan_in)`` for an output
    layer, as jestimator's examples), else from the tensor's global shape: ``0.5`` for vectors and
    ``sqrt(eta_gain / fan_in)`` otherwise, ``fan_in = numel / shape[0]`` (torch layout; jestimator's
    examples use ``sqrt(2/fan_in)`` for hidden layers). ``momentum > 0`` adds an EMA of the update
    (jestimator's ``optax.ema(momentum, debias=False)``; slot ``exp_avg`` exists only then).

    Defaults: ``beta=0.999``, ``zeta=0.25``, ``eps=2^-125`` (jestimator), ``lr=1e-3``
    (pytorch_optimizer; jestimator has none and recommends about ``1/sqrt(number of batches)``),
    ``eta_gain=2``, ``momentum=0``, ``weight_decay=0`` (an extra decoupled decay on top of Amos's
    own). Not offered: jestimator's ``finetune_rate``, ``init_b_fn`` and ``shape_fn`` (v over
    chosen axes: here always the whole tensor), pytorch_optimizer's ``extra_l2``.

    Where the sources disagree: ``max(v, eps)`` as jestimator (pytorch_optimizer: ``v + eps`` with
    ``eps=1e-18``); one ``zeta`` for both decay factors as jestimator (pytorch_optimizer: ``c_coef``,
    ``d_coef``); for tensors with more than 2 dims ``fan_in`` is the product of all dims but the
    first, as jestimator's conv examples (pytorch_optimizer uses ``sqrt(1/shape[1])``); momentum
    averages ``u`` rather than ``lr u`` (the same for a constant lr). The mean of ``g^2`` is taken
    through the step context over the GLOBAL tensor, so it is exact when the parameter is sharded.
    """

    name = "amos"
    staged_stats = True  # the gradient's mean square (see Rule.staged_stats)
    class_name = "Amos"
    paper = "Amos: An Adam-style Optimizer with Adaptive Weight Decay towards Model-Oriented Scale, arXiv 2210.11693"
    hyperparams = {
        "lr": HP(1e-3, low=0.0),
        "beta": HP(0.999, low=0.0, high=1.0, high_open=True, doc="EMA coefficient of the shared second moment"),
        "zeta": HP(0.25, low=0.0, doc="speed of the step-size and weight-decay decay"),
        "eps": HP(JESTIMATOR_EPS, low=0.0, doc="floor of the second moment"),
        "eta": HP(None, kind="optional_float", low=0.0, low_open=True, doc="expected entry scale; None: from shape"),
        "eta_gain": HP(2.0, low=0.0, low_open=True, doc="eta = sqrt(eta_gain / fan_in) for matrices and kernels"),
        "momentum": HP(0.0, low=0.0, high=1.0, high_open=True, doc="EMA of the update; 0: none (no state)"),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg_sq", SCALAR),
        Slot("decay", SCALAR),
        Slot("exp_avg", FIRST_MOMENT, when=lambda group: group["momentum"] > 0),
    )

    def update(self, ctx, p, g, s):
        beta, zeta, eps = ctx.group["beta"], ctx.group["zeta"], ctx.group["eps"]
        # the learning rate: a number on the plain path, a traced 0-d tensor on the compiled one
        xi = ctx.lr
        sqrt_xi = math.sqrt(xi) if isinstance(xi, float) else xi.sqrt()
        n = len(g)

        def column(values) -> torch.Tensor:
            if not isinstance(values, list):
                values = [values] * n
            if any(isinstance(v, torch.Tensor) for v in values):  # traced per-step values
                return torch.stack([torch.as_tensor(v, dtype=g[0].dtype, device=g[0].device) for v in values])
            return torch.tensor(values, dtype=g[0].dtype, device=g[0].device)

        if ctx.group["eta"] is not None:
            eta = column(ctx.group["eta"])
        else:
            eta = column([shape_eta(view.global_shape, ctx.group["eta_gain"]) for view in ctx.views])
        # per-tensor scalars, stacked so that each formula is one kernel for the whole bucket
        g2 = torch.stack(ctx.sum_sq(g)) / column([ctx.numel(i) for i in range(n)])
        v = torch.stack(list(s.exp_avg_sq)).mul_(beta).add_(g2, alpha=1 - beta)
        r = column(ctx.bias_correction(beta)) / v.clamp_min(eps)
        b = torch.stack(list(s.decay))
        c = torch.rsqrt(1 + zeta * sqrt_xi * b)
        d = torch.reciprocal(1 + zeta * torch.sqrt(xi * eta) * b)
        gamma = c * (xi * xi) * r * g2
        grad_coef = d * eta * r.sqrt()  # lr * grad_coef = d xi eta sqrt(r)
        decay_coef = 0.5 * d * c * xi * r * g2  # lr * decay_coef = d gamma / 2
        s.exp_avg_sq.copy_(TensorList(list(v.unbind()), ctx.foreach))
        s.decay.copy_(TensorList(list((b + gamma * (1 + b)).unbind()), ctx.foreach))

        u = (g * list(grad_coef.unbind())).add_(p * list(decay_coef.unbind()))
        momentum = ctx.group["momentum"]
        if momentum > 0:
            s.exp_avg.lerp_(u, 1 - momentum)
            return s.exp_avg
        return u
