"""hfoptim: newer optimizers for HuggingFace training, with small state, exact when sharded.

    >>> import hfoptim
    >>> opt = hfoptim.create_optimizer(model, "ademamix_8bit", lr=3e-4)
    >>> hfoptim.list_optimizers("adan*")
"""

from .core.engine import Engine
from .core.hparams import HyperparameterError
from .lookahead import Lookahead
from .registry import CLASSES, OptimizerSpec, create_optimizer, get_optimizer, list_optimizers

globals().update({cls.__name__: cls for cls in CLASSES.values()})

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "HyperparameterError",
    "Lookahead",
    "OptimizerSpec",
    "create_optimizer",
    "get_optimizer",
    "list_optimizers",
    *sorted(cls.__name__ for cls in CLASSES.values()),
]
