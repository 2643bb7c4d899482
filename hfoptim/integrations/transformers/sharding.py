"""Sharded Trainer runs that really shard: DeepSpeed ZeRO and FSDP2 on CPU, and a check at the
first step that the sharding a run asks for is the one it got.

What a run asks for (:func:`requested_sharding`) comes from ``TrainingArguments.deepspeed`` /
``fsdp``, else from the environment ``accelerate launch --config_file <config>`` sets for its
processes (``ACCELERATE_USE_DEEPSPEED`` with ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` or
``ACCELERATE_DEEPSPEED_CONFIG_FILE``; ``ACCELERATE_USE_FSDP`` with ``FSDP_VERSION``).

On a machine without a GPU, accelerate does not run such a config sharded: with a DeepSpeed
config the processes run plain DDP (or, without ``ACCELERATE_USE_CPU``, independent copies), and
FSDP is only set up for GPU-like process types. :func:`setup_cpu_sharding` configures accelerate
explicitly instead: one gloo process group over the launched processes (``PartialState(cpu=True)``)
with the distributed type accelerate picks on GPUs (``DEEPSPEED``, with DeepSpeed's CPU
accelerator; ``MULTI_GPU`` for FSDP, the type under which accelerate sets up its FSDP plugin).
The Trainer then runs with ``use_cpu=False`` and ``accelerator_config={"use_configured_state":
True}``. :class:`~hfoptim.HFOptimTrainingArguments` does all of this by itself
(``cpu_sharding=True``, the default), so the recipes and

    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml \\
        --num_processes 2 recipes/pretrain_clm.py --optim adan_8bit --output_dir out/z2 --max_steps 10

really run ZeRO-2 over 2 CPU processes. With a plain ``TrainingArguments``, call
:func:`setup_cpu_sharding` before building them and pass the two settings above.

:func:`check_accelerator` is what ``HFOptimTrainer`` checks when it is built (accelerate joined
every launched process and set up the DeepSpeed / FSDP plugin), :func:`check_sharding` what it
checks at the first training step: the DeepSpeed engine with the requested ZeRO stage, or FSDP2
``DTensor`` parameters. Otherwise they raise :class:`ShardingNotEngaged` naming the config and the
cause. Engaged, the first step logs one line, ``hfoptim: sharding engaged: ...``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FullyShardedDataParallel

logger = logging.getLogger(__name__)

#: the line logged when the requested sharding is engaged (tests and users grep it)
ENGAGED_PREFIX = "hfoptim: sharding engaged:"


class ShardingNotEngaged(RuntimeError):
    """The run asks for DeepSpeed ZeRO or FSDP but the Trainer does not run it."""


@dataclass(frozen=True)
class Sharding:
    """What a run asks for: ``kind`` is ``"deepspeed"`` (with ``zero_stage``) or ``"fsdp"`` (with
    ``fsdp_version``); ``source`` says where it was read."""

    kind: str
    source: str
    zero_stage: int | None = None
    fsdp_version: int | None = None

    def describe(self) -> str:
        if self.kind == "deepspeed":
            stage = "?" if self.zero_stage is None else self.zero_stage
            return f"DeepSpeed ZeRO-{stage}"
        return f"FSDP{self.fsdp_version or 1}"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _load_json(value: Any) -> dict | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        return json.loads(value)
    if isinstance(value, str) and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    return None


def _zero_stage(config: dict | None) -> int | None:
    stage = ((config or {}).get("zero_optimization") or {}).get("stage", 0)
    return int(stage) if isinstance(stage, int | str) and str(stage).isdigit() else None


def requested_sharding(args: Any = None) -> Sharding | None:
    """The sharding ``args`` (a ``TrainingArguments``, optional) or the ``accelerate launch``
    environment asks for, ``None`` for none."""
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        return Sharding("deepspeed", "TrainingArguments.deepspeed", zero_stage=_zero_stage(_load_json(deepspeed)))
    fsdp = getattr(args, "fsdp", None)
    if fsdp:
        config = getattr(args, "fsdp_config", None)
        config = config if isinstance(config, dict) else {}
        version = int(config.get("fsdp_version", config.get("version", 1)))
        return Sharding("fsdp", "TrainingArguments.fsdp", fsdp_version=version)
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if config_file not in ("", "none"):
            stage = _zero_stage(_load_json(config_file))
            source = f"the accelerate config's DeepSpeed config file {config_file}"
        else:
            stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # accelerate's default
            source = "the accelerate config's deepspeed_config (ACCELERATE_USE_DEEPSPEED)"
        return Sharding("deepspeed", source, zero_stage=stage)
    if _flag("ACCELERATE_USE_FSDP"):
        version = int(os.environ.get("FSDP_VERSION", "1"))
        return Sharding("fsdp", "the accelerate config's fsdp_config (ACCELERATE_USE_FSDP)", fsdp_version=version)
    return None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_sharding_applies(args: Any = None) -> Sharding | None:
    """The requested sharding when it needs :func:`setup_cpu_sharding`: several launched processes,
    no CUDA device, and a DeepSpeed or FSDP config."""
    if _world_size() < 2 or torch.cuda.is_available():
        return None
    return requested_sharding(args)


def _use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks its accelerator once; on a machine without GPUs it must be the CPU one."""
    from deepspeed.accelerator import real_accelerator

    chosen = real_accelerator.ds_accelerator
    if chosen is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    name = real_accelerator.get_accelerator().device_name()
    if name != "cpu":
        raise ShardingNotEngaged(
            f"DeepSpeed on CPU needs its CPU accelerator, but it chose {name!r} "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}): launch with DS_ACCELERATOR=cpu"
        )


def setup_cpu_sharding(args: Any = None):
    """Configure accelerate so that the Trainer runs the requested DeepSpeed / FSDP sharding over
    the launched CPU processes (gloo). Returns the :class:`Sharding` configured, or ``None`` when
    there is nothing to do (one process, a GPU present, or no sharding requested).

    Call it before the ``TrainingArguments`` are built, and build them with ``use_cpu=False`` and
    ``accelerator_config={"use_configured_state": True}`` (``HFOptimTrainingArguments`` does all
    of it when ``cpu_sharding=True``).
    """
    sharding = cpu_sharding_applies(args)
    if sharding is None:
        return None
    if sharding.kind == "deepspeed":
        _use_deepspeed_cpu_accelerator()
    # ACCELERATE_USE_CPU makes AcceleratorState drop the DeepSpeed/FSDP plugin (plain DDP)
    os.environ.pop("ACCELERATE_USE_CPU", None)
    state = PartialState(cpu=True)
    state.distributed_type = DistributedType.DEEPSPEED if sharding.kind == "deepspeed" else DistributedType.MULTI_GPU
    logger.info(
        "hfoptim: %s on CPU over %d gloo processes (from %s)", sharding.describe(), state.num_processes, sharding.source
    )
    return sharding


# ---------------------------------------------------------------------------------------- check
def _cause_hint() -> str:
    if not torch.cuda.is_available():
        return (
            " Without a GPU, accelerate runs DeepSpeed/FSDP configs as DDP or as independent processes: build "
            "the arguments with HFOptimTrainingArguments(cpu_sharding=True) (the default), or call "
            "hfoptim.integrations.transformers.setup_cpu_sharding() before TrainingArguments and pass use_cpu=False, "
            'accelerator_config={"use_configured_state": True}.'
        )
    return ""


def _deepspeed_engine(model):
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:  # pragma: no cover - DeepSpeed is installed where it is requested
        return None
    return model if isinstance(model, DeepSpeedEngine) else None


def _trainable_param_types(model) -> set[str]:
    return {type(p).__name__ for p in model.parameters() if p.requires_grad}


def check_accelerator(requested: Sharding | None, accelerator) -> None:
    """What can be checked when the Trainer is built: accelerate joined every launched process
    and set up the DeepSpeed / FSDP plugin. Raises :class:`ShardingNotEngaged` otherwise."""
    if requested is None:
        return
    launched = _world_size()
    running = f"{accelerator.distributed_type} over {accelerator.num_processes} process(es)"
    fail = f"{requested.source} asks for {requested.describe()}, but the Trainer runs {running}:"
    if accelerator.num_processes != launched:
        raise ShardingNotEngaged(
            f"{fail} accelerate joined {accelerator.num_processes} of the {launched} launched processes."
            + _cause_hint()
        )
    plugin = "deepspeed_plugin" if requested.kind == "deepspeed" else "fsdp_plugin"
    if getattr(accelerator.state, plugin, None) is None:
        what = "DeepSpeed" if requested.kind == "deepspeed" else "FSDP"
        raise ShardingNotEngaged(f"{fail} accelerate set up no {what} plugin." + _cause_hint())


def check_sharding(requested: Sharding | None, accelerator, model, optimizer) -> str | None:
    """Raise :class:`ShardingNotEngaged` unless ``requested`` is what runs: the DeepSpeed engine
    with that ZeRO stage, or FSDP2 with ``DTensor`` parameters, over every launched process.
    Returns the line logged when engaged (``None`` when nothing was requested)."""
    if requested is None:
        return None
    check_accelerator(requested, accelerator)
    launched = _world_size()
    running = f"{accelerator.distributed_type} over {accelerator.num_processes} process(es)"
    fail = f"{requested.source} asks for {requested.describe()}, but the Trainer runs {running}:"
    if requested.kind == "deepspeed":
        engine = _deepspeed_engine(model)
        if engine is None:
            raise ShardingNotEngaged(f"{fail} the model is not wrapped in a DeepSpeed engine." + _cause_hint())
        stage = engine.zero_optimization_stage()
        if requested.zero_stage is not None and stage != requested.zero_stage:
            raise ShardingNotEngaged(f"{fail} the DeepSpeed engine runs ZeRO stage {stage}.")
        wrapper = type(getattr(model, "optimizer", None)).__name__
        inner = type(getattr(getattr(model, "optimizer", None), "optimizer", optimizer)).__name__
        line = f"{ENGAGED_PREFIX} DeepSpeed ZeRO-{stage} over {launched} processes ({wrapper} wraps {inner})"
    elif accelerator.state.fsdp_plugin.fsdp_version == 1:  # a built-in optimizer may run under FSDP1
        if not isinstance(model, FullyShardedDataParallel):
            raise ShardingNotEngaged(f"{fail} the model is not wrapped in FullyShardedDataParallel.")
        line = f"{ENGAGED_PREFIX} FSDP1 over {launched} processes (hfoptim optimizers need FSDP2)"
    else:
        types = _trainable_param_types(model)
        if types != {"DTensor"}:
            raise ShardingNotEngaged(
                f"{fail} trainable parameters of type {sorted(types)} (FSDP2 shards them as DTensor)."
            )
        line = f"{ENGAGED_PREFIX} FSDP2 over {launched} processes (DTensor parameters)"
    logger.info(line)
    return line
