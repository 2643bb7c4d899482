"""Adafactor: factored second moment, relative step size, update clipping."""

from __future__ import annotations

import math

import torch

from ..core.hparams import HP
from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Rule, Slot


def _relative_step(t, lr):
    """``min(lr, 1/sqrt(t))``; for a traced 0-d step tensor (the compiled path) as tensor
    operations (``math.sqrt`` would read the tensor's value and break the traced graph)."""
    if isinstance(t, torch.Tensor):
        return t.to(torch.float32).rsqrt().clamp_max(lr)
    return min(lr, 1.0 / math.sqrt(t))


class AdafactorRule(Rule):
    r"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost", arXiv 1804.04235, Algorithms 4 and 5 with sections 5-8).

    .. math::
        \hat\beta_{2t} &= 1 - t^{c}\quad(c = \text{decay\_rate} = -0.8)

        R_t &= \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\,(G_t^2 + \epsilon_1) 1_m,\qquad
        C_t = \hat\beta_{2t} C_{t-1} + (1-\hat\beta_{2t})\, 1_n^\top (G_t^2 + \epsilon_1)

        \hat V_t &= R_t C_t / 1_n^\top R_t,\qquad U_t = G_t / \sqrt{\hat V_t},\qquad
        \hat U_t = U_t / \max(1, \mathrm{RMS}(U_t)/d)

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) \hat U_t\ \ (\text{only if } \beta_1 \text{ is set})

        \rho_t &= \min(\mathrm{lr}, 1/\sqrt t)\ \ (\text{relative\_step}; \text{ else } \rho_t = \mathrm{lr}),
        \qquad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(X_{t-1}))\,\rho_t\ \ (\text{scale\_parameter})

        X_t &= X_{t-1} - \alpha_t\,(\hat U_t \text{ or } m_t) \;-\; \alpha_t\,\mathrm{wd}\,X_{t-1}

    **Storage.** The second moment is a slot whose default storage is ``"factored"``
    (:mod:`hfoptim.state.factored`): row and column sums of the ``(shape[0], rest)`` view of a
    2+-D tensor, dense for 1-D tensors. The rule updates the decoded ``\hat V_{t-1}`` with
    ``G_t^2 + eps1`` and asks ``ctx.stored`` for the stored form of the result, which is exactly
    ``R_t C_t / 1^T R_t`` above (row/column sums are linear). ``state="smmf"`` or ``"shared"``
    store it otherwise, ``state="fp32"`` keeps it dense (the unfactored form the paper uses for
    vectors); the math here does not change.

    **The precision fix.** ``\hat V_t`` is formed in fp32 (at least) as ``(R / 1^T R) C`` and the
    square root is taken once, last (``G / sqrt(V_hat)``), instead of the common
    ``(R / mean R).rsqrt() * C.rsqrt()`` (two roundings of reciprocal roots; measured in
    tests/test_adafactor.py).

    **Choices** (the paper leaves them open):

    * ``lr`` is the cap of the relative step, ``rho_t = min(lr, 1/sqrt(t))``, as in
      torch.optim.Adafactor; its default 1e-2 is the paper's constant, so the defaults are the
      paper's. ``lr=None`` (HF transformers' spelling of "relative step") is not used: a number
      keeps LR schedulers working, which scale the cap. ``relative_step=False``: ``rho_t = lr``.
    * the first moment (``beta1``, default None = none, the paper's memory-saving setting)
      averages the clipped update ``U_hat`` and the step ``alpha_t`` multiplies it afterwards;
      tensor2tensor, HF transformers and pytorch_optimizer average ``alpha_t U_hat`` instead.
      The two agree whenever ``alpha_t`` is constant (``relative_step=False,
      scale_parameter=False``); ours keeps ``m`` in update units, so lr schedules and weight
      decay apply to it as to any other rule.
    * decoupled weight decay uses the step actually taken, ``alpha_t`` (pytorch_optimizer does
      the same; torch.optim.Adafactor decays by ``lr * wd``). Default 0 (paper: none).
    * ``denominator="atan2"``/``"softplus"`` replace ``G / sqrt(V_hat)``; ``eps1`` still enters
      ``V`` as above.

    Defaults: ``lr=1e-2``, ``beta1=None``, ``decay_rate=-0.8``, ``eps1=1e-30``, ``eps2=1e-3``,
    ``clip_threshold=1``, ``relative_step=True``, ``scale_parameter=True``, ``weight_decay=0``.
    """

    name = "adafactor"
    class_name = "Adafactor"
    paper = "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost, arXiv 1804.04235"
    hyperparams = {
        "lr": HP(1e-2, low=0.0, doc="cap of the relative step (relative_step=True) or the step itself"),
        "beta1": HP(None, kind="optional_float", low=0.0, high=1.0, high_open=True, doc="first moment; None: none"),
        "decay_rate": HP(-0.8, low=-1.0, high=0.0, doc="c in beta2(t) = 1 - t^c"),
        "eps1": HP(1e-30, low=0.0, doc="added to G^2 in the second moment"),
        "eps2": HP(1e-3, low=0.0, doc="floor of RMS(X) in the parameter scale"),
        "clip_threshold": HP(1.0, low=0.0, low_open=True, doc="d in U / max(1, RMS(U)/d)"),
        "relative_step": HP(True, kind="bool", doc="rho_t = min(lr, 1/sqrt(t)) instead of lr"),
        "scale_parameter": HP(True, kind="bool", doc="multiply the step by max(eps2, RMS(X))"),
        "weight_decay": HP(0.0, low=0.0),
    }
    slots = (
        Slot("exp_avg", FIRST_MOMENT, when=lambda group: group["beta1"] is not None),
        Slot("exp_avg_sq", SECOND_MOMENT),
    )
    default_state = {"exp_avg_sq": "factored"}
    stores_early = frozenset({"exp_avg_sq"})  # the update reads the stored (factored) v
    preconditioned = True

    refused_state = {
        "8bit": "its update divides by the root second moment with no eps, and 8-bit codes round small "
        "second moments in a block to zero (a division by zero); use the factored default or state='bf16'"
    }

    def update(self, ctx, p, g, s):
        group = ctx.group
        decay, eps1 = group["decay_rate"], group["eps1"]
        w = ctx.per_step(lambda t: t**decay)  # 1 - beta2_t
        # V + w (G^2 + eps1 - V) as (1 - w) V + w G^2 + w eps1: three passes in V's memory, no
        # G^2 temporary (a full-size allocation per tensor and step on the plain path)
        ws = w if isinstance(w, list) else [w] * len(g)
        s.exp_avg_sq.mul_([1 - x for x in ws]).addcmul_(g, g, value=ws).add_([eps1 * x for x in ws])
        v_hat = ctx.stored(s, "exp_avg_sq")  # R_t C_t / 1^T R_t when factored
        # a decoded factored V_hat is a temporary: its root (and u) is taken in its memory
        u = ctx.precondition(g, v_hat, 0.0, v_scratch=ctx.temporaries.get("exp_avg_sq", False))
        d = group["clip_threshold"]
        u.div_([(rms / d).clamp_min(1.0) for rms in ctx.rms(u)])
        if group["beta1"] is not None:
            s.exp_avg.lerp_(u, 1.0 - group["beta1"])
            u = s.exp_avg.clone()
        ctx.lr = self._step_size(ctx, p)
        return u

    @staticmethod
    def _step_size(ctx, p):
        """``alpha_t`` per tensor: the relative step, times ``max(eps2, RMS(X_{t-1}))``."""
        group = ctx.group
        lr = ctx.lr  # group["lr"], or on the compiled path a traced 0-d tensor (no recompiling per schedule step)
        if group["relative_step"]:
            rho = ctx.per_step(lambda t: _relative_step(t, lr))
        else:
            rho = lr
        if not group["scale_parameter"]:
            return rho
        rhos = rho if isinstance(rho, list) else [rho] * len(p)
        return [r.clamp_min(group["eps2"]) * rho_i for r, rho_i in zip(ctx.rms(p), rhos)]
