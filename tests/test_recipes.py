"""The recipes run end to end on the embedded default and leave what they promise in --output_dir.

Single-process runs call each recipe's ``main(argv)`` in this process (the same code path as the
command line, parsed by ``HfArgumentParser``); the multi-process CPU run goes through
``accelerate launch --config_file accelerate_configs/multi_cpu.yaml`` (slow).
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import launch

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
#: a small slice of the standard library keeps the tokenizer training and tokenizing fast
SMALL = ["--embedded_max_bytes", "300000"]
COMMON = [
    *SMALL,
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--max_eval_samples",
    "16",
    "--report_to",
    "none",
    "--save_strategy",
    "steps",
    "--save_steps",
    "3",
    "--logging_steps",
    "1",
    "--seed",
    "0",
    "--use_cpu",
    "--dataloader_num_workers",
    "0",
]


def recipe(name: str):
    sys.path.insert(0, str(RECIPES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(RECIPES))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def check_outputs(out: Path, metrics: dict, weights: str = "model.safetensors") -> dict:
    assert (out / weights).exists(), sorted(p.name for p in out.iterdir())
    assert (out / "tokenizer.json").exists()
    assert (out / "trainer_state.json").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints, "a checkpoint was saved during training"
    assert (checkpoints[-1] / "optimizer.pt").exists()
    results = read(out / "all_results.json")
    assert read(out / "eval_results.json")["eval_loss"] == pytest.approx(results["eval_loss"])
    assert math.isfinite(results["eval_loss"]) and results["eval_loss"] > 0
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
    assert results["optimizer_state_bytes"] > 0
    assert results["eval_loss"] == pytest.approx(metrics["eval_loss"])
    return results


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A few pretraining steps with AdamW (hfoptim): the SFT tests start from this checkpoint."""
    out = tmp_path_factory.mktemp("pretrain")
    metrics = recipe("pretrain_clm").main(
        [
            "--output_dir",
            str(out),
            "--max_steps",
            "6",
            "--learning_rate",
            "3e-3",
            "--optim",
            "adamw",
            "--block_size",
            "64",
            *COMMON,
        ]
    )
    metrics["_out"] = str(out)
    (out / "_test_metrics.json").write_text(json.dumps(metrics, default=str))
    return out


def test_pretrain_writes_checkpoint_metrics_and_evaluates(pretrained):
    metrics = read(pretrained / "_test_metrics.json")
    results = check_outputs(pretrained, metrics)
    assert results["optim"] == "adamw"
    # AdamW keeps two fp32 moments per parameter (+ a 4-byte step counter per tensor)
    assert 8.0 <= results["optimizer_state_bytes_per_param"] < 8.01
    assert results["world_size"] == 1
    assert read(pretrained / "trainer_state.json")["global_step"] == 6
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pretrained)
    assert model.num_parameters() == results["num_params"]


def test_pretrain_evaluation_matches_a_hand_computed_loss(pretrained):
    """eval_loss is the mean next-token cross-entropy over the validation blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfoptim.app.corpus import BlockDataset, corpus_token_ids, stdlib_corpus

    model = AutoModelForCausalLM.from_pretrained(pretrained).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    corpus = stdlib_corpus(300000)
    blocks = BlockDataset(corpus_token_ids(tokenizer, "validation", corpus), 64, 16).blocks
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert read(pretrained / "eval_results.json")["eval_loss"] == pytest.approx(loss.item(), rel=1e-4)


def test_continued_pretraining_from_local_files_with_another_optimizer(pretrained, tmp_path):
    """--model_name_or_path (local folder) + --train_file (a folder of text files), a new name."""
    data = tmp_path / "data"
    data.mkdir()
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        (data / (name + ".txt")).write_text((stdlib / name).read_text())
    out = tmp_path / "cpt"
    optim = "adan" if "adan" in __import__("hfoptim").list_optimizers() else "adamw_factored"
    metrics = recipe("pretrain_clm").main(
        [
            "--model_name_or_path",
            str(pretrained),
            "--train_file",
            str(data),
            "--validation_split_percentage",
            "25",
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--optim",
            optim,
            "--block_size",
            "64",
            *COMMON,
        ]
    )
    results = check_outputs(out, metrics)
    assert results["optim"] == optim


def test_sft_lora_trains_only_adapters(pretrained, tmp_path):
    out = tmp_path / "sft"
    metrics = recipe("sft_lora").main(
        [
            "--model_name_or_path",
            str(pretrained),
            "--output_dir",
            str(out),
            "--max_steps",
            "4",
            "--learning_rate",
            "1e-3",
            "--optim",
            "adamw",
            "--lora_r",
            "4",
            "--max_seq_length",
            "96",
            "--max_train_samples",
            "64",
            "--merge_lora",
            *COMMON,
        ]
    )
    results = check_outputs(out, metrics, weights="adapter_model.safetensors")
    assert results["mode"] == "lora"
    assert (out / "adapter_config.json").exists()
    assert (out / "merged" / "model.safetensors").exists()
    # optimizer state only for the adapters: 8 bytes per trainable parameter, not per model parameter
    assert results["optimizer_state_bytes"] < 8.1 * results["trainable_params"]
    assert results["trainable_params"] < 0.2 * read(pretrained / "_test_metrics.json")["num_params"]


def test_sft_full_finetune(pretrained, tmp_path):
    out = tmp_path / "full"
    metrics = recipe("sft_lora").main(
        [
            "--model_name_or_path",
            str(pretrained),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--full_finetune",
            "--optim",
            "adamw",
            "--max_seq_length",
            "96",
            "--max_train_samples",
            "32",
            *COMMON,
        ]
    )
    results = check_outputs(out, metrics)
    assert results["mode"] == "full"
    assert results["trainable_params"] == read(pretrained / "_test_metrics.json")["num_params"]


def test_sft_dataset_masks_the_prompt():
    sft_lora = recipe("sft_lora")
    from hfoptim.app.corpus import embedded_tokenizer

    tokenizer = embedded_tokenizer(max_bytes=300000)
    args = sft_lora.SFTArguments(max_seq_length=64)
    ds = sft_lora.SFTDataset(
        [{"prompt": "add two numbers", "response": "def add(a, b):\n    return a + b"}], tokenizer, args
    )
    item = ds[0]
    prompt_len = len(tokenizer(args.prompt_template.format(prompt="add two numbers"))["input_ids"])
    assert item["labels"][:prompt_len] == [sft_lora.IGNORE] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    batch = sft_lora.PadCollator(tokenizer.pad_token_id)([item, {"input_ids": [5, 6], "labels": [5, 6]}])
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(item["input_ids"]) - 2)
    assert (batch["labels"][1, 2:] == sft_lora.IGNORE).all()


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises((ValueError, SystemExit)) as info:
        recipe("pretrain_clm").main(["--output_dir", str(tmp_path), "--optim", "no_such_optimizer", *SMALL])
    assert "no_such_optimizer" in str(info.value) or info.type is SystemExit
    with pytest.raises(ValueError, match="max_position_embeddings"):
        recipe("pretrain_clm").main(
            ["--output_dir", str(tmp_path), "--block_size", "4096", "--max_steps", "1", "--report_to", "none", *SMALL]
        )


@pytest.mark.slow
@pytest.mark.parametrize("script", ["pretrain_clm.py", "sft_lora.py"])
def test_two_cpu_processes_with_accelerate_launch(tmp_path, script):
    """accelerate launch --config_file accelerate_configs/multi_cpu.yaml: 2 gloo processes on CPU
    form one data-parallel run (world size 2), not two independent ones."""
    out = tmp_path / "cpu2"
    extra = ["--block_size", "64"] if script == "pretrain_clm.py" else ["--max_seq_length", "96", "--lora_r", "4"]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs/multi_cpu.yaml"),
        str(RECIPES / script),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--optim",
        "adamw",
        *extra,
        *[a for a in COMMON if a != "--use_cpu"],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = launch(cmd, timeout=600, env=env, fresh=out)  # retried once on gloo's teardown abort
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = read(out / "all_results.json")
    assert results["world_size"] == 2
    assert math.isfinite(results["eval_loss"])
    assert (out / ("model.safetensors" if script == "pretrain_clm.py" else "adapter_model.safetensors")).exists()


#: what each sharded command of the README must engage (the line HFOptimTrainer logs at the first step)
README_SHARDED = {
    "deepspeed_zero2.yaml": "hfoptim: sharding engaged: DeepSpeed ZeRO-2 over 2 processes "
    "(DeepSpeedZeroOptimizer wraps Adan)",
    "deepspeed_zero3.yaml": "hfoptim: sharding engaged: DeepSpeed ZeRO-3 over 2 processes "
    "(DeepSpeedZeroOptimizer_Stage3 wraps Adan)",
    "fsdp2.yaml": "hfoptim: sharding engaged: FSDP2 over 2 processes (DTensor parameters)",
}
#: appended to the README's commands: a smaller corpus and 2 steps (later flags win in argparse)
README_FAST = ["--max_steps", "2", "--embedded_max_bytes", "300000", "--block_size", "64", "--max_eval_samples", "16"]
README_FAST += ["--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0"]


def readme_sharded_commands() -> dict[str, str]:
    """The README's ``accelerate launch`` lines with a DeepSpeed or FSDP2 config, by config file."""
    out = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        found = re.search(r"accelerate launch --config_file accelerate_configs/(\S+)", line)
        if found and found.group(1) in README_SHARDED:
            out[found.group(1)] = line.strip()
    return out


def test_the_readme_has_every_sharded_command():
    commands = readme_sharded_commands()
    assert set(commands) == set(README_SHARDED)
    for config, line in commands.items():
        assert "--num_processes 2" in line and ("DS_ACCELERATOR=cpu" in line) == config.startswith("deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(README_SHARDED))
def test_readme_sharded_command_really_shards(tmp_path, config):
    """The README's command, as written (environment, launcher, config, script, flags), with
    its output folder in tmp_path and a shorter run: it exits 0 and the log says the requested
    sharding was engaged over the 2 processes."""
    words = shlex.split(readme_sharded_commands()[config])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    while "=" in words[0]:  # leading VAR=value assignments
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:2] == ["accelerate", "launch"]
    out = tmp_path / "out"
    words[words.index("--output_dir") + 1] = str(out)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *words[2:], *README_FAST]
    proc = launch(cmd, timeout=900, env=env, fresh=out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count(README_SHARDED[config]) == 1, log[-4000:]  # logged once, by the main process
    results = read(out / "all_results.json")
    assert results["world_size"] == 2 and math.isfinite(results["eval_loss"])
    assert results["optim"] == "adan_8bit"
    # all processes together, per parameter element: adan_8bit's 7.05 on large tensors, a little
    # more with the small tensors kept in fp32 -- the same whatever the sharding
    assert 7.0 < results["optimizer_state_bytes_per_param"] < 7.3


@pytest.mark.slow
def test_sharding_not_engaged_stops_at_the_first_step(tmp_path):
    """The README's ZeRO-2 command with the CPU set-up switched off: accelerate joins no processes
    (DeepSpeed alone would see them), and building the Trainer stops with ShardingNotEngaged
    naming the config and the cause, before DeepSpeed fails on a batch size it cannot explain."""
    words = shlex.split(readme_sharded_commands()["deepspeed_zero2.yaml"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), words.pop(0).split("=")[0]: "cpu"}
    out = tmp_path / "out"
    words[words.index("--output_dir") + 1] = str(out)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *words[2:], *README_FAST, "--cpu_sharding", "false"]
    proc = launch(cmd, timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ShardingNotEngaged: the accelerate config's deepspeed_config (ACCELERATE_USE_DEEPSPEED) asks for " in log
    assert "DeepSpeed ZeRO-2, but the Trainer runs" in log and "accelerate joined 1 of the 2 launched processes" in log
    assert "HFOptimTrainingArguments(cpu_sharding=True)" in log and "Check batch related parameters" not in log
    assert "sharding engaged" not in log


def test_demo_runs_end_to_end(tmp_path):
    """python -m hfoptim.app.demo, shortened: every run trains, the table's numbers (each run's
    wall time among them), the plot and the saved models are written."""
    from hfoptim.app import demo

    optims = demo.default_optimizers()
    assert optims == ["adamw_8bit", "ademamix_8bit"]
    argv = [
        "--steps",
        "2",
        "--eval-every",
        "1",
        "--eval-blocks",
        "4",
        "--batch-size",
        "4",
        "--max-bytes",
        "300000",
        "--no-scale",
        "--output-dir",
        str(tmp_path),
    ]
    assert demo.main(argv) == 0
    record = read(tmp_path / "results.json")
    runs = {r["optim"]: r for r in record["runs"]}
    assert set(runs) == {demo.TORCH_ADAMW, *optims}
    assert runs[demo.TORCH_ADAMW]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    for optim in optims:
        assert runs[optim]["state_bytes"] < runs[demo.TORCH_ADAMW]["state_bytes"]
    for r in runs.values():
        assert len(r["train_loss"]) == 2 and r["eval_steps"] == [1, 2]
        assert r["run_seconds"] >= sum(r["step_seconds"]) > 0  # the loop: its steps and evaluations
        assert math.isfinite(r["final_eval_loss"])
        assert (Path(r["saved_to"]) / "model.safetensors").exists()
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000


def test_embedded_corpus_is_deterministic_capped_and_split_by_file():
    from hfoptim.app.corpus import _is_validation, function_examples, stdlib_corpus

    a, b = stdlib_corpus(300000), stdlib_corpus(300000)
    assert a == b and a.fingerprint == b.fingerprint
    assert not set(a.train_files) & set(a.validation_files)
    size = sum((a.root / f).stat().st_size for f in a.train_files + a.validation_files)
    assert size <= 300000
    assert all(_is_validation(f) for f in a.validation_files)
    big = stdlib_corpus()
    assert len(big.train_files) > len(a.train_files)
    pairs = function_examples(a, "validation")
    assert pairs and all(p["response"].startswith("def ") for p in pairs)
    for pair in pairs:  # the docstring is in the prompt, not in the code to write
        (function,) = ast.parse(pair["response"]).body
        assert ast.get_docstring(function) is None and function.name in pair["prompt"]
