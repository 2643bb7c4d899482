"""Options that work with any rule: see :mod:`.gradient`, :mod:`.update`, :mod:`.weight_decay`."""

from .base import GRAD, UPDATE, Modifier
from .gradient import AdaptiveGradientClipping, GradientCentralization, SoftClip
from .spectral import SpectralCap
from .update import CautiousMask, TrustRatio

#: every modifier, in the order applied within its stage
MODIFIERS: tuple[Modifier, ...] = (
    AdaptiveGradientClipping(),
    SoftClip(),
    GradientCentralization(),
    CautiousMask(),
    TrustRatio(),
    # issue 16: last, so it caps the step the other update modifiers produced
    SpectralCap(),
)

__all__ = ["GRAD", "UPDATE", "MODIFIERS", "Modifier"]
