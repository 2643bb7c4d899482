"""Every accelerate config loads with accelerate's own classes and says what its name promises.

Each file goes through the same path as ``accelerate launch --config_file``: it is loaded by
``load_config_from_file`` (``ClusterConfig``: unknown top-level keys are refused there), merged into
the launch arguments by ``_validate_launch_command`` and, for DeepSpeed and FSDP, turned into the
environment the launcher hands to the training processes, from which accelerate's
``DeepSpeedPlugin`` / ``FullyShardedDataParallelPlugin`` are built and checked. Nested keys that
``accelerate launch`` has no option for would be dropped silently by accelerate; they are refused
here. GPU-only configs are validated, not run (the multi-process CPU one runs in test_recipes).
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml

pytest.importorskip("accelerate")

from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file  # noqa: E402
from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"
EXPECTED = {
    "single_device.yaml",
    "multi_gpu_ddp.yaml",
    "deepspeed_zero1.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
    "fsdp2.yaml",
    "multi_node.yaml",
    "multi_cpu.yaml",
}


def launch_args(path: Path):
    """The arguments ``accelerate launch --config_file path script.py`` would run with."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    return parser, args, defaults


def test_every_config_is_present():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_with_accelerate_and_launch_knows_every_key(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(path)).distributed_type == config.distributed_type
    raw = yaml.safe_load(path.read_text())
    parser, args, _ = launch_args(path)
    known = {a.dest for a in parser._actions}
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section, {}) or {}:
            dest = key if section == "deepspeed_config" or key.startswith("fsdp") else "fsdp_" + key
            assert dest in known, f"{name}: {section}.{key} is not an accelerate launch option (silently ignored)"
    assert args.num_processes >= 1


def _plugin_env(args) -> dict[str, str]:
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""
        _, env = prepare_deepspeed_cmd_env(args)
        return env
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs(stage):
    from accelerate.utils import DeepSpeedPlugin

    path = CONFIGS / f"deepspeed_zero{stage}.yaml"
    raw = yaml.safe_load(path.read_text())["deepspeed_config"]
    assert "gradient_clipping" in raw, "DeepSpeed clips at 1.0 when a config has no gradient_clipping"
    assert isinstance(raw["gradient_clipping"], float) and raw["gradient_clipping"] > 0
    assert "optimizer" not in raw and "gradient_accumulation_steps" not in raw

    _, args, defaults = launch_args(path)
    assert defaults.distributed_type == DistributedType.DEEPSPEED
    assert args.use_deepspeed and args.zero_stage == stage
    # precision follows the Trainer's --bf16: bf16 here without --bf16 makes the Trainer refuse the config
    assert defaults.mixed_precision == "no"
    env = _plugin_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_clipping"] == raw["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert "optimizer" not in ds
    assert plugin.zero3_init_flag is (stage == 3)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fsdp2_config():
    from accelerate.utils import FullyShardedDataParallelPlugin

    _, args, defaults = launch_args(CONFIGS / "fsdp2.yaml")
    assert defaults.distributed_type == DistributedType.FSDP and args.use_fsdp
    assert defaults.mixed_precision == "no"  # precision follows the Trainer's --bf16
    env = _plugin_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_offload is not None and not getattr(plugin.cpu_offload, "offload_params", False)


def test_ddp_multi_node_and_single_device():
    _, args, defaults = launch_args(CONFIGS / "multi_gpu_ddp.yaml")
    assert defaults.distributed_type == DistributedType.MULTI_GPU and args.multi_gpu
    assert defaults.mixed_precision == "bf16"

    _, args, defaults = launch_args(CONFIGS / "multi_node.yaml")
    assert defaults.distributed_type == DistributedType.MULTI_GPU
    assert defaults.num_machines == 2 and defaults.num_processes % defaults.num_machines == 0
    assert defaults.main_process_ip and defaults.main_process_port
    env = _plugin_env(args)
    assert args.nnodes == "2" and args.nproc_per_node == str(defaults.num_processes // 2)
    assert env is not None

    _, args, defaults = launch_args(CONFIGS / "single_device.yaml")
    assert defaults.distributed_type == DistributedType.NO and defaults.num_processes == 1
    assert not (args.multi_gpu or args.use_deepspeed or args.use_fsdp)


def test_multi_cpu_config_launches_two_torchrun_processes():
    """accelerate's MULTI_CPU type goes through mpirun; this config uses the torchrun launcher
    with 2 processes, which the recipes join into one gloo group on CPU."""
    _, args, defaults = launch_args(CONFIGS / "multi_cpu.yaml")
    assert defaults.num_processes == 2 and defaults.num_machines == 1
    assert defaults.use_cpu and defaults.mixed_precision == "no"
    assert args.multi_gpu, "the torchrun (multi_gpu) launcher is the one that starts several processes"
    _plugin_env(args)
    assert args.nproc_per_node == "2"
