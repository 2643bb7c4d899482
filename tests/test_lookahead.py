import copy
import io
import warnings

import pytest
import torch
from pytorch_optimizer import Lookahead as POLookahead

import hfoptim
from hfoptim.lookahead import Lookahead
from tests.anchor import compare_with_anchor
from tests.harness import check_parity, gradients
from tests.references.adamw import AdamWRef
from tests.references.lookahead import LookaheadRef

ADAMW = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def test_lookahead_by_name_matches_paper_reference():
    check_parity(
        lambda ps, foreach: hfoptim.create_optimizer(
            ps, "adamw_lookahead", foreach=foreach, lookahead_k=3, lookahead_alpha=0.3, **ADAMW
        ),
        lambda: LookaheadRef(AdamWRef(**ADAMW), k=3, alpha=0.3),
    )


def test_slow_weights_follow_the_paper_and_are_lazy():
    init = torch.randn(6, dtype=torch.float64)
    p = torch.nn.Parameter(init.clone())
    opt = Lookahead(torch.optim.SGD([p], lr=0.1, momentum=0.5), k=2, alpha=0.25)
    assert opt.slow == {} and len(opt.state) == 0  # nothing before the first step
    ref_p, ref = init.clone(), LookaheadRef(SGDRef(0.1, 0.5), k=2, alpha=0.25)
    for t in range(1, 8):
        g = gradients([ref_p], t)[0]
        p.grad = g.clone()
        opt.step()
        ref.step(ref_p, g)
        torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.slow[p], ref.slow, rtol=1e-12, atol=1e-14)


class SGDRef:
    """torch.optim.SGD with momentum, dampening 0: b = mu b + g; p -= lr b."""

    def __init__(self, lr, momentum):
        self.lr, self.mu, self.state, self.buf = lr, momentum, {}, None

    def step(self, p, g):
        self.buf = g.clone() if self.buf is None else self.mu * self.buf + g
        self.state["momentum_buffer"] = self.buf
        p -= self.lr * self.buf


def test_first_slow_weights_are_pre_step_values_with_a_closure():
    init = torch.randn(5)
    p = torch.nn.Parameter(init.clone())
    opt = Lookahead(hfoptim.AdamW([p], lr=0.1), k=10)

    def closure():
        p.grad = torch.ones_like(p)
        return torch.tensor(1.0)

    assert float(opt.step(closure)) == 1.0
    torch.testing.assert_close(opt.slow[p], init)


@pytest.mark.parametrize("schedule", ["late_start", "sub_groups"])
def test_each_parameter_counts_its_own_steps(schedule):
    """late_start: b gets its first gradient at step 2 and syncs on its own schedule.
    sub_groups: as DeepSpeed ZeRO-3, step() runs once per sub-group ({a}, then {b}) per training
    step; each parameter still syncs after k of ITS steps, not after k step() calls."""
    init = [torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.5), k=3, alpha=0.25)
    refs = [LookaheadRef(SGDRef(0.1, 0.5), k=3, alpha=0.25) for _ in params]
    ref_params = [x.clone() for x in init]
    for t in range(1, 10):
        grads = gradients(ref_params, t)
        if schedule == "late_start":
            params[0].grad, params[1].grad = grads[0].clone(), (grads[1].clone() if t > 1 else None)
            opt.step()
        else:
            for i in (0, 1):
                params[i].grad, params[1 - i].grad = grads[i].clone(), None
                opt.step()
        for i, (ref, rp, g) in enumerate(zip(refs, ref_params, grads)):
            if not (schedule == "late_start" and i == 1 and t == 1):
                ref.step(rp, g)
        for p, rp in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), rp, rtol=1e-12, atol=1e-14)


def test_parameters_without_gradients_get_no_slow_weights():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = Lookahead(hfoptim.AdamW([a, b]), k=2)
    a.grad = torch.randn(3)
    opt.step()
    assert a in opt.slow and b not in opt.slow


@pytest.mark.parametrize("inner", ["hfoptim", "torch"])
def test_matches_pytorch_optimizer_lookahead(inner):
    """Anchor: pytorch_optimizer.Lookahead (pullback_momentum='none') over the same inner
    optimizer. Intended difference: it copies the slow weights in __init__, we at the first step;
    the values are the same when nothing moves the weights in between."""
    make_inner = (
        (lambda ps: hfoptim.AdamW(ps, **ADAMW)) if inner == "hfoptim" else (lambda ps: torch.optim.AdamW(ps, **ADAMW))
    )
    compare_with_anchor(
        lambda ps: Lookahead(make_inner(ps), k=4, alpha=0.4),
        lambda ps: POLookahead(make_inner(ps), k=4, alpha=0.4),
        steps=22,
        rtol=0,
        atol=0,
    )


def _run(opt, params, steps, start=1):
    for t in range(start, start + steps):
        for p, g in zip(params, gradients([p.detach() for p in params], t)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("inner", ["hfoptim", "torch"])
def test_state_dict_round_trip_mid_run_is_exact(inner):
    def make(ps):
        base = hfoptim.AdamW(ps, **ADAMW) if inner == "hfoptim" else torch.optim.AdamW(ps, **ADAMW)
        return Lookahead(base, k=3, alpha=0.3)

    init = [torch.randn(s, dtype=torch.float64) for s in [(4,), (3, 5)]]
    straight = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(straight)
    _run(opt, straight, 11)

    resumed = [torch.nn.Parameter(x.clone()) for x in init]
    first = make(resumed)
    _run(first, resumed, 7)  # 7 % 3 != 0: mid-period, slow weights differ from fast ones
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(resumed)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(fresh.steps.values()) == {7}
    _run(fresh, resumed, 4, start=8)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
        assert torch.equal(opt.slow[a], fresh.slow[b])


def test_state_dict_carries_slow_weights_counter_and_options():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Lookahead(hfoptim.AdamW([p]), k=4, alpha=0.2)
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    assert torch.equal(sd["state"][0]["lookahead_slow"], opt.slow[p])
    assert int(sd["state"][0]["lookahead_step"]) == 1
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(sd["state"][0])
    g = sd["param_groups"][0]
    assert (g["lookahead_k"], g["lookahead_alpha"]) == (4, 0.2)
    assert "lookahead_k" not in opt.param_groups[0]  # the live groups stay the inner optimizer's


def test_load_errors_are_clear():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Lookahead(hfoptim.AdamW([p]))
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="not saved by hfoptim.Lookahead"):
        opt.load_state_dict(plain.state_dict())
    q = torch.nn.Parameter(torch.randn(4))
    other = Lookahead(hfoptim.AdamW([q]))
    q.grad = torch.randn(4)
    other.step()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(other.state_dict())
    wrapped_sd = other.state_dict()
    with pytest.raises(ValueError):  # the inner optimizer refuses the Lookahead entries
        hfoptim.AdamW([torch.nn.Parameter(torch.randn(4))]).load_state_dict(wrapped_sd)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k"),
        ({"k": 2.5}, "k"),
        ({"k": True}, "k"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": "0.5"}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
    ],
)
def test_invalid_k_and_alpha(kwargs, name):
    with pytest.raises(hfoptim.HyperparameterError, match=f"Lookahead {name}="):
        Lookahead(hfoptim.AdamW([torch.nn.Parameter(torch.zeros(2))]), **kwargs)


def test_registry_validates_lookahead_kwargs():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(hfoptim.HyperparameterError, match="k="):
        hfoptim.create_optimizer(params, "adamw_lookahead", lookahead_k=0)
    with pytest.raises(hfoptim.HyperparameterError, match="_lookahead"):
        hfoptim.create_optimizer(params, "adamw", lookahead_k=3)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Lookahead(params)


def test_lr_scheduler_and_hooks_drive_the_inner_optimizer():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Lookahead(hfoptim.AdamW([p], lr=1.0), k=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(3):
            p.grad = torch.randn(3)
            opt.step()
            sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.125 and len(calls) == 3
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state


def test_bf16_parameters_keep_fp32_slow_weights():
    p = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    opt = Lookahead(hfoptim.AdamW([p], lr=1e-2), k=2)
    for _ in range(4):
        p.grad = torch.randn(8).to(torch.bfloat16)
        opt.step()
    assert opt.slow[p].dtype == torch.float32 and p.dtype == torch.bfloat16
    assert torch.equal(p.float(), opt.slow[p].to(torch.bfloat16).float())


def test_survives_deepcopy():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Lookahead(torch.optim.AdamW([p]), k=2)
    p.grad = torch.randn(3)
    opt.step()
    clone = copy.deepcopy(opt)
    assert list(clone.steps.values()) == [1] and len(clone.slow) == 1
    clone.step()


def test_accelerate_prepares_it():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(3, 2)
        opt = Lookahead(hfoptim.AdamW(model.parameters(), lr=0.1), k=2)
        model, prepared = accelerator.prepare(model, opt)
        for _ in range(2):
            accelerator.backward(model(torch.randn(4, 3)).square().sum())
            prepared.step()
            prepared.zero_grad()
        assert set(opt.steps.values()) == {2} and len(opt.slow) == 2
        assert int(prepared.state_dict()["state"][0]["lookahead_step"]) == 2
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_trainer_resume_mid_period_equals_an_uninterrupted_run(tmp_path):
    """A real Trainer run by name; the checkpoint at step 3 falls between two syncs (k = 2)."""
    from tests.test_trainer_train import assert_same_training_state, train
    from tests.trainer_setup import inner_optimizer, tiny_llama

    common = dict(optim="adamw_lookahead", optim_args="lookahead_k=2,lookahead_alpha=0.5", max_steps=6)
    whole = train(tmp_path / "whole", save_strategy="steps", save_steps=3, **common)
    resumed = train(
        tmp_path / "resumed", model=tiny_llama(seed=7), resume=str(tmp_path / "whole" / "checkpoint-3"), **common
    )
    opt = inner_optimizer(resumed)
    assert isinstance(opt, Lookahead) and set(opt.steps.values()) == {6} and opt.k == 2
    assert_same_training_state(whole, resumed)
    assert all(torch.equal(a, b) for a, b in zip(inner_optimizer(whole).slow.values(), opt.slow.values()))


def test_hooks_run_as_on_any_torch_optimizer():
    """Global step hooks fire once per Lookahead step (with the wrapper), the inner optimizer's
    own hooks still run, and the wrapper's state-dict hooks run around state_dict and
    load_state_dict."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    param = torch.nn.Parameter(torch.randn(4, 3))
    inner = hfoptim.AdamW([param])
    opt = Lookahead(inner, k=2)
    seen = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global_pre", type(o).__name__))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global_post", type(o).__name__))),
        inner.register_step_pre_hook(lambda o, a, k: seen.append(("inner_pre", type(o).__name__))),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", type(o).__name__))),
    ]
    try:
        param.grad = torch.randn_like(param)
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [
        ("global_pre", "Lookahead"),
        ("inner_pre", "AdamW"),
        ("post", "Lookahead"),
        ("global_post", "Lookahead"),
    ]
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    state_dict = opt.state_dict()
    assert state_dict["extra"] == 1
    opt.load_state_dict(state_dict)
    assert calls == ["pre", "load_post"]
