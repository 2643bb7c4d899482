"""Options that work with any rule: see :mod:`.gradient`, :mod:`.update`, :mod:`.weight_decay`."""

from ..core.rule import OPTION_SLOTS
from .base import GRAD, POST, UPDATE, Modifier
from .cpr import ConstrainedParameterRegularization
from .gradient import AdaptiveGradientClipping, GradientCentralization, GradientNormalization, SoftClip
from .spectral import SpectralCap
from .update import CautiousMask, NormLoss, TrustRatio

#: every modifier, in the order applied within its stage
MODIFIERS: tuple[Modifier, ...] = (
    AdaptiveGradientClipping(),
    SoftClip(),
    GradientCentralization(),
    GradientNormalization(),  # issue 16
    CautiousMask(),
    TrustRatio(),
    # issue 16: last, so it caps the step the other update modifiers produced
    SpectralCap(),
    NormLoss(),  # issue 16: a decoupled pull toward unit row norms, after the update's modifiers
    ConstrainedParameterRegularization(),  # issue 16: weight_decay_mode="cpr", after the update
)

OPTION_SLOTS.extend(slot for modifier in MODIFIERS for slot in modifier.slots if slot not in OPTION_SLOTS)

__all__ = ["GRAD", "UPDATE", "POST", "MODIFIERS", "Modifier"]
