"""The public optimizer classes, one per rule: ``hfoptim.AdamW``, ``hfoptim.AdEMAMix``, ...

Each is the :class:`~hfoptim.core.optimizer.RuleOptimizer` bound to one rule, written out here (not made at
import time) so that ``help(hfoptim.AdEMAMix)``, IDEs, type checkers and autodoc see it; its
docstring is the rule's (the update as math, the paper). ``tests/test_registry_classes.py`` checks
that every registered rule has its class here and nothing else is here. Names with options
(``ademamix_cautious_8bit``) are built by :mod:`hfoptim.registry`.
"""

from __future__ import annotations

from .core.optimizer import RuleOptimizer
from .rules.adafactor import AdafactorRule
from .rules.adagl import AdaGLRule
from .rules.adalo import AdaLoRule
from .rules.adamomentum import AdaMomentumRule
from .rules.adamw import AdamWRule
from .rules.adan import AdanRule
from .rules.adanorm import AdaNormRule
from .rules.ademamix import AdEMAMixRule
from .rules.amos import AmosRule
from .rules.diffgrad import DiffGradRule
from .rules.muon import MuonRule
from .rules.nsgda import NSGDARule
from .rules.pnm import AdaPNMRule, PNMRule
from .rules.sgdm import SGDMRule
from .rules.sm3 import SM3Rule
from .rules.smmf import SMMFRule


class Adafactor(RuleOptimizer):
    __doc__ = AdafactorRule.__doc__
    rule_class = AdafactorRule


class AdaGL(RuleOptimizer):
    __doc__ = AdaGLRule.__doc__
    rule_class = AdaGLRule


class AdaLo(RuleOptimizer):
    __doc__ = AdaLoRule.__doc__
    rule_class = AdaLoRule


class AdaMomentum(RuleOptimizer):
    __doc__ = AdaMomentumRule.__doc__
    rule_class = AdaMomentumRule


class AdamW(RuleOptimizer):
    __doc__ = AdamWRule.__doc__
    rule_class = AdamWRule


class Adan(RuleOptimizer):
    __doc__ = AdanRule.__doc__
    rule_class = AdanRule


class AdaNorm(RuleOptimizer):
    __doc__ = AdaNormRule.__doc__
    rule_class = AdaNormRule


class AdEMAMix(RuleOptimizer):
    __doc__ = AdEMAMixRule.__doc__
    rule_class = AdEMAMixRule


class Amos(RuleOptimizer):
    __doc__ = AmosRule.__doc__
    rule_class = AmosRule


class DiffGrad(RuleOptimizer):
    __doc__ = DiffGradRule.__doc__
    rule_class = DiffGradRule


class Muon(RuleOptimizer):
    __doc__ = MuonRule.__doc__
    rule_class = MuonRule


class NSGDA(RuleOptimizer):
    __doc__ = NSGDARule.__doc__
    rule_class = NSGDARule


class AdaPNM(RuleOptimizer):
    __doc__ = AdaPNMRule.__doc__
    rule_class = AdaPNMRule


class PNM(RuleOptimizer):
    __doc__ = PNMRule.__doc__
    rule_class = PNMRule


class SGDM(RuleOptimizer):
    __doc__ = SGDMRule.__doc__
    rule_class = SGDMRule


class SM3(RuleOptimizer):
    __doc__ = SM3Rule.__doc__
    rule_class = SM3Rule


class SMMF(RuleOptimizer):
    __doc__ = SMMFRule.__doc__
    rule_class = SMMFRule


#: every class above by its rule's registry name
CLASSES: dict[str, type[RuleOptimizer]] = {
    cls.rule_class.name: cls
    for cls in (
        Adafactor,
        AdaGL,
        AdaLo,
        AdaMomentum,
        AdamW,
        Adan,
        AdaNorm,
        AdEMAMix,
        Amos,
        DiffGrad,
        Muon,
        NSGDA,
        AdaPNM,
        PNM,
        SGDM,
        SM3,
        SMMF,
    )
}
