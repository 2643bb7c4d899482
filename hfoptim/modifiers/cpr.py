r"""CPR, constrained parameter regularization (Franke, Hefenbrock, Koehler & Hutter, NeurIPS 2024,
"Improving Deep Learning Optimization through Constrained Parameter Regularization",
arXiv 2311.09058; authors' code automl/CPR, pytorch_cpr/adamcpr.py at 82843ea).

Instead of a weight decay of fixed strength, each tensor's regularization statistic
``R(p) = sum(p^2)`` is kept below a bound ``kappa`` by a Lagrange multiplier updated every step
(after the rule's update):

.. math::
    \lambda_t = \max\big(0,\ \lambda_{t-1} + \tfrac{\mu}{n}\,(R(p_t) - \kappa)\big),\qquad
    p_t \leftarrow p_t - 2\,\lambda_t\, p_t\quad(\times\,\mathrm{lr}\ \text{with}\ \texttt{cpr\_by\_lr})

with ``n`` the tensor's number of elements and ``mu = cpr_mu`` (the code's ``kappa_update``,
1.0). ``kappa`` per tensor (``cpr_kappa_init``):

* ``"inflection_point"`` (Kappa-IP, the default; no hyperparameter): every ``cpr_step_size``
  steps (200) the statistic is sampled into an EMA (``cpr_ema_decay`` 0.9); from the second
  sample on its growth ``delta = ema - ema_prev`` is tracked, and from step ``3 x step_size``
  on, the first sample whose growth is smaller than the previous one sets ``kappa = R(p_t)``:
  the point where R's growth starts to slow. The constraint applies from the next step.
* ``"constant"`` (Kappa-K): ``kappa = cpr_kappa``, from step 1.
* ``"dependent"``: ``kappa = cpr_kappa * R(p_0)`` (the initial parameters), from step 1.
* ``"warm_start"`` (Kappa-WS): ``kappa = R(p_s)`` after step ``s = cpr_warm_start``; the
  constraint applies from step ``s + 1`` (no regularization before).

**Where the authors' code differs** (documented, not copied): its multi-tensor path applies
the constraint with a placeholder ``kappa = 1000`` until the inflection point fires and feeds
``(R - 1000) mu / n`` instead of ``R`` to the detector; its single-tensor path evaluates the
detector every step and never writes the EMA back to the state, so its "EMA" is
``(1 - decay) R`` of the current step. Ours samples every ``cpr_step_size`` steps with a real
EMA. With ``cpr_step_size=1, cpr_ema_decay=0`` the two readings coincide (tested against the
authors' single-tensor code).

**Which tensors.** The groups whose ``weight_decay`` is non-zero, as in the authors' code (its
value is only the switch: the HF Trainer's no-decay group of biases and norm weights gets no
constraint); embeddings are constrained when they are in such a group (the authors leave them
out by default with ``reg_embedding=False``). Only ``R = sum(p^2)`` (the paper's L2 form) is
implemented. ``sum(p^2)`` is the whole tensor's, through the step context: exact under sharding.

State per tensor (fp32 scalars): ``cpr_lambda``, ``cpr_kappa`` (negative while not set), and
for the inflection point ``cpr_ema``, ``cpr_prev``, ``cpr_delta``.
"""

from __future__ import annotations

import torch

from ..core.hparams import HP
from ..core.rule import SCALAR, Slot
from .base import POST, Modifier

KAPPA_INITS = ("inflection_point", "constant", "dependent", "warm_start")


def _enabled(group: dict) -> bool:
    return group.get("weight_decay_mode") == "cpr" and group.get("weight_decay", 0) != 0


def _tracking(group: dict) -> bool:
    return _enabled(group) and group.get("cpr_kappa_init") == "inflection_point"


def _unset(p: torch.Tensor) -> torch.Tensor:
    return torch.full((), -1.0, device=p.device)


class ConstrainedParameterRegularization(Modifier):
    """CPR as the weight-decay form ``weight_decay_mode="cpr"``; see the module docstring."""

    name = "cpr"
    stage = POST
    switch = "weight_decay_mode"
    hyperparams = {
        "cpr_kappa_init": HP("inflection_point", kind="str", choices=KAPPA_INITS, doc="how each bound is set"),
        "cpr_kappa": HP(
            None, kind="optional_float", low=0.0, doc="the bound (constant) or its factor on R(p_0) (dependent)"
        ),
        "cpr_warm_start": HP(None, kind="optional_float", low=1.0, doc="warm_start: the bound is R(p) after this step"),
        "cpr_mu": HP(1.0, low=0.0, low_open=True, doc="step size of the Lagrange multiplier (per element)"),
        "cpr_step_size": HP(200, kind="int", low=1, doc="inflection point: steps between samples of R"),
        "cpr_ema_decay": HP(0.9, low=0.0, high=1.0, high_open=True, doc="inflection point: EMA of the samples"),
        "cpr_by_lr": HP(False, kind="bool", doc="scale the constraint's step by lr"),
    }
    suffix_kwargs = {"weight_decay_mode": "cpr", "weight_decay": 1.0}
    slots = (
        Slot("cpr_lambda", SCALAR, when=_enabled),
        Slot("cpr_kappa", SCALAR, init=_unset, when=_enabled),
        Slot("cpr_ema", SCALAR, when=_tracking),
        Slot("cpr_prev", SCALAR, when=_tracking),
        Slot("cpr_delta", SCALAR, when=_tracking),
    )

    def enabled(self, group: dict) -> bool:
        return _enabled(group)

    def check_options(self, group: dict) -> str | None:
        init, kappa, warm = group["cpr_kappa_init"], group["cpr_kappa"], group["cpr_warm_start"]
        if group["weight_decay_mode"] != "cpr":
            given = [k for k in ("cpr_kappa", "cpr_warm_start") if group[k] is not None]
            return f"{', '.join(given)} need weight_decay_mode='cpr'" if given else None
        if init in ("constant", "dependent") and kappa is None:
            return f"cpr_kappa_init={init!r} needs cpr_kappa (the bound, or its factor on R(p_0))"
        if init not in ("constant", "dependent") and kappa is not None:
            return f"cpr_kappa is used by cpr_kappa_init='constant' or 'dependent' only, not {init!r}"
        if init == "warm_start" and (warm is None or warm != int(warm)):
            return "cpr_kappa_init='warm_start' needs cpr_warm_start, a whole number of steps >= 1"
        if init != "warm_start" and warm is not None:
            return f"cpr_warm_start is used by cpr_kappa_init='warm_start' only, not {init!r}"
        return None

    def prepare(self, ctx, p):
        """``R(p_0)`` of the tensors at their first step (``dependent`` bounds), else None."""
        if ctx.group["cpr_kappa_init"] != "dependent" or 1 not in ctx.steps:
            return None
        return ctx.sum_sq(p)

    def apply(self, ctx, initial, g, p):
        group, s = ctx.group, ctx.slots
        init, mu = group["cpr_kappa_init"], group["cpr_mu"]
        lr = ctx.lr if group["cpr_by_lr"] else 1.0
        scales = [2.0 * x for x in lr] if isinstance(lr, list) else [2.0 * lr] * len(p)
        for i, t in enumerate(ctx.steps):
            if t == 1 and init == "constant":
                s.cpr_kappa[i].fill_(group["cpr_kappa"])
            elif t == 1 and init == "dependent":
                s.cpr_kappa[i].copy_(initial[i] * group["cpr_kappa"])
        sums = ctx.sum_sq(p)  # R(p_t), after the update
        factors = []
        for i, (t, r) in enumerate(zip(ctx.steps, sums)):
            lam, kappa = s.cpr_lambda[i], s.cpr_kappa[i]
            bound = kappa >= 0
            lam.copy_(torch.where(bound, (lam + (r - kappa) * (mu / ctx.numel(i))).clamp_min(0.0), lam))
            factors.append(1.0 - lam * scales[i])
            if init == "warm_start" and t == int(group["cpr_warm_start"]):
                kappa.copy_(r)
            elif init == "inflection_point" and t % group["cpr_step_size"] == 0:
                self._track(group, t, r, kappa, s.cpr_ema[i], s.cpr_prev[i], s.cpr_delta[i])
        p.mul_(factors)

    @staticmethod
    def _track(group, t, r, kappa, ema, prev, delta) -> None:
        """One sample of the inflection-point detector (while the bound is not set)."""
        unset = kappa < 0
        size, decay = group["cpr_step_size"], group["cpr_ema_decay"]
        ema.copy_(torch.where(unset, ema * decay + r * (1.0 - decay), ema))
        if t <= size:
            return
        growth = ema - prev
        if t > 3 * size:
            kappa.copy_(torch.where(unset & (delta > growth), r, kappa))
        prev.copy_(torch.where(unset, ema, prev))
        if t > 2 * size:
            delta.copy_(torch.where(unset, growth, delta))
