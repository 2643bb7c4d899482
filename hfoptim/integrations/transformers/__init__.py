"""hfoptim in the HuggingFace Trainer: optimizer names in ``TrainingArguments``, typed
``optim_args``, the loss for loss-driven optimizers, optimizer-state bytes in the logs.

    >>> from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
    >>> args = HFOptimTrainingArguments("out", optim="ademamix", optim_args="betas=(0.9,0.99,0.9999),t_alpha=auto")
    >>> HFOptimTrainer(model=model, args=args, train_dataset=train).train()
"""

from .arguments import DeepSpeedOptimizerConflict, HFOptimTrainingArguments
from .callbacks import OptimizerStateCallback
from .loss import LossHandoff, find_engines
from .names import OptimChoice, resolve_optim
from .optim_args import AUTO, OptimArgsError, format_optim_args, parse_optim_args
from .sharding import (
    Sharding,
    ShardingNotEngaged,
    check_accelerator,
    check_sharding,
    requested_sharding,
    setup_cpu_sharding,
)
from .trainer import HFOptimTrainer

__all__ = [
    "AUTO",
    "DeepSpeedOptimizerConflict",
    "HFOptimTrainer",
    "HFOptimTrainingArguments",
    "LossHandoff",
    "OptimArgsError",
    "OptimChoice",
    "OptimizerStateCallback",
    "find_engines",
    "format_optim_args",
    "parse_optim_args",
    "Sharding",
    "ShardingNotEngaged",
    "check_accelerator",
    "check_sharding",
    "requested_sharding",
    "resolve_optim",
    "setup_cpu_sharding",
]
