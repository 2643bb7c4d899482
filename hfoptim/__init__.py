"""hfoptim: newer optimizers for HuggingFace training, with small state, exact when sharded.

>>> import hfoptim
>>> opt = hfoptim.create_optimizer(model, "ademamix_8bit", lr=3e-4)
>>> hfoptim.list_optimizers("adan*")
"""

from . import distributed  # noqa: F401  (installs the step-time choice of sharded layouts)
from .convert import convert_state_dict
from .core.hparams import HyperparameterError
from .core.optimizer import RuleOptimizer
from .core.param_layout import ParamLayout
from .lookahead import Lookahead
from .optimizers import (  # the public classes, one per rule (CLASSES: by registry name)
    CLASSES,
    NSGDA,
    PNM,
    SGDM,
    SM3,
    SMMF,
    Adafactor,
    AdaGL,
    AdaLo,
    AdaMomentum,
    AdamW,
    Adan,
    AdaNorm,
    AdaPNM,
    AdEMAMix,
    Amos,
    DiffGrad,
    Muon,
)
from .registry import OptimizerSpec, create_optimizer, get_optimizer, list_optimizers

__version__ = "0.1.0"

#: the HF Trainer pieces (hfoptim.integrations.transformers); they import transformers, so they
#: load on first use
TRAINER_NAMES = ("HFOptimTrainer", "HFOptimTrainingArguments", "OptimizerStateCallback")


def __getattr__(name: str):
    if name in TRAINER_NAMES:
        from .integrations import transformers as integration

        return getattr(integration, name)
    raise AttributeError(f"module 'hfoptim' has no attribute {name!r}")


__all__ = [
    "CLASSES",
    "RuleOptimizer",
    "convert_state_dict",
    *TRAINER_NAMES,
    "HyperparameterError",
    "Lookahead",
    "OptimizerSpec",
    "ParamLayout",
    "create_optimizer",
    "get_optimizer",
    "list_optimizers",
    "AdEMAMix",
    "AdaGL",
    "AdaLo",
    "AdaMomentum",
    "AdaNorm",
    "AdaPNM",
    "Adafactor",
    "AdamW",
    "Adan",
    "Amos",
    "DiffGrad",
    "Muon",
    "NSGDA",
    "PNM",
    "SGDM",
    "SM3",
    "SMMF",
]
