"""Issue 16 (SM3, stable weight decay, Norm Loss, CPR, gradient normalization) by name: listed,
through the HF Trainer, and the refusals under layouts that step only part of the parameters."""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.distributed.zero import FlatGroup, ZeroLayout
from tests.trainer_setup import TokenData, inner_optimizer, run_args, tiny_llama

NAMES = ["sm3", "adams", "adamcpr", "adamw_swd", "adamw_cpr", "adamw_normloss", "adamw_gradnorm", "sm3_gradnorm"]


def test_names_are_listed():
    listed = set(hfoptim.list_optimizers())
    assert set(NAMES) <= listed


@pytest.mark.parametrize(
    ("optim", "optim_args", "check"),
    [
        ("sm3", "momentum=0.9", lambda g: g["momentum"] == 0.9),
        ("adams", "", lambda g: g["weight_decay_mode"] == "stable"),
        (
            "adamcpr",
            "cpr_kappa_init=warm_start,cpr_warm_start=2",
            lambda g: g["weight_decay_mode"] == "cpr" and g["cpr_warm_start"] == 2,
        ),
        ("adamw_normloss_gradnorm", "", lambda g: g["norm_loss"] == 1e-4 and g["normalize_grad"]),
    ],
)
def test_trainer_trains_with_the_names(tmp_path, optim, optim_args, check):
    args = HFOptimTrainingArguments(
        **run_args(tmp_path, optim=optim, optim_args=optim_args, weight_decay=0.5, max_steps=3)
    )
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())
    trainer.train()
    opt = inner_optimizer(trainer)
    assert all(check(g) for g in opt.param_groups)
    decay = [g for g in opt.param_groups if g["weight_decay"] != 0]
    assert decay and all(int(opt.state[p]["step"]) == 3 for g in decay for p in g["params"])
    if optim == "adamcpr":  # the bound of the decayed matrices was set at step 2 (warm start)
        assert all(float(opt.state[p]["cpr_kappa"]) > 0 for p in decay[0]["params"])


class _PartialLayout:
    """A layout stand-in whose step() calls see only some parameters (DeepSpeed's per-group steps)."""

    steps_all_parameters = False
    partial_step_reason = "DeepSpeed ZeRO-2 steps its 2 flat partitions one step() call at a time"

    def __init__(self, inner):
        self.inner = inner

    def for_step(self, optimizer):
        return self

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_stable_decay_refuses_a_layout_that_steps_part_of_the_parameters():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = hfoptim.create_optimizer([p], "adams")
    opt.layout = _PartialLayout(opt.layout)
    p.grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="mean second moment over ALL parameters, but DeepSpeed ZeRO-2"):
        opt.step()


def test_zero_layout_says_whether_one_step_sees_every_parameter():
    """DeepSpeed steps one flat partition per step() call: stable decay is exact with one only."""
    flats = [torch.zeros(4), torch.zeros(3)]
    one = ZeroLayout([FlatGroup(flats[0], [], None, [])], None, kind="ZeRO-2")
    two = ZeroLayout([FlatGroup(f, [], None, []) for f in flats], None, kind="ZeRO-3")
    assert one.steps_all_parameters and not two.steps_all_parameters
    assert "sub_group_size" in two.partial_step_reason and "ZeRO-3" in two.partial_step_reason
