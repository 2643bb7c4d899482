"""Real ``Trainer.train()`` runs with hfoptim names: what the Trainer builds, resume, peft, built-ins.

Each run is a few steps of a tiny Llama-style model (hidden 32, 2 layers, vocab 128) on random
tokens, on CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hfoptim
from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.integrations.transformers import OptimArgsError
from tests.trainer_setup import TokenData, inner_optimizer, run_args, tiny_llama


def train(tmp_path, model=None, trainer_kwargs=None, resume=None, **kw) -> HFOptimTrainer:
    args = HFOptimTrainingArguments(**run_args(tmp_path, **kw))
    trainer = HFOptimTrainer(
        model=model or tiny_llama(), args=args, train_dataset=TokenData(), **(trainer_kwargs or {})
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def groups_by_names(optimizer) -> list[tuple[set, dict]]:
    return [
        (set(g["param_names"]), {k: v for k, v in g.items() if k not in ("params", "param_names")})
        for g in optimizer.param_groups
    ]


def test_ademamix_built_from_the_arguments_with_typed_optim_args(tmp_path):
    trainer = train(
        tmp_path,
        optim="ademamix",
        optim_args="alpha=4.0,t_alpha=auto,t_beta3=auto,eps=1e-7",
        weight_decay=0.1,
        adam_beta1=0.85,
        adam_beta2=0.99,
        max_steps=3,
    )
    opt = inner_optimizer(trainer)
    assert type(opt) is hfoptim.AdEMAMix
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    decay = set(trainer.get_decay_parameter_names(trainer.model)) & trainable
    (decay_names, decay_group), (other_names, other_group) = groups_by_names(opt)
    assert decay_names == decay and other_names == trainable - decay
    assert any("norm" in n for n in other_names) and "lm_head.weight" in decay_names
    assert decay_group["weight_decay"] == 0.1 and other_group["weight_decay"] == 0.0
    for group in (decay_group, other_group):
        assert group["initial_lr"] == 1e-3  # learning_rate; the scheduler drives group["lr"]
        assert group["betas"] == (0.85, 0.99, 0.9999)  # Adam's betas from the arguments, beta3 default
        assert group["eps"] == 1e-7 and group["alpha"] == 4.0  # optim_args win over adam_epsilon
        assert group["t_alpha"] == group["t_beta3"] == 3.0  # auto: the run's total steps
    assert all(int(opt.state[p]["step"]) == 3 for g in opt.param_groups for p in g["params"])


def test_optim_args_override_the_arguments(tmp_path):
    optim_args = "lr=2e-3,betas=(0.8,0.95),weight_decay=0.05,nesterov=true"
    args = HFOptimTrainingArguments(
        **run_args(tmp_path, optim="adamw", optim_args=optim_args, learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.7)
    )
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    opt = trainer.create_optimizer()
    assert type(opt) is hfoptim.AdamW
    (_, decay_group), (_, other_group) = groups_by_names(opt)
    assert decay_group["lr"] == 2e-3 and decay_group["betas"] == (0.8, 0.95) and decay_group["nesterov"] is True
    assert decay_group["weight_decay"] == 0.05 and other_group["weight_decay"] == 0.0


def test_adam_arguments_are_not_given_to_rules_that_mean_something_else(tmp_path, caplog):
    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="adan", adam_beta2=0.95))
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    with caplog.at_level(logging.WARNING):
        opt = trainer.create_optimizer()
    assert type(opt) is hfoptim.Adan and opt.param_groups[0]["betas"] == (0.98, 0.92, 0.99)  # Adan's own
    assert "adam_beta2=0.95 not used" in caplog.text


def test_per_parameter_overrides_from_optim_args_and_keyword(tmp_path):
    trainer = train(
        tmp_path,
        optim="adamw_factored",
        optim_args="state_min_numel=0,embeddings:state=fp32,embeddings:weight_decay=0",
        trainer_kwargs={"param_overrides": {r"lm_head": {"weight_decay": 0.0, "lr": 5e-4}}},
        weight_decay=0.1,
        max_steps=2,
    )
    opt = inner_optimizer(trainer)
    groups = groups_by_names(opt)
    by_name = {n: options for names, options in groups for n in names}
    assert by_name["model.embed_tokens.weight"]["state"] == "fp32"
    assert by_name["model.embed_tokens.weight"]["weight_decay"] == 0.0
    assert by_name["lm_head.weight"]["weight_decay"] == 0.0 and by_name["lm_head.weight"]["initial_lr"] == 5e-4
    assert by_name["model.layers.0.mlp.up_proj.weight"]["state"] == "factored"
    assert by_name["model.layers.0.mlp.up_proj.weight"]["weight_decay"] == 0.1
    # transformers' two groups come first, then one group per override set
    assert [len(names) for names, _ in groups] == [14, 5, 1, 1]
    params = dict(trainer.model.named_parameters())
    assert "exp_avg_sq" in opt.state[params["model.embed_tokens.weight"]]  # dense second moment
    assert "exp_avg_sq" not in opt.state[params["model.layers.0.mlp.up_proj.weight"]]  # factored


def test_bad_param_overrides_fail_when_the_trainer_is_built(tmp_path):
    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw"))
    with pytest.raises(OptimArgsError, match=r"param_overrides: .*unknown hyperparameter\(s\) 'stat'"):
        HFOptimTrainer(model=tiny_llama(), args=args, param_overrides={"embeddings": {"stat": "fp32"}})
    with pytest.raises(OptimArgsError, match="must map a selector"):
        HFOptimTrainer(model=tiny_llama(), args=args, param_overrides={"embeddings": "fp32"})


def test_auto_needs_the_number_of_steps(tmp_path):
    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="ademamix", optim_args="t_alpha=auto", max_steps=-1))
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    with pytest.raises(OptimArgsError, match="'auto' needs the total number of training steps"):
        trainer.create_optimizer()


# ---------------------------------------------------------------- built-ins exactly as transformers
def test_builtin_optim_trains_exactly_as_the_plain_trainer(tmp_path):
    ours = train(tmp_path / "ours", optim="adamw_torch", weight_decay=0.1, max_steps=2)
    plain_args = TrainingArguments(**run_args(tmp_path / "plain", optim="adamw_torch", weight_decay=0.1, max_steps=2))
    plain = Trainer(model=tiny_llama(), args=plain_args, train_dataset=TokenData())
    plain.train()
    a, b = inner_optimizer(ours), inner_optimizer(plain)
    assert type(a) is type(b) is torch.optim.AdamW
    assert [{k: v for k, v in g.items() if k != "params"} for g in a.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in b.param_groups
    ]
    for (n, p), (m, q) in zip(ours.model.named_parameters(), plain.model.named_parameters()):
        assert n == m and torch.equal(p, q)


def test_builtin_whose_name_hfoptim_also_uses(tmp_path):
    from transformers.optimization import Adafactor

    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="transformers:adafactor"))
    opt = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData()).create_optimizer()
    theirs_args = TrainingArguments(**run_args(tmp_path, optim="adafactor"))
    theirs = Trainer(model=tiny_llama(), args=theirs_args, train_dataset=TokenData()).create_optimizer()
    assert type(opt) is type(theirs) is Adafactor
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in theirs.param_groups
    ]


# ---------------------------------------------------------------- resume
def assert_same_training_state(a: HFOptimTrainer, b: HFOptimTrainer) -> None:
    for (n, p), (m, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert n == m and torch.equal(p, q), n
    sa, sb = inner_optimizer(a).state_dict(), inner_optimizer(b).state_dict()
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for pid, state in sa["state"].items():
        assert state.keys() == sb["state"][pid].keys()
        for key, value in state.items():
            assert torch.equal(value, sb["state"][pid][key]), (pid, key)
    strip = [{k: v for k, v in g.items() if k != "params"} for g in sa["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in sb["param_groups"]]


@pytest.mark.parametrize(
    "optim, optim_args",
    [
        ("ademamix", "t_alpha=auto,t_beta3=auto,weight_decay=0.1"),
        ("adamw_factored", "state_min_numel=0,embeddings:state=fp32"),
        ("ademamix_8bit", "state_min_numel=0,t_alpha=auto"),
        ("adamw_4bit", "state_min_numel=0"),
        ("adafactor", "beta1=0.9"),
    ],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, optim, optim_args):
    common = dict(optim=optim, optim_args=optim_args, max_steps=6, gradient_accumulation_steps=2)
    whole = train(tmp_path / "whole", save_strategy="steps", save_steps=3, **common)
    resumed = train(
        tmp_path / "resumed",
        model=tiny_llama(seed=7),  # other weights: the checkpoint must bring them back
        resume=str(tmp_path / "whole" / "checkpoint-3"),
        **common,
    )
    assert resumed.state.global_step == whole.state.global_step == 6
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]  # 1-3: checkpoint
    assert_same_training_state(whole, resumed)
    keys = set().union(*(s.keys() for s in inner_optimizer(whole).state.values()))
    form = {
        "adamw_factored": "exp_avg_sq.row",
        "ademamix_8bit": "exp_avg_slow.codes",
        "adamw_4bit": "exp_avg_sq.max1",
        "adafactor": "exp_avg_sq.col",
    }
    assert form.get(optim, "exp_avg") in keys  # the storage form really was used


# ---------------------------------------------------------------- peft
def test_lora_only_adapter_parameters_get_state(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer = train(tmp_path, model=model, optim="ademamix", optim_args="t_alpha=auto", weight_decay=0.1, max_steps=2)
    opt = inner_optimizer(trainer)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert names and all("lora_" in n for n in names)
    assert len(names) == 8  # A and B of q_proj and v_proj in 2 layers
    adapters = {p for n, p in model.named_parameters() if "lora_" in n}
    assert set(opt.state) == adapters  # nothing else has optimizer state


def test_an_optimizer_passed_explicitly_wins_with_a_warning(tmp_path, caplog):
    model = tiny_llama()
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="ademamix"))
    with caplog.at_level(logging.WARNING):
        trainer = HFOptimTrainer(model=model, args=args, train_dataset=TokenData(), optimizers=(mine, None))
    assert "optim='ademamix' unused: the optimizer given with optimizers= wins" in caplog.text
    assert trainer.create_optimizer() is mine


# ---------------------------------------------------------------- names transformers also uses
def test_adafactor_through_the_trainer_steps_with_the_learning_rate_as_transformers(tmp_path, caplog):
    """optim="adafactor" takes transformers' Trainer settings (relative_step=False,
    scale_parameter=False, lr=learning_rate), with a warning naming hfoptim's own defaults: one
    step moves the weights as transformers' built-in adafactor does (the two differ only in how
    the factored second moment is rounded), 26x more than the relative step would at lr=1e-3."""
    with caplog.at_level(logging.WARNING):
        ours = train(tmp_path / "ours", optim="adafactor", max_steps=1, learning_rate=1e-3)
    assert "relative_step=False, scale_parameter=False" in caplog.text
    assert "hfoptim.Adafactor's own defaults are relative_step=True, scale_parameter=True" in caplog.text
    group = inner_optimizer(ours).param_groups[0]
    assert group["relative_step"] is False and group["scale_parameter"] is False
    theirs = train(tmp_path / "theirs", optim="transformers:adafactor", max_steps=1, learning_rate=1e-3)
    start = tiny_llama()
    for (name, p), q, p0 in zip(ours.model.named_parameters(), theirs.model.parameters(), start.parameters()):
        assert not torch.equal(p, p0), name
        torch.testing.assert_close(p - p0, q - p0, rtol=1e-4, atol=1e-8, msg=name)

    explicit = train(tmp_path / "explicit", optim="adafactor", optim_args="relative_step=true", max_steps=1)
    assert inner_optimizer(explicit).param_groups[0]["relative_step"] is True  # optim_args win


def test_optim_args_betas_replacing_the_arguments_are_logged(tmp_path, caplog):
    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw", optim_args="betas=(0.8,0.95)", adam_beta1=0.7))
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    with caplog.at_level(logging.WARNING):
        opt = trainer.create_optimizer()
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert "optim_args betas=(0.8, 0.95) replace adam_beta1=0.7, adam_beta2=0.999" in caplog.text
