"""Muon's parameter roles: by module type from a model, by name on request, through the Trainer."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hfoptim
from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.integrations.transformers import OptimArgsError
from hfoptim.roles import model_roles, muon_options
from tests.distributed.launch import ROOT, launch
from tests.trainer_setup import TokenData, inner_optimizer, run_args, tiny_llama


def algorithms(optimizer) -> dict[str, str]:
    return {n: g["algorithm"] for g in optimizer.param_groups for n in g["param_names"]}


def test_llama_roles_embeddings_head_norms_take_adamw():
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    roles = model_roles(model)
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "head"
    assert roles["model.norm.weight"] == "norm"
    assert roles["model.layers.0.input_layernorm.weight"] == "norm"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "matrix"
    assert roles["model.layers.1.mlp.down_proj.weight"] == "matrix"
    opt = hfoptim.create_optimizer(model, "muon")
    algo = algorithms(opt)
    assert set(algo) == {n for n, p in model.named_parameters() if p.requires_grad}
    muon = {n for n, a in algo.items() if a == "muon"}
    assert muon == {n for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n}


def test_gpt2_conv1d_is_an_in_out_matrix_and_the_tied_head_an_embedding():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    roles = model_roles(model)
    assert roles["transformer.h.0.attn.c_attn.weight"] == "matrix_in_out"
    assert roles["transformer.h.0.attn.c_attn.bias"] == "bias"
    assert roles["transformer.wte.weight"] == "embedding"  # lm_head.weight is the same tensor (tied)
    assert "lm_head.weight" not in roles
    options = muon_options(model)
    assert options["transformer.h.0.mlp.c_fc.weight"] == {"algorithm": "muon"}
    assert options["transformer.ln_f.weight"] == {"algorithm": "adamw"}
    opt = hfoptim.create_optimizer(model, "muon", update_scale="original")
    w = model.transformer.h[0].mlp.c_fc.weight  # (32, 128) stored (in, out): Linear (128, 32)
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt.step()
    group = next(g for g in opt.param_groups if any(p is w for p in g["params"]))
    assert group["algorithm"] == "muon" and opt.layout_of(w).transposed  # stepped as its (out, in) view
    # the 'original' scale of the (out, in) = (128, 32) matrix: sqrt(128/32) = 2 (not 1)
    step = (before * (1 - group["lr"] * group["weight_decay"]) - w.detach()) / group["lr"]
    rms = float(step.square().mean().sqrt())
    assert 2 * 0.5 / (128**0.5) < rms < 2 * 1.5 / (32**0.5)


def test_names_move_parameters_and_bad_options_are_refused():
    model = tiny_llama()
    opt = hfoptim.create_optimizer(model, "muon", adamw_params=["down_proj"], muon_params="embed_tokens")
    algo = algorithms(opt)
    assert algo["model.layers.0.mlp.down_proj.weight"] == "adamw"
    assert algo["model.embed_tokens.weight"] == "muon"
    assert algo["model.layers.0.mlp.up_proj.weight"] == "muon"
    with pytest.raises(ValueError, match="Muon orthogonalizes matrices only"):
        hfoptim.create_optimizer(model, "muon", muon_params=["norm"])
    with pytest.raises(ValueError, match="choose Muon's parameter roles; 'adamw' has none"):
        hfoptim.create_optimizer(model, "adamw", adamw_params=["lm_head"])
    with pytest.raises(ValueError, match="pass the model"):
        hfoptim.create_optimizer(list(model.parameters()), "muon", adamw_params=["lm_head"])


def test_trainer_builds_muon_by_role_with_optim_args(tmp_path):
    args = HFOptimTrainingArguments(
        **run_args(
            tmp_path,
            optim="muon_8bit",
            optim_args="adamw_params=(down_proj),ns_steps=4,state_min_numel=0,lm_head:state=fp32",
        )
    )
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    trainer.train()
    opt = inner_optimizer(trainer.optimizer)
    algo = algorithms(opt)
    assert algo["model.layers.0.self_attn.k_proj.weight"] == "muon"
    assert algo["model.layers.0.mlp.down_proj.weight"] == "adamw"
    assert algo["model.embed_tokens.weight"] == "adamw" and algo["model.norm.weight"] == "adamw"
    assert all(g["ns_steps"] == 4 for g in opt.param_groups)
    q = trainer.model.model.layers[0].self_attn.q_proj.weight
    assert "momentum_buffer.codes" in opt.state[q] and int(opt.state[q]["step"]) == 3


def test_trainer_refuses_role_options_for_other_rules_and_bad_patterns(tmp_path):
    with pytest.raises(OptimArgsError, match="'adamw' has none"):
        HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw", optim_args="adamw_params=(lm_head)"))
    with pytest.raises(OptimArgsError, match="not a regular expression"):
        HFOptimTrainingArguments(**run_args(tmp_path, optim="muon", optim_args="adamw_params=*x"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "zero2", "zero3"])
def test_trainer_muon_sharded_on_cpu_equals_one_process(tmp_path, mode):
    """HFOptimTrainer, optim="muon_8bit", 2 processes under FSDP2 / ZeRO-2 / ZeRO-3
    (tests/trainer_muon_sharded_worker.py): the roles survive the wrapping (embeddings, head and
    norms AdamW, the 14 projections Muon), every matrix is orthogonalized once per step over both
    processes, and the logged losses equal a one-process run over the same global batches."""
    out = tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "tests" / "trainer_muon_sharded_worker.py"), "--mode", mode, "--out", str(out),
    ]  # fmt: skip
    proc = launch(cmd, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"result.json.rank{r}").read_text()) for r in range(2)]

    model = tiny_llama()
    model.config.tie_word_embeddings = False
    args = HFOptimTrainingArguments(
        **run_args(
            tmp_path / "one",
            optim="muon_8bit",
            optim_args="state_min_numel=0,ns_dtype=fp32",
            per_device_train_batch_size=4,
        )
    )
    one = HFOptimTrainer(model=model, args=args, train_dataset=TokenData())
    one.train()
    want = [e["loss"] for e in one.state.log_history if "loss" in e]
    for r in ranks:
        assert r["layout"] == ("DTensorLayout" if mode == "fsdp2" else "ZeroLayout")
        by_algorithm = {g["algorithm"]: set(g["names"]) for g in r["groups"]}
        assert "model.embed_tokens.weight" in by_algorithm["adamw"] and "lm_head.weight" in by_algorithm["adamw"]
        assert "model.norm.weight" in by_algorithm["adamw"] and len(by_algorithm["muon"]) == 14
        # each matrix once a step: a shard's on one owner (1 summed over the processes), a matrix one
        # process holds whole (ZeRO-2 partitions hold most of them: hfoptim.core.uncut) there alone
        shared = r["runs_over_ranks"] if r["runs_over_ranks"] != [0] else []
        assert all(n == 1 for n in shared) and len(shared) + r["held_runs_over_ranks"] == 14 * 3
        assert r["logged"] == pytest.approx(want, rel=1e-5)
    if mode != "zero2":  # every matrix is split between the two processes: rows crossed
        assert sum(r["bytes_sent"] for r in ranks) > 0
