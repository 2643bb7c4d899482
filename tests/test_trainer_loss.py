"""The loss hand-off to loss-driven optimizers, the state-bytes callback, DeepSpeed conflicts in the
Trainer.

A probe rule (registered for the test only) takes SGD steps and records the loss the engine gives
it at each step; the Trainer's own logged loss (logging_steps=1: the loss of each optimizer step,
i.e. the mean of its micro-batch losses, token-weighted as the Trainer computes it) is the truth.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import TrainerCallback

import hfoptim
from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.integrations.transformers import DeepSpeedOptimizerConflict, find_engines
from hfoptim.integrations.transformers.callbacks import BYTES_KEY, PER_PARAM_KEY
from tests.trainer_setup import LossProbeRule, TokenData, inner_optimizer, lossprobe_entries, run_args, tiny_llama


@pytest.fixture
def lossprobe(monkeypatch):
    entries = lossprobe_entries()
    monkeypatch.setitem(hfoptim.registry.RULES, "lossprobe", entries["rule"])
    monkeypatch.setitem(hfoptim.registry.CLASSES, "lossprobe", entries["class"])
    LossProbeRule.seen = {}
    return LossProbeRule


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def make_trainer(tmp_path, **kw) -> HFOptimTrainer:
    args = HFOptimTrainingArguments(**run_args(tmp_path, **kw))
    return HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())


def test_loss_of_each_step_over_gradient_accumulation(tmp_path, lossprobe):
    trainer = make_trainer(tmp_path, optim="lossprobe", max_steps=3, gradient_accumulation_steps=3)
    trainer.train()
    assert type(inner_optimizer(trainer)).__name__ == "LossProbe"
    seen = [lossprobe.seen[t] for t in sorted(lossprobe.seen)]
    assert sorted(lossprobe.seen) == [1, 2, 3]
    assert seen == pytest.approx(logged_losses(trainer), rel=1e-6, abs=0)
    assert len(set(seen)) == 3  # a fresh loss every step, not a stale one


def test_adalo_gets_the_trainers_step_loss(tmp_path):
    """AdaLo's loss EMA after the run, recomputed from the Trainer's logged step losses:
    e_t = b2 e_(t-1) + (1 - b2) / (2 + L_t), e_0 = 0 (with gradient accumulation)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "AdaLo ignores lr": the Trainer always passes one
        trainer = make_trainer(
            tmp_path, optim="adalo", optim_args="betas=(0.9,0.8),kappa=2.0", max_steps=3, gradient_accumulation_steps=2
        )
        trainer.train()
    opt = inner_optimizer(trainer)
    assert type(opt) is hfoptim.AdaLo and opt.param_groups[0]["betas"] == (0.9, 0.8)  # no Adam args for AdaLo
    e = 0.0
    for loss in logged_losses(trainer):
        e = 0.8 * e + 0.2 / (2.0 + loss)
    for group in opt.param_groups:
        for p in group["params"]:
            assert float(opt.state[p]["loss_ema"]) == pytest.approx(e, rel=1e-5)


def test_loss_is_handed_over_before_the_backward_that_steps(tmp_path, lossprobe):
    """DeepSpeed runs the optimizer step inside ``accelerator.backward`` of the last micro-batch
    (and its optimizer wrapper's ``step()`` does nothing). Simulated here with the same control flow:
    the step runs inside backward, the Trainer's own ``optimizer.step()`` is a no-op. Verified on
    CPU with this simulation; the real DeepSpeed engine path is left to the sharding tests."""
    trainer = make_trainer(tmp_path, optim="lossprobe", max_steps=3, gradient_accumulation_steps=2)
    accelerator = trainer.accelerator
    real_backward = accelerator.backward
    events = []
    inside = {"backward": False}

    def deepspeed_like_backward(loss, **kwargs):
        real_backward(loss, **kwargs)
        if accelerator.sync_gradients:
            (engine,) = find_engines(trainer.optimizer)
            events.append(engine._handed_loss)
            inside["backward"] = True
            try:
                engine.step()
            finally:
                inside["backward"] = False

    accelerator.backward = deepspeed_like_backward

    class TrainerStepIsNoop(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            (engine,) = find_engines(optimizer)
            real_step = engine.step
            engine.step = lambda *a, **k: real_step(*a, **k) if inside["backward"] else None

    trainer.add_callback(TrainerStepIsNoop())
    trainer.train()
    expected = logged_losses(trainer)
    assert [lossprobe.seen[t] for t in sorted(lossprobe.seen)] == pytest.approx(expected, rel=1e-6, abs=0)
    assert [float(x) for x in events] == pytest.approx(expected, rel=1e-6, abs=0)


def test_without_the_hand_off_a_loss_driven_rule_refuses_to_step(tmp_path, lossprobe):
    from transformers import Trainer

    args = HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw_torch", max_steps=1))
    model = tiny_llama()
    probe = hfoptim.registry.CLASSES["lossprobe"](model.parameters())
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(probe, None))
    with pytest.raises(RuntimeError, match="lossprobe sets its step size from the training loss"):
        trainer.train()
    # the same optimizer passed to HFOptimTrainer gets the loss
    trainer = HFOptimTrainer(model=model, args=args, train_dataset=TokenData(), optimizers=(probe, None))
    trainer.train()
    assert list(lossprobe.seen) == [1]


# ---------------------------------------------------------------- state bytes callback
def test_state_bytes_are_logged_once_training_starts(tmp_path, monkeypatch):
    calls = []

    def state_bytes(optimizer):
        calls.append(optimizer)
        return types.SimpleNamespace(total=4096, per_param=2.0)

    monkeypatch.setitem(sys.modules, "hfoptim.memory", types.SimpleNamespace(state_bytes=state_bytes))
    trainer = make_trainer(tmp_path, optim="adamw", max_steps=2, logging_steps=2)
    trainer.train()
    assert len(calls) == 1 and type(calls[0]) is hfoptim.AdamW  # measured under accelerate's wrapper
    first_log = trainer.state.log_history[0]
    assert first_log["step"] == 2 and "loss" in first_log  # joined the first regular log entry
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert first_log[BYTES_KEY] == 4096 and first_log[PER_PARAM_KEY] == pytest.approx(4096 / trainable)
    assert all(BYTES_KEY not in entry for entry in trainer.state.log_history[1:])


# ---------------------------------------------------------------- DeepSpeed conflicts seen by the Trainer
def test_deepspeed_plugin_with_an_optimizer_section(tmp_path, monkeypatch):
    """A DeepSpeed config that reaches the Trainer through accelerate (``accelerate launch`` with a
    DeepSpeed config file) rather than TrainingArguments.deepspeed. On CPU the plugin is faked: the
    check reads ``accelerator.state.deepspeed_plugin.deepspeed_config``."""
    trainer = make_trainer(tmp_path, optim="adamw")
    builtin = make_trainer(tmp_path, optim="adamw_torch")
    plugin = types.SimpleNamespace(deepspeed_config={"optimizer": {"type": "AdamW"}})
    monkeypatch.setattr(type(trainer.accelerator.state), "deepspeed_plugin", plugin, raising=False)
    trainer.is_deepspeed_enabled = builtin.is_deepspeed_enabled = True
    with pytest.raises(DeepSpeedOptimizerConflict, match="'adamw' is an hfoptim optimizer"):
        trainer._check_deepspeed(trainer.args.optim_choice)
    builtin._check_deepspeed(builtin.args.optim_choice)  # DeepSpeed's optimizer, as in transformers
    builtin.optimizer = torch.optim.SGD(builtin.model.parameters(), lr=0.1)
    with pytest.raises(DeepSpeedOptimizerConflict, match="silently drop the one passed"):
        builtin._check_deepspeed(builtin.args.optim_choice)
