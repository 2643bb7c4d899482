r"""Adaptive memory momentum: the momentum coefficient chosen each step by a two-plane model.

Topollai & Choromanska, "Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
Optimization", arXiv 2510.04988 (AM-SGD, AM-AdamW). An option of the rules that keep a first
moment (``adaptive_memory=True``; the ``_am`` name suffix: ``sgdm_am``, ``adamw_am``), not a rule.

The memory update, as the paper states it (abstract pages and its published summaries):

.. math::
    d_{t+1} = \frac{\beta_t + \lambda}{1 + \lambda}\, d_t + \frac{1 - \beta_t}{1 + \lambda}\, g_t,
    \qquad x_{t+1} = x_t - \eta\, d_{t+1}

(AM-AdamW divides :math:`d_{t+1}` by Adam's root second moment and decays the weights
decoupled). The paper's body, where :math:`\beta_t` and :math:`\lambda` are given, could not be
read here (no copy of the paper body or of the authors' code was reachable; searched: arXiv
abs/html, OpenReview, GitHub by title and authors). :math:`\beta_t` is therefore DERIVED here as
the closed-form minimiser of the proximal two-plane model the paper describes, and the derivation
reproduces the update above exactly, which is the check that the model is read right:

* the model of the loss around :math:`x_t` is the larger of two planes through
  :math:`(x_t, f(x_t))`: the gradient plane, slope :math:`g_t`, and the memory plane, slope
  :math:`d_t`;
* the step minimises that model plus the proximal term :math:`\frac{1}{2\eta}\|x - x_t\|^2` and
  a pull toward repeating the previous step, :math:`\frac{\lambda}{2\eta}\|x - (x_t - \eta d_t)\|^2`.

Writing the maximum of the planes as :math:`\max_{\beta\in[0,1]}` of their mixture
:math:`c_\beta = \beta d_t + (1-\beta) g_t` and exchanging min and max (convex in :math:`x`,
linear in :math:`\beta`): for a fixed :math:`\beta` the minimiser is
:math:`x = x_t - \eta\,(c_\beta + \lambda d_t)/(1+\lambda)`, which is the paper's update; the dual
asks for the :math:`\beta` minimising :math:`\|c_\beta + \lambda d_t\|^2
= \|g_t + \lambda d_t + \beta (d_t - g_t)\|^2`, a quadratic in :math:`\beta`:

.. math::
    \beta_t = \mathrm{clip}_{[0,1]}\Big(\frac{\langle g_t + \lambda d_t,\; g_t - d_t\rangle}
    {\|g_t - d_t\|^2}\Big)

Settled here (each a choice where the source was not reachable, said as such):

* the inner products run over each **whole tensor** (one :math:`\beta_t` per parameter tensor: the
  model summed over tensors, each with its own two planes). They are per-tensor statistics and go
  through the step context, so they are the whole tensor's under sharding. A single
  :math:`\beta_t` for the whole model (all tensors in one model) is not built: it needs every
  tensor's sums before any tensor's memory is updated (a second pass of the engine).
* :math:`d_0 = 0`: the memory plane is then flat, and the model's minimiser would not move; with
  no memory yet the model is the gradient plane alone, so :math:`\beta_t = 0` while
  :math:`\|d_t\| = 0` (the first step is :math:`d_1 = g_1/(1+\lambda)`). Also
  :math:`\beta_t = 0` when :math:`g_t = d_t` (the update is then :math:`d_t` for any
  :math:`\beta_t`).
* no bias correction of :math:`d` (its first value is the gradient itself, not a shrunk EMA).
* :math:`\lambda` (``am_lambda``) defaults to 0 (the two-plane model alone; the paper's value was
  not reachable), any :math:`\lambda \ge 0` accepted.
* AM-AdamW computes :math:`\beta_t` from the raw gradient and memory (Euclidean model), then
  preconditions :math:`d_{t+1}` as Adam does.
"""

from __future__ import annotations

import torch

from ..core.hparams import HP
from ..core.tensorlist import TensorList

#: the hyperparameters a rule with a first moment adds to offer adaptive memory
HPARAMS = {
    "adaptive_memory": HP(
        False,
        kind="bool",
        doc="adaptive memory momentum (arXiv 2510.04988): the momentum coefficient from a two-plane model each step",
    ),
    "am_lambda": HP(0.0, low=0.0, doc="adaptive memory: weight of the pull toward repeating the previous step"),
}


def coefficients(ctx, d: TensorList, g: TensorList, lam: float) -> list[torch.Tensor]:
    """``beta_t`` of each tensor (0-d tensors), from whole-tensor inner products of ``g`` and ``d``."""
    diff = g - d
    den = ctx.sum_sq(diff)
    num_g = ctx.stats.sum([x * y for x, y in zip(g.tensors, diff.tensors)], ctx.views)
    if lam:
        num_d = ctx.stats.sum([x * y for x, y in zip(d.tensors, diff.tensors)], ctx.views)
        num = [a + lam * b for a, b in zip(num_g, num_d)]
    else:
        num = num_g
    memory = ctx.sum_sq(d)
    betas = []
    for n, q, m in zip(num, den, memory):
        beta = (n / torch.where(q > 0, q, torch.ones_like(q))).clamp(0.0, 1.0)
        betas.append(torch.where((q > 0) & (m > 0), beta, torch.zeros_like(beta)))
    return betas


def update_memory(ctx, d: TensorList, g: TensorList, lam: float) -> None:
    r"""``d <- ((beta_t + lambda) d + (1 - beta_t) g) / (1 + lambda)`` in place, ``beta_t`` per tensor."""
    betas = coefficients(ctx, d, g, lam)
    keep = [(b + lam) / (1.0 + lam) for b in betas]
    take = [(1.0 - b) / (1.0 + lam) for b in betas]
    d.mul_(keep).add_scaled_(g, take)
