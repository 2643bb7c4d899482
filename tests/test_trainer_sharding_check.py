"""What a run asks for (``requested_sharding``) and the first-step check that it is engaged
(``check_sharding``), in one process. The engaged cases run for real, 2 processes each, in
tests/test_trainer_sharded.py and tests/test_recipes.py (the README's sharded commands)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hfoptim import HFOptimTrainingArguments
from hfoptim.integrations.transformers.sharding import (
    Sharding,
    ShardingNotEngaged,
    check_accelerator,
    check_sharding,
    cpu_sharding_applies,
    requested_sharding,
)

LAUNCH_VARS = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_USE_FSDP",
    "FSDP_VERSION",
    "WORLD_SIZE",
)


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_requested_from_the_accelerate_launch_environment(env, tmp_path):
    assert requested_sharding() is None
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    got = requested_sharding()
    assert (got.kind, got.zero_stage, got.describe()) == ("deepspeed", 3, "DeepSpeed ZeRO-3")
    assert "ACCELERATE_USE_DEEPSPEED" in got.source

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    got = requested_sharding()
    assert got.zero_stage == 1 and str(config) in got.source

    env.delenv("ACCELERATE_USE_DEEPSPEED")
    env.setenv("ACCELERATE_USE_FSDP", "true")
    env.setenv("FSDP_VERSION", "2")
    got = requested_sharding()
    assert (got.kind, got.fsdp_version, got.describe()) == ("fsdp", 2, "FSDP2")


def test_requested_from_training_arguments_wins(env):
    env.setenv("ACCELERATE_USE_FSDP", "true")
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, fsdp=None)
    got = requested_sharding(args)
    assert (got.kind, got.zero_stage, got.source) == ("deepspeed", 2, "TrainingArguments.deepspeed")
    args = SimpleNamespace(deepspeed=None, fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    assert requested_sharding(args) == Sharding("fsdp", "TrainingArguments.fsdp", fsdp_version=2)


def test_cpu_sharding_only_for_several_processes(env):
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_sharding_applies() is None  # one process: nothing to set up
    env.setenv("WORLD_SIZE", "2")
    assert cpu_sharding_applies() == (None if torch.cuda.is_available() else requested_sharding())


def test_single_process_arguments_are_left_alone(env, tmp_path):
    args = HFOptimTrainingArguments(str(tmp_path), optim="adamw", use_cpu=True, report_to=[])
    assert args.cpu_sharding and args.use_cpu and not args.accelerator_config.use_configured_state


def _accelerator(distributed_type="DistributedType.MULTI_CPU", num_processes=2, fsdp_plugin=None, ds_plugin=None):
    state = SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=ds_plugin)
    return SimpleNamespace(distributed_type=distributed_type, num_processes=num_processes, state=state)


def test_nothing_requested_nothing_checked():
    assert check_sharding(None, _accelerator(), torch.nn.Linear(2, 2), None) is None


def test_independent_copies_are_refused(env):
    env.setenv("WORLD_SIZE", "2")
    requested = Sharding("fsdp", "the accelerate config's fsdp_config (ACCELERATE_USE_FSDP)", fsdp_version=2)
    with pytest.raises(ShardingNotEngaged) as info:
        check_sharding(requested, _accelerator("DistributedType.NO", 1), torch.nn.Linear(2, 2), None)
    message = str(info.value)
    assert "ACCELERATE_USE_FSDP" in message and "asks for FSDP2" in message
    assert "accelerate joined 1 of the 2 launched processes" in message
    with pytest.raises(ShardingNotEngaged, match="joined 1 of the 2"):  # already when the Trainer is built
        check_accelerator(requested, _accelerator("DistributedType.NO", 1))


def test_ddp_under_a_deepspeed_config_is_refused(env):
    env.setenv("WORLD_SIZE", "2")
    requested = Sharding("deepspeed", "the accelerate config's deepspeed_config", zero_stage=2)
    with pytest.raises(ShardingNotEngaged, match="asks for DeepSpeed ZeRO-2.*set up no DeepSpeed plugin"):
        check_accelerator(requested, _accelerator())
    accelerator = _accelerator(ds_plugin=SimpleNamespace())
    check_accelerator(requested, accelerator)
    with pytest.raises(ShardingNotEngaged, match="asks for DeepSpeed ZeRO-2.*not wrapped in a DeepSpeed engine"):
        check_sharding(requested, accelerator, torch.nn.Linear(2, 2), None)


def test_fsdp_without_dtensor_parameters_is_refused(env):
    env.setenv("WORLD_SIZE", "2")
    requested = Sharding("fsdp", "TrainingArguments.fsdp", fsdp_version=1)
    with pytest.raises(ShardingNotEngaged, match="no FSDP plugin"):
        check_sharding(requested, _accelerator(), torch.nn.Linear(2, 2), None)
    plugin = SimpleNamespace(fsdp_version=1)
    with pytest.raises(ShardingNotEngaged, match="not wrapped in FullyShardedDataParallel"):
        check_sharding(requested, _accelerator(fsdp_plugin=plugin), torch.nn.Linear(2, 2), None)
    requested = Sharding("fsdp", "TrainingArguments.fsdp", fsdp_version=2)
    plugin = SimpleNamespace(fsdp_version=2)
    with pytest.raises(ShardingNotEngaged, match=r"trainable parameters of type \['Parameter'\]"):
        check_sharding(requested, _accelerator(fsdp_plugin=plugin), torch.nn.Linear(2, 2), None)
