"""Issue 16's optimizers through the HF Trainer: by name, with typed optim_args, and a resume
from a checkpoint that brings AdaGL's gradient history back."""

from __future__ import annotations

import pytest

import hfoptim
from hfoptim import HFOptimTrainingArguments
from tests.test_trainer_train import assert_same_training_state, groups_by_names, train
from tests.trainer_setup import inner_optimizer, tiny_llama


@pytest.mark.parametrize(
    "optim, optim_args, cls, expected, key",
    [
        (
            "adamomentum",
            "eps_mode=denominator,eps=1e-7",
            hfoptim.AdaMomentum,
            {"eps_mode": "denominator"},
            "exp_avg_sq",
        ),
        (
            "adagl_8bit",
            "history=3,alpha=0.3,step_control=mean,state_min_numel=0",
            hfoptim.AdaGL,
            {"history": 3, "alpha": 0.3, "step_control": "mean", "state": "8bit"},
            "grad_3.codes",
        ),
        ("adamw2", "spectral_cap=0.01,spectral_cap_iters=3", hfoptim.AdamW, {"spectral_cap": 0.01}, "exp_avg"),
        ("adan_spectralcap", None, hfoptim.Adan, {"spectral_cap": 0.05, "spectral_cap_iters": 5}, "exp_avg"),
    ],
)
def test_issue16_names_train_with_typed_optim_args(tmp_path, optim, optim_args, cls, expected, key):
    trainer = train(tmp_path, optim=optim, optim_args=optim_args, max_steps=2)
    opt = inner_optimizer(trainer)
    assert type(opt) is cls
    for _, group in groups_by_names(opt):
        assert {k: group[k] for k in expected} == expected
    keys = set().union(*(s.keys() for s in opt.state.values()))
    assert key in keys
    assert all(int(opt.state[p]["step"]) == 2 for g in opt.param_groups for p in g["params"])


def test_adagl_resume_equals_an_uninterrupted_run(tmp_path):
    common = dict(optim="adagl_8bit", optim_args="history=3,state_min_numel=0", max_steps=4)
    whole = train(tmp_path / "whole", save_strategy="steps", save_steps=2, **common)
    resumed = train(
        tmp_path / "resumed", model=tiny_llama(seed=7), resume=str(tmp_path / "whole" / "checkpoint-2"), **common
    )
    assert resumed.state.global_step == whole.state.global_step == 4
    assert_same_training_state(whole, resumed)


def test_bad_options_fail_when_the_arguments_are_built():
    with pytest.raises(ValueError, match="alpha"):
        HFOptimTrainingArguments(output_dir="unused", use_cpu=True, report_to=[], optim="adagl", optim_args="alpha=1.5")
