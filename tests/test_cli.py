"""The ``hfoptim`` command: help, list, memory (estimate vs a real step, AdamW's known bytes,
DeepSpeed's own accounting) and its tables."""

from __future__ import annotations

import json
import math

import pytest
import torch

import hfoptim
from hfoptim import cli, footprint, memory
from hfoptim.models import LLAMA_2_7B, TINY_LLAMA, model_from_config, tiny_llama_config


def run(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def run_json(capsys, *argv) -> dict:
    return json.loads(run(capsys, *argv, "--json"))


def memory_efficient_name() -> str:
    names = set(hfoptim.list_optimizers())
    return next(n for n in ("ademamix_8bit", "adamw_8bit", "adamw_factored") if n in names)


# ---------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["memory", "--help"]])
def test_help_reads_well(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: hfoptim" in text
    assert "examples:" in text or argv == ["--help"] and "memory" in text
    if argv == ["--help"]:  # the benchmark runner moved to the application: the help says where
        assert "python -m hfoptim.app.bench" in text and "\n    bench " not in text


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- list
def test_list_every_name_with_state_bytes(capsys):
    records = run_json(capsys, "list")
    assert [r["name"] for r in records] == hfoptim.list_optimizers()
    by_name = {r["name"]: r for r in records}
    # AdamW: two fp32 moments; AdEMAMix: three (the slow EMA); Adan: four (m, n, diff, prev grad)
    step_counter = 4 / 4096**2
    assert by_name["adamw"]["state_bytes_per_param"] == pytest.approx(8 + step_counter)
    if "ademamix" in by_name:
        assert by_name["ademamix"]["state_bytes_per_param"] == pytest.approx(12 + step_counter)
    if "adamw_factored" in by_name:  # m dense, v as one row and one column
        assert by_name["adamw_factored"]["state_bytes_per_param"] == pytest.approx(4 + 8 / 4096 + step_counter)
    assert all(r["sharding"] for r in records)


def test_list_plain_text_when_piped(capsys):
    out = run(capsys, "list", "adamw*", "--shape", "1024x1024")
    lines = out.splitlines()
    assert lines[0].startswith("hfoptim optimizers")
    assert "state B/param" in lines[1] and set(lines[2]) <= {"-", " "}
    adamw = next(line for line in lines if line.split()[:1] == ["adamw"])
    assert adamw.split()[2] == "8.000"
    assert "\x1b[" not in out  # no terminal escapes in a pipe


def test_list_unknown_pattern(capsys):
    assert cli.main(["list", "zzz*"]) == 1


# ---------------------------------------------------------------------------------------- memory
def test_memory_adamw_is_8_bytes_per_param_and_strategies_divide_it(capsys):
    ddp = run_json(capsys, "memory", TINY_LLAMA, "--optim", "adamw")
    p = ddp["trainable_params"]
    model = model_from_config(tiny_llama_config(), device="meta")
    assert p == sum(t.numel() for t in model.parameters())
    tensors = len(list(model.parameters()))
    a = ddp["per_device"]["adamw"]
    assert a["state"] == 8 * p + 4 * tensors  # exp_avg + exp_avg_sq fp32, and a 4-byte step per tensor
    assert a["params"] == a["grads"] == 4 * p and a["master"] == a["grad_partition"] == 0

    n = 4
    fsdp = run_json(capsys, "memory", TINY_LLAMA, "--optim", "adamw", "--fsdp", "--world-size", str(n))
    f = fsdp["per_device"]["adamw"]
    assert f["state"] == math.ceil(a["state"] / n) and f["params"] == f["grads"] == math.ceil(4 * p / n)
    assert f["master"] == 0

    z3 = run_json(
        capsys,
        "memory",
        TINY_LLAMA,
        "--optim",
        "adamw",
        "--zero",
        "3",
        "--world-size",
        str(n),
        "--mixed-precision",
        "bf16",
    )
    z = z3["per_device"]["adamw"]
    # DeepSpeed's count: bf16 weights and gradients, fp32 master + two fp32 moments = 12 B/param, all sharded
    assert z["params"] == z["grads"] == math.ceil(2 * p / n)
    assert (z["master"] + z["state"]) * n == pytest.approx(12 * p, rel=1e-3)


def test_memory_zero2_matches_deepspeeds_own_estimator(capsys):
    """Mixed-precision AdamW under ZeRO-2: DeepSpeed estimates 2P + 18P/N bytes per GPU."""
    stage_1_and_2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    capsys.readouterr()  # deepspeed's import-time log lines
    for n in (1, 8):
        out = run_json(
            capsys,
            "memory",
            TINY_LLAMA,
            "--optim",
            "adamw",
            "--zero",
            "2",
            "--world-size",
            str(n),
            "--mixed-precision",
            "bf16",
        )
        p = out["trainable_params"]
        _, gpu = stage_1_and_2.estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=False)
        ours = out["per_device"]["adamw"]["total"]
        assert ours == pytest.approx(gpu, rel=2e-4), (ours, gpu)  # the difference: 4-byte step counters


def test_memory_zero3_against_deepspeeds_own_estimator(capsys):
    """Mixed-precision AdamW under ZeRO-3: DeepSpeed estimates 18P/N + 4 x the largest layer per
    GPU; the table counts the same largest layer and 2 bytes/param/N more (the 16-bit parameter
    partition, which that estimator leaves out), and its output says so with DeepSpeed's number."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    capsys.readouterr()
    model = model_from_config(tiny_llama_config(), device="meta")
    _, largest = stage3.model_to_params(model)
    for n in (1, 8):
        argv = ["memory", TINY_LLAMA, "--optim", "adamw", "--zero", "3", "--world-size", str(n)]
        out = run_json(capsys, *argv, "--mixed-precision", "bf16")
        p = out["trainable_params"]
        _, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(
            p, largest, num_gpus_per_node=n, cpu_offload=False, cpu_offload_params=False
        )
        ours = out["per_device"]["adamw"]
        assert ours["gathered"] == 4 * largest
        assert ours["params"] == math.ceil(2 * p / n)
        assert ours["total"] - ours["params"] == pytest.approx(gpu, rel=2e-4)  # the difference: step counters
        table = run(capsys, *argv, "--mixed-precision", "bf16")
        assert "estimate_zero3_model_states_mem_needs" in table and f"{gpu:,} bytes per device" in table


def test_memory_estimate_matches_a_real_step_within_1_percent(capsys):
    name = memory_efficient_name()
    out = run_json(capsys, "memory", TINY_LLAMA, "--optim", name, "--measure")
    measured = out["measured"]["optimizers"]
    assert set(measured) == {name, "adamw"}
    for m in measured.values():
        assert m["relative_error"] <= 0.01
        assert m["measured_state_bytes"] == pytest.approx(m["estimated_state_bytes"], rel=0.01)
    # the table's estimate (meta device) is the measured state of the same model
    assert out["per_device"][name]["state_total"] == pytest.approx(measured[name]["measured_state_bytes"], rel=0.01)
    adamw = measured["adamw"]
    assert adamw["measured_state_bytes"] / adamw["params"] == pytest.approx(8.0, abs=1e-3)
    assert measured[name]["measured_state_bytes"] < adamw["measured_state_bytes"]


def test_estimate_agrees_with_state_of_a_trained_optimizer():
    """memory.estimate on meta == bytes the optimizer holds after a real step
    (torch.compile off, as ``hfoptim memory --measure`` runs it: compiling costs tens of seconds
    here and the compiled path's state is tested by the state work)."""
    torch.manual_seed(0)
    model = model_from_config(tiny_llama_config(num_hidden_layers=1))
    params = [p for p in model.parameters()]
    for name in ("adamw", memory_efficient_name()):
        opt = hfoptim.create_optimizer(params, name, **cli._measure_options(name, {}))
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert memory.state_bytes(opt).total == memory.estimate(params, name).total


def test_memory_for_a_real_model_config_folder(capsys, tmp_path):
    """A local folder holding a real config (Llama-2-7B's public shapes): built on meta, no weights."""
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_2_7B).save_pretrained(tmp_path)
    name = memory_efficient_name()
    out = run_json(
        capsys,
        "memory",
        str(tmp_path),
        "--optim",
        name,
        "--zero",
        "2",
        "--world-size",
        "8",
        "--mixed-precision",
        "bf16",
    )
    assert out["trainable_params"] == 6_738_415_616  # Llama-2-7B
    adamw = out["per_device"]["adamw"]
    assert adamw["state_bytes_per_param"] == pytest.approx(8.0, abs=1e-6)
    assert out["per_device"][name]["state"] < adamw["state"]
    table = run(capsys, "memory", TINY_LLAMA, "--optim", name, "--fsdp", "--world-size", "8")
    assert "FSDP2" in table and "optimizer state" in table and "per device against adamw" in table


def test_memory_errors_name_the_problem(capsys):
    with pytest.raises(SystemExit, match="unknown optimizer"):
        cli.main(["memory", TINY_LLAMA, "--optim", "adamww"])
    with pytest.raises(SystemExit, match="cannot read a model config"):
        cli.main(["memory", "/no/such/folder", "--optim", "adamw"])
    with pytest.raises(SystemExit):  # --zero and --fsdp exclude each other
        cli.main(["memory", TINY_LLAMA, "--optim", "adamw", "--zero", "2", "--fsdp"])


def test_footprint_rejects_bad_strategy():
    with pytest.raises(ValueError, match="strategy"):
        footprint.footprint("adamw", 10, 80, strategy="zero4")
    with pytest.raises(ValueError, match="world size"):
        footprint.footprint("adamw", 10, 80, world_size=0)


def test_tables_rich_on_a_terminal_plain_otherwise():
    import io

    from hfoptim.console import format_bytes, plain_table, print_table

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, pipe = Terminal(), io.StringIO()
    for stream in (term, pipe):
        print_table(["name", "bytes"], [["adamw", "8.000"]], title="t", stream=stream)
    assert "┃" in term.getvalue() or "│" in term.getvalue()
    assert pipe.getvalue().splitlines()[1:4] == ["name   bytes", "-----  -----", "adamw  8.000"]
    assert plain_table(["a", "b"], [["x", "y"]], align="ll").splitlines()[-1] == "x  y"
    with pytest.raises(ValueError, match="align"):
        plain_table(["a", "b"], [["x", "y"]], align="l")
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"


def test_memory_bad_optim_args_end_in_one_line(capsys):
    """A bad --optim-args value ends with the optimizer's own message, not a traceback."""
    with pytest.raises(SystemExit) as info:
        cli.main(["memory", TINY_LLAMA, "--optim", "adamw", "--optim-args", "betas=(0.9,)"])
    message = str(info.value)
    assert message.startswith("--optim-args: invalid betas=(0.9,): expected 2 numbers") and "\n" not in message
    with pytest.raises(SystemExit, match=r"--optim-args: .*unknown hyperparameter\(s\) 'nosuch'"):
        cli.main(["memory", TINY_LLAMA, "--optim", "adamw", "--optim-args", "nosuch=1"])


def test_memory_mixtral_8x7b_factors_each_expert(capsys, tmp_path):
    """``hfoptim memory`` on a Mixtral-8x7B config (its dimensions; 2 of its 32 layers, to stay
    fast on the meta device): Adafactor's state is each expert's rows and columns, as transformers'
    own Adafactor keeps it (21 GiB before per-expert layouts: a full out*in column per tensor)."""
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=2)
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(tmp_path)
    out = run_json(capsys, "memory", str(tmp_path), "--optim", "adafactor")
    h, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    experts = 2 * e * ((2 * f + h) + (h + f)) * 4  # rows + columns of gate_up (2f, h) and down (h, f)
    state = out["per_device"]["adafactor"]["state"]
    assert experts < state < experts + 3 * 2**20  # plus attention, norms, embeddings: under 3 MiB
