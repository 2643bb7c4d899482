"""AdaLo: the step size comes from the training loss, not from a learning-rate schedule."""

from __future__ import annotations

import warnings

from ..core.hparams import HP, betas
from ..core.rule import FIRST_MOMENT, SCALAR, Rule, Slot

#: AdaLo's ``lr`` default; the value is never used (see :class:`AdaLoRule`)
UNUSED_LR = 1.0
MODES = ("adversarial", "compliant")


def _warn_lr_ignored(lr) -> None:
    """HP check for ``lr``: accept any valid value, but say once that it has no effect."""
    if float(lr) != UNUSED_LR:
        warnings.warn(
            f"AdaLo ignores lr={float(lr)!r}: its step size is max(loss_ema / kappa, eps), set from the "
            "training loss (tune kappa instead); learning-rate schedulers have no effect on it",
            UserWarning,
            stacklevel=2,
        )
    return None


def transformed_loss(loss: float) -> float:
    """``(tanh(-log1p(L)/2) + 1)/2``, computed as the identical ``1/(2 + L)`` (no cancellation
    for large losses). Defined for ``L > -1`` as the paper's form."""
    if not loss > -1.0:
        raise ValueError(f"AdaLo needs a training loss > -1 (it takes log1p(loss)); got {loss}")
    return 1.0 / (2.0 + loss)


class AdaLoRule(Rule):
    r"""AdaLo (Information Sciences 2024, "AdaLo: Adaptive learning rate optimizer with loss for
    classification", doi:10.1016/j.ins.2024.121607; formulas as the public unofficial
    implementation cpuimage/AdaLo).

    With the training loss :math:`L` of the step:

    .. math::
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        \tilde L = \tfrac12\big(\tanh(-\tfrac12\log(1+L)) + 1\big) = \frac{1}{2+L}, \qquad
        e \leftarrow \beta_2 e + (1-\beta_2) \tilde L

        \eta_t &= \max(e/\kappa,\ \epsilon) \ \text{(``mode="adversarial"``, default: higher loss,
        smaller step)},\qquad \eta_t = \max((1-e)/\kappa,\ \epsilon) \ \text{(``"compliant"``)}

        p &\leftarrow p\,(1 - \eta_t\,\mathrm{wd}) - \eta_t\, m

    ``e`` starts at 0 and is not bias-corrected (as the reference code). The engine applies
    :math:`\eta_t` as the learning rate of each tensor, so weight decay (decoupled by default,
    also ``"cautious"``/``"l2"``) and update modifiers see :math:`\eta_t`.

    **lr is not used.** The paper replaces the learning rate by :math:`\eta_t`. ``lr`` is
    accepted (Trainer and LR schedulers set it) and ignored; a value other than the default
    (1.0) emits a ``UserWarning`` once, since a learning rate or schedule the user believes is
    active would otherwise be silently dropped. Tune ``kappa`` instead.

    **The loss is required each step**: ``optimizer.step(closure)``, ``optimizer.step(loss=loss)``
    or ``optimizer.set_loss(loss)`` before ``step()``; without it the step would sit at eps, so
    the engine raises instead. The loss must be > -1 (``log1p``). With AMP,
    ``torch.amp.GradScaler.step`` refuses closures but forwards keyword arguments, so pass the
    **unscaled** loss: ``scaler.step(optimizer, loss=loss.detach())``. A step the scaler skips
    (inf/NaN gradients) leaves the loss EMA unchanged.

    State: ``exp_avg`` (m) and ``loss_ema`` (e, one value per parameter, so each parameter's
    state is self-contained under sharding and ZeRO-3). Defaults (reference code):
    ``betas=(0.9, 0.999)``, ``kappa=3``, ``weight_decay=1e-2``, ``eps=1e-8``.
    """

    elementwise = True
    name = "adalo"
    class_name = "AdaLo"
    paper = "AdaLo: Adaptive learning rate optimizer with loss for classification, Information Sciences 2024"
    hyperparams = {
        "lr": HP(UNUSED_LR, low=0.0, check=_warn_lr_ignored, doc="ignored: the step size comes from the loss"),
        "betas": betas((0.9, 0.999), doc="(beta1 gradient EMA, beta2 loss EMA)"),
        "kappa": HP(3.0, low=0.0, low_open=True, doc="loss scaling: step size = loss_ema / kappa"),
        "mode": HP("adversarial", kind="str", choices=MODES),
        "eps": HP(1e-8, low=0.0, doc="smallest step size"),
        "weight_decay": HP(1e-2, low=0.0),
    }
    slots = (Slot("exp_avg", FIRST_MOMENT), Slot("loss_ema", SCALAR))
    needs_loss = True

    def update(self, ctx, p, g, s):
        b1, b2 = ctx.group["betas"]
        kappa, eps = ctx.group["kappa"], ctx.group["eps"]
        s.exp_avg.lerp_(g, 1 - b1)
        s.loss_ema.mul_(b2).add_((1 - b2) * transformed_loss(ctx.loss))
        level = s.loss_ema if ctx.group["mode"] == "adversarial" else 1.0 - s.loss_ema
        ctx.lr = list((level / kappa).clamp_min_(eps))
        return s.exp_avg
