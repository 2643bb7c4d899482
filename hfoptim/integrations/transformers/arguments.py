"""``HFOptimTrainingArguments``: ``TrainingArguments`` whose ``optim`` takes hfoptim names and whose
``optim_args`` are typed.

    >>> args = HFOptimTrainingArguments("out", optim="ademamix_8bit",
    ...                                  optim_args="betas=(0.9,0.99,0.9999),t_alpha=auto,t_beta3=auto")

Everything is checked when the arguments are built: an unknown name, an unknown option, a value
of the wrong type or range, a DeepSpeed config with its own ``optimizer`` section — each raises
``ValueError`` naming the problem and what is accepted. The fields stay plain strings, so
``to_json_string()`` and ``HfArgumentParser`` (``--optim ademamix --optim_args "betas=(0.9,0.99,0.999)"``)
round-trip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .names import TRANSFORMERS_PREFIX, OptimChoice, resolve_optim
from .optim_args import format_optim_args, parse_optim_args
from .plan import Override, check_plan, split_optim_args
from .sharding import setup_cpu_sharding

OPTIM_HELP = (
    "The optimizer: any hfoptim name (hfoptim.list_optimizers(), e.g. 'ademamix', 'adamw_8bit', "
    "'adan_cautious') or any transformers built-in (OptimizerNames). Where both use a name, it is "
    f"hfoptim's; the built-in is '{TRANSFORMERS_PREFIX}<name>'."
)
OPTIM_ARGS_HELP = (
    "Options of the optimizer, typed: 'betas=(0.9,0.99),eps=1e-7,nesterov=true,state=8bit'; 'auto' "
    "for values that follow the run (t_alpha=auto: total steps); '<selector>:<option>=<value>' for "
    "some parameters ('embeddings:state=fp32', 'lm_head:weight_decay=0'). For built-in optimizers, "
    "as in transformers."
)
CPU_SHARDING_HELP = (
    "Without a GPU, run the DeepSpeed ZeRO / FSDP config of `accelerate launch` (or --deepspeed / --fsdp) really "
    "sharded over the launched processes (gloo on CPU) instead of accelerate's silent DDP fallback. "
    "See hfoptim.integrations.transformers.sharding."
)


class DeepSpeedOptimizerConflict(ValueError):
    """A DeepSpeed config with an ``optimizer`` section together with an hfoptim optimizer."""


def deepspeed_conflict_message(name: str, source: str) -> str:
    return (
        f"optim={name!r} is an hfoptim optimizer, but the DeepSpeed config ({source}) has an 'optimizer' "
        f"section: DeepSpeed would build its own optimizer and {name!r} would be silently unused. Remove the "
        f"'optimizer' section to train with {name!r}, or choose a transformers built-in optim to use DeepSpeed's."
    )


def _deepspeed_config(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        if value.lstrip().startswith("{"):
            return json.loads(value)
        if os.path.isfile(value):
            with open(value, encoding="utf-8") as f:
                return json.load(f)
    return None


def check_deepspeed_config(config: Any, name: str, source: str) -> None:
    """Refuse a DeepSpeed config that has an ``optimizer`` section next to an hfoptim optimizer."""
    loaded = _deepspeed_config(config)
    if loaded is not None and "optimizer" in loaded:
        raise DeepSpeedOptimizerConflict(deepspeed_conflict_message(name, source))


def normalize_optim(optim: Any, optim_args: Any, deepspeed: Any = None) -> tuple[OptimChoice, Any]:
    """Resolve ``optim`` and check ``optim_args`` for it; returns the choice and the ``optim_args``
    value to store (the canonical string for hfoptim names, unchanged for built-ins)."""
    choice = resolve_optim(optim)
    if not choice.is_hfoptim:
        return choice, optim_args
    where = f"optim={choice.name!r}, optim_args"
    parsed = parse_optim_args(optim_args)
    options, overrides = split_optim_args(parsed)
    check_plan(choice.spec, options, overrides, where)
    if deepspeed is not None:
        check_deepspeed_config(deepspeed, choice.name, "TrainingArguments.deepspeed")
    return choice, (format_optim_args(parsed) or None)


def _with_configured_state(accelerator_config: Any) -> Any:
    """``accelerator_config`` with ``use_configured_state=True`` (the state :func:`setup_cpu_sharding` made)."""
    if accelerator_config is None:
        return {"use_configured_state": True}
    if isinstance(accelerator_config, str):
        with open(accelerator_config, encoding="utf-8") as f:
            accelerator_config = json.load(f)
    if isinstance(accelerator_config, dict):
        return {**accelerator_config, "use_configured_state": True}
    accelerator_config.use_configured_state = True  # an AcceleratorConfig
    return accelerator_config


@dataclass
class HFOptimTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with hfoptim optimizers by name and typed ``optim_args``.

    ``optim`` accepts every hfoptim name and every transformers built-in (the built-ins behave
    exactly as in transformers; where both use a name it is hfoptim's, and the built-in is
    ``"transformers:<name>"``). ``cpu_sharding`` (default True): on a machine without a GPU, a
    DeepSpeed / FSDP config runs really sharded over the launched CPU processes
    (:mod:`hfoptim.integrations.transformers.sharding`). ``optim_args`` for an hfoptim name is a
    string (or a dict, stored as the canonical string) of typed options: see
    :mod:`hfoptim.integrations.transformers.optim_args` and
    :mod:`hfoptim.integrations.transformers.plan` for what the Trainer builds from them.
    """

    optim: str = field(default=TrainingArguments.default_optim, metadata={"help": OPTIM_HELP})
    optim_args: str | None = field(default=None, metadata={"help": OPTIM_ARGS_HELP})
    cpu_sharding: bool = field(default=True, metadata={"help": CPU_SHARDING_HELP})

    def __post_init__(self):
        choice, optim_args = normalize_optim(self.optim, self.optim_args, self.deepspeed)
        self.optim_args = optim_args
        if self.cpu_sharding and setup_cpu_sharding(self) is not None:
            # the configured gloo state is on CPU; use_cpu=True would make accelerate drop the plugin
            self.use_cpu = False
            self.accelerator_config = _with_configured_state(self.accelerator_config)
        # the base class checks optim against transformers' closed enum: show it a built-in, then
        # store the real choice
        self.optim = choice.builtin if not choice.is_hfoptim else TrainingArguments.default_optim
        try:
            super().__post_init__()
        finally:
            self.optim = choice.stored

    @property
    def optim_choice(self) -> OptimChoice:
        """What ``optim`` names (``.is_hfoptim``, ``.spec``, ``.builtin``)."""
        return resolve_optim(self.optim)

    @property
    def hfoptim_options(self) -> tuple[dict, list[Override]]:
        """Parsed ``optim_args`` of an hfoptim name: plain options and per-parameter overrides."""
        if not self.optim_choice.is_hfoptim:
            raise ValueError(f"optim={self.optim!r} is a transformers built-in; its optim_args are transformers'")
        return split_optim_args(parse_optim_args(self.optim_args))

    def set_optimizer(
        self,
        name: str = "adamw_torch",
        learning_rate: float = 5e-5,
        weight_decay: float = 0,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        args: str | dict | None = None,
    ):
        """As ``TrainingArguments.set_optimizer``, also for hfoptim names (``args``: typed optim_args)."""
        choice, optim_args = normalize_optim(name, args, self.deepspeed)
        self.optim = choice.stored
        self.optim_args = optim_args
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.adam_beta1 = beta1
        self.adam_beta2 = beta2
        self.adam_epsilon = epsilon
        return self
