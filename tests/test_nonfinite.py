"""Non-finite gradients lose no state (``skip_nonfinite``).

What is proven here:

* one NaN (or infinity) element in one gradient of an 8-bit AdamW run skips the whole step:
  every parameter and every state tensor bit-identical, ``nonfinite_skips`` counted (and saved in
  the state dict), on both engine paths; the next finite step continues exactly as a run that
  never saw the bad gradients;
* the check covers every parameter of the optimizer: a NaN in one group skips the others;
* defaults: on for compressed state, off for dense state (fp32 AdamW lets the NaN through, as
  torch's AdamW does), and ``skip_nonfinite`` True/False overrides both;
* fp16-style loss scaling with torch's GradScaler keeps working and nothing is counted twice:
  the scaler skips the overflowing step before the optimizer sees it;
* Lookahead does not count a step the inner optimizer skipped;
* the Trainer callback puts the count into the log entry;
* under FSDP2 on 2 processes, a NaN held by ONE process's shard makes EVERY process skip
  (tests/distributed/nonfinite_worker.py); the same worker checks that a sharded load into
  another storage form is refused, saying how to proceed.
"""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest
import torch

import hfoptim
from hfoptim.integrations.transformers.callbacks import SKIPS_KEY, OptimizerStateCallback
from tests.distributed.launch import run_worker, torchrun

SHAPES = [(64, 80), (300,), (7, 3)]
HP = dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def set_grads(params, t, bad=None):
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    if bad is not None:
        params[0].grad[5, 7] = bad


def snapshot(opt, params):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]


def assert_identical(before, after):
    for (p0, s0), (p1, s1) in zip(before, after):
        assert torch.equal(p0, p1)
        assert s0.keys() == s1.keys()
        for key in s0:
            assert torch.equal(s0[key], s1[key]), key


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_element_in_8bit_adamw_leaves_everything_bit_identical(foreach, bad):
    params, twin_params = make_params(), make_params()
    opt = hfoptim.create_optimizer(params, "adamw_8bit", foreach=foreach, **HP)
    twin = hfoptim.create_optimizer(twin_params, "adamw_8bit", foreach=foreach, **HP)
    for t in (1, 2):
        set_grads(params, t)
        opt.step()
        set_grads(twin_params, t)
        twin.step()
    before = snapshot(opt, params)
    set_grads(params, 3, bad)
    opt.step()
    assert_identical(before, snapshot(opt, params))
    assert opt.nonfinite_skips == 1
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = hfoptim.create_optimizer(resumed_params, "adamw_8bit", foreach=foreach, **HP)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.nonfinite_skips == 1
    for o, ps in ((opt, params), (twin, twin_params), (resumed, resumed_params)):
        set_grads(ps, 4)
        o.step()
    for p, q, r in zip(params, twin_params, resumed_params):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert opt.state[params[0]]["step"].item() == 3.0


def test_a_huge_finite_fp64_gradient_is_not_taken_for_an_overflow():
    """The check reads each gradient's extremes in its own dtype: 1e39 is finite in fp64 (it
    would be infinite once cast to fp32), so the step is not skipped."""
    p = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.float64))
    opt = hfoptim.create_optimizer([p], "adamw_8bit", lr=1e-3, state_min_numel=0)
    p.grad = torch.zeros_like(p)
    p.grad[3, 5] = 1e39
    opt.step()
    assert opt.nonfinite_skips == 0
    assert opt.state[p]["step"].item() == 1.0


def test_a_bad_gradient_in_one_group_skips_every_group():
    params = make_params()
    opt = hfoptim.AdamW([{"params": params[:1]}, {"params": params[1:], "state": "8bit"}], state_min_numel=0)
    set_grads(params, 1)
    opt.step()
    before = snapshot(opt, params)
    set_grads(params, 2, float("nan"))  # in group 0, whose state is dense
    opt.step()
    assert_identical(before, snapshot(opt, params))
    assert opt.nonfinite_skips == 1


@pytest.mark.parametrize(
    ("name", "option", "skips"),
    [
        ("adamw", None, False),
        ("adamw", True, True),
        ("adamw_8bit", None, True),
        ("adamw_8bit", False, False),
        ("adamw_bf16", None, True),
        ("adafactor", None, True),  # factored second moment by default
        ("smmf", None, True),
    ],
)
def test_defaults_and_overrides(name, option, skips):
    params = make_params()
    kwargs = {} if option is None else {"skip_nonfinite": option}
    opt = hfoptim.create_optimizer(params, name, **kwargs)
    set_grads(params, 1)
    opt.step()
    before = snapshot(opt, params)
    set_grads(params, 2, float("nan"))
    opt.step()
    assert opt.nonfinite_skips == int(skips)
    if skips:
        assert_identical(before, snapshot(opt, params))
    else:
        assert torch.isnan(params[0]).any()  # what torch's AdamW does too


def test_grad_scaler_skips_first_and_nothing_is_counted_twice():
    model = torch.nn.Linear(80, 64)
    opt = hfoptim.AdamW(model.parameters(), state="8bit", state_min_numel=0, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(4, 80)
    for t in range(3):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        if t == 1:
            model.weight.grad[0, 0] = float("inf")  # an overflow of the scaled gradients
        before = snapshot(opt, list(model.parameters()))
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if t == 1:
            assert_identical(before, snapshot(opt, list(model.parameters())))
            assert scaler.get_scale() == scale / 2
    assert opt.nonfinite_skips == 0
    assert opt.state[model.weight]["step"].item() == 2.0


def test_lookahead_does_not_count_a_skipped_step():
    params = make_params()
    opt = hfoptim.Lookahead(hfoptim.create_optimizer(params, "adamw_8bit"), k=2)
    set_grads(params, 1)
    opt.step()
    set_grads(params, 2, float("nan"))
    before = [p.detach().clone() for p in params]
    opt.step()  # without the skip this would be the k-th step and sync
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert opt.steps[params[0]] == 1 and opt.nonfinite_skips == 1


def test_trainer_callback_logs_the_skips(caplog):
    params = make_params()
    opt = hfoptim.create_optimizer(params, "adamw_8bit")
    callback = OptimizerStateCallback()
    state = SimpleNamespace(log_history=[])
    callback.on_train_begin(None, state, None, optimizer=opt)
    set_grads(params, 1, float("nan"))
    opt.step()
    logs = {"loss": 1.0}
    state.log_history.append(dict(logs))
    with caplog.at_level(logging.WARNING):
        callback.on_log(None, state, None, logs=logs, optimizer=opt)
    assert logs[SKIPS_KEY] == 1 and state.log_history[-1][SKIPS_KEY] == 1
    assert "non-finite" in caplog.text
    logs = {"loss": 0.5}
    callback.on_log(None, state, None, logs=logs, optimizer=opt)
    assert SKIPS_KEY not in logs  # reported when the count grows


@pytest.mark.slow
def test_fsdp2_every_process_skips_when_one_shard_holds_the_nan(tmp_path):
    run_worker(torchrun(2), "nonfinite_worker.py", [], tmp_path / "out.json", timeout=240)
