"""Generic engine behaviour, checked for EVERY registered optimizer name.

The names come from ``hfoptim.list_optimizers()`` when the tests are collected, so rules,
suffixes and storage forms added later are covered without editing this file. Rules that need
the loss get ``step(loss=...)``. Tensors are tiny and runs short; ``state_min_numel=0`` makes the
storage forms (factored, SMMF, ...) engage even on tiny tensors.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import hfoptim
from hfoptim.core.optimizer import engine_hyperparams
from hfoptim.lookahead import Lookahead

NAMES = hfoptim.list_optimizers()
SHAPES = [(5,), (4, 3), (2, 3, 2)]


def spec(name):
    return hfoptim.get_optimizer(name)


def build(name, params, **kwargs):
    return hfoptim.create_optimizer(params, name, state_min_numel=0, **kwargs)


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def grads_for(params, t, sign=1.0):
    gen = torch.Generator().manual_seed(1000 + t)
    return [sign * (0.3 * p.detach().float() + torch.randn(p.shape, generator=gen)).to(p.dtype) for p in params]


def loss_at(t):
    return 1.0 / (1.0 + 0.2 * t)


def do_step(name, opt, t):
    if spec(name).rule.needs_loss:
        return opt.step(loss=loss_at(t))
    return opt.step()


def run(name, opt, params, steps, start=1, sign=1.0):
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t, sign)):
            p.grad = g
        do_step(name, opt, t)


def inner(opt):
    return opt.optimizer if isinstance(opt, Lookahead) else opt


def state_tensors(opt, p):
    out = {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    if isinstance(opt, Lookahead) and p in opt.slow:
        out["lookahead_slow"] = opt.slow[p]
    return out


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_grad_is_never_written(name):
    params = make_params()
    opt = build(name, params)
    for t in range(1, 4):
        grads = grads_for(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.grad for p in params]
        do_step(name, opt, t)
        for p, g, obj in zip(params, grads, before):
            assert p.grad is obj and torch.equal(p.grad, g), f"{name} modified p.grad at step {t}"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_step_in_fp32_close_to_fp32(name):
    low = make_params(torch.bfloat16)
    high = [torch.nn.Parameter(p.detach().float()) for p in low]
    opt_low, opt_high = build(name, low), build(name, high)
    for t in range(1, 4):
        grads = grads_for(low, t)
        for p, q, g in zip(low, high, grads):
            p.grad, q.grad = g, g.float()
        do_step(name, opt_low, t)
        do_step(name, opt_high, t)
    for p, q in zip(low, high):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.detach(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
    if spec(name).options.get("state", "auto") in ("auto", "fp32"):  # 8bit/bf16 forms pick their dtypes
        for p in low:
            for key, value in state_tensors(opt_low, p).items():
                if value.is_floating_point():
                    assert value.dtype == torch.float32, f"{name}: state {key!r} is {value.dtype}"


@pytest.mark.parametrize("name", NAMES)
def test_maximize_is_descent_on_the_negated_gradient(name):
    init = make_params()
    up = [torch.nn.Parameter(p.detach().clone()) for p in init]
    down = [torch.nn.Parameter(p.detach().clone()) for p in init]
    opt_up, opt_down = build(name, up, maximize=True), build(name, down)
    for t in range(1, 4):
        for p, q, g in zip(up, down, grads_for(init, t)):
            p.grad, q.grad = g.clone(), -g
        do_step(name, opt_up, t)
        do_step(name, opt_down, t)
    for p, q in zip(up, down):
        assert torch.equal(p, q), f"{name}: maximize differs from descent on -grad"
    assert not torch.equal(up[0], init[0])


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_evaluated_with_grad_and_its_loss_returned(name):
    params = make_params()
    opt = build(name, params)
    target = [torch.randn(p.shape) for p in params]

    def closure():
        opt.zero_grad()
        loss = sum(((p - q) ** 2).sum() for p, q in zip(params, target))
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    returned = opt.step(closure)
    assert isinstance(returned, torch.Tensor) and returned.requires_grad
    expected = sum(((b - q) ** 2).sum() for b, q in zip(before, target))
    torch.testing.assert_close(returned.detach(), expected)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_mid_run_is_bit_identical(name):
    init = make_params()
    straight = [torch.nn.Parameter(p.detach().clone()) for p in init]
    opt = build(name, straight)
    run(name, opt, straight, 7)

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in init]
    first = build(name, resumed)
    run(name, first, resumed, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    del first
    fresh = build(name, resumed)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    run(name, fresh, resumed, 4, start=4)

    for p, q in zip(straight, resumed):
        assert torch.equal(p, q), f"{name}: resumed parameters differ"
        a, b = state_tensors(opt, p), state_tensors(fresh, q)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}: state {key!r} differs"


def other_rule_name(name):
    mine = spec(name).rule.name
    return next(n for n in ("adamw", "pnm", "diffgrad") if n in NAMES and spec(n).rule.name != mine)


@pytest.mark.parametrize("name", NAMES)
def test_loading_another_optimizers_state_dict_fails_clearly(name):
    params = make_params()
    opt = build(name, params)
    run(name, opt, params, 1)

    foreign = [torch.nn.Parameter(p.detach().clone()) for p in params]
    others = [torch.optim.AdamW(foreign), build(other_rule_name(name), foreign)]
    for other in others:
        run(other_rule_name(name), other, foreign, 1)
        with pytest.raises(ValueError, match="saved by|not saved"):
            opt.load_state_dict(other.state_dict())

    shapes = [torch.nn.Parameter(torch.randn(s[::-1] if len(s) > 1 else (s[0] + 1,))) for s in SHAPES]
    reshaped = build(name, shapes)
    run(name, reshaped, shapes, 1)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(reshaped.state_dict())


def bad_hyperparameters(name):
    options = engine_hyperparams(spec(name).rule)
    cases = [("lr", -1.0), ("lr", "0.1"), ("not_an_option", 1.0), ("maximize", "yes")]
    if "betas" in options:
        cases.append(("betas", tuple(1.0 for _ in options["betas"].default)))
    if "eps" in options:
        cases.append(("eps", -1e-8))
    if "weight_decay" in options:
        cases.append(("weight_decay", float("nan")))
    return [(key, value) for key, value in cases if key in options or key == "not_an_option"]


@pytest.mark.parametrize("name", NAMES)
def test_invalid_hyperparameters_name_themselves(name):
    for key, value in bad_hyperparameters(name):
        with pytest.raises(hfoptim.HyperparameterError, match=key):
            build(name, make_params(), **{key: value})


@pytest.mark.parametrize("name", NAMES)
def test_sparse_and_complex_are_refused_clearly(name):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = build(name, [p])
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises((RuntimeError, ValueError, TypeError), match="sparse"):
        do_step(name, opt, 1)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="complex"):
        build(name, [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_continues_like_the_original(name):
    params = make_params()
    opt = build(name, params)
    run(name, opt, params, 2)
    clone = copy.deepcopy(opt)
    # the clone's parameters in the order of params (a rule may split groups: Muon)
    position = {id(p): i for i, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    flat_clone = [p for g in clone.param_groups for p in g["params"]]
    clone_params = [flat_clone[position[id(p)]] for p in params]
    assert all(a is not b for a, b in zip(params, clone_params))
    run(name, opt, params, 3, start=3)
    run(name, clone, clone_params, 3, start=3)
    for p, q in zip(params, clone_params):
        assert torch.equal(p, q), f"{name}: the deep copy diverged"


def test_pickle_round_trip():
    params = make_params()
    opt = build("adamw_cautious", params)
    run("adamw_cautious", opt, params, 2)
    loaded = pickle.loads(pickle.dumps(opt))
    assert type(loaded) is type(opt) and loaded.rule.name == "adamw"
    loaded_params = [p for g in loaded.param_groups for p in g["params"]]
    run("adamw_cautious", opt, params, 2, start=3)
    run("adamw_cautious", loaded, loaded_params, 2, start=3)
    assert all(torch.equal(p, q) for p, q in zip(params, loaded_params))


@pytest.mark.parametrize("foreach", [True, False])
def test_tensorlist_in_place_forms_write_into_self_and_match_the_plain_ops(foreach):
    from hfoptim.core.tensorlist import TensorList

    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen)]
    b = [torch.rand(5, 7, generator=gen) + 0.5, torch.rand(3, generator=gen) + 0.5]
    x = TensorList([t.clone() for t in b], foreach)
    ptrs = [t.data_ptr() for t in x]
    x.rsub_(TensorList(a, foreach))  # x = a - b
    assert [t.data_ptr() for t in x] == ptrs
    assert all(torch.equal(t, ai - bi) for t, ai, bi in zip(x, a, b))
    y = TensorList([t.clone() for t in b], foreach).rdiv_(TensorList(a, foreach))  # a / b
    assert all(torch.equal(t, ai / bi) for t, ai, bi in zip(y, a, b))
    z = TensorList([torch.empty_like(t) for t in a], foreach).set_scaled_(TensorList(a, foreach), [2.0, 0.5])
    assert torch.equal(z[0], a[0] * 2.0) and torch.equal(z[1], a[1] * 0.5)
