"""AdaLo: parity with its reference, the loss paths (closure, loss=, set_loss, GradScaler), the
refusal without a loss, and the ignored lr. No installed library implements AdaLo."""

import warnings

import pytest
import torch

import hfoptim
from hfoptim.core.hparams import HyperparameterError
from tests.harness import check_parity
from tests.references.adalo import AdaLoRef

# eps = 0.01 clamps the adversarial step during the first steps and releases it later
HP = dict(betas=(0.8, 0.9), kappa=2.0, eps=0.01, weight_decay=0.1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"mode": "compliant"},
        {"weight_decay_mode": "cautious"},
        {"weight_decay_mode": "l2", "mode": "compliant"},
    ],
    ids=["adversarial", "compliant", "cautious-wd", "l2-compliant"],
)
def test_adalo_matches_reference(options):
    check_parity(
        lambda params, foreach: hfoptim.AdaLo(params, foreach=foreach, **HP, **options),
        lambda: AdaLoRef(**HP, **options),
        pass_loss=True,
    )


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 2, (16,), generator=gen)


def _loss(model):
    x, y = _data()
    return torch.nn.functional.cross_entropy(model(x), y)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _run_with_loss_argument(steps=5, scale_loss=1.0, **options):
    model = _model()
    opt = hfoptim.AdaLo(model.parameters(), **{**HP, **options})
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        opt.step(loss=loss * scale_loss)
    return model, opt


def test_refuses_to_step_without_a_loss():
    model = _model()
    opt = hfoptim.AdaLo(model.parameters())
    _loss(model).backward()
    before = _params(model)
    with pytest.raises(RuntimeError, match="loss"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def test_closure_path_equals_loss_argument_path():
    reference, _ = _run_with_loss_argument()
    model = _model()
    opt = hfoptim.AdaLo(model.parameters(), **HP)

    def closure():
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    for _ in range(5):
        returned = opt.step(closure)
        assert isinstance(returned, torch.Tensor)
    for a, b in zip(_params(model), _params(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_set_loss_path_equals_loss_argument_path():
    reference, _ = _run_with_loss_argument()
    model = _model()
    opt = hfoptim.AdaLo(model.parameters(), **HP)
    for _ in range(5):
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        opt.set_loss(loss)
        opt.step()
    for a, b in zip(_params(model), _params(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_loss_value_drives_the_step():
    """Same gradients, different loss: the adversarial step shrinks when the loss grows, the
    compliant step grows; the loss EMA holds (1 - b2) / (2 + L) after one step."""
    one, opt = _run_with_loss_argument(steps=1)
    loss = float(_loss(_model()).detach())
    for p in one.parameters():
        torch.testing.assert_close(opt.state[p]["loss_ema"], torch.tensor(0.1 / (2 + loss), dtype=torch.float64))
    start = _params(_model())
    for mode, bigger_loss_moves in (("adversarial", "less"), ("compliant", "more")):
        low, _ = _run_with_loss_argument(steps=3, mode=mode, eps=0.0)
        high, _ = _run_with_loss_argument(steps=3, scale_loss=10.0, mode=mode, eps=0.0)
        moved_low = sum(float((a - s).norm()) for a, s in zip(_params(low), start))
        moved_high = sum(float((a - s).norm()) for a, s in zip(_params(high), start))
        assert (moved_high < moved_low) if bigger_loss_moves == "less" else (moved_high > moved_low)


@pytest.mark.parametrize("enabled", [True, False], ids=["scaler-enabled", "scaler-disabled"])
def test_grad_scaler_passes_the_loss_through(enabled):
    """torch.amp.GradScaler refuses closures but forwards keyword arguments to optimizer.step:
    ``scaler.step(optimizer, loss=loss.detach())`` (the UNSCALED loss) reaches the rule. The
    scale is a power of two, so unscaling is exact and the run equals the plain loss= run."""
    reference, _ = _run_with_loss_argument()
    model = _model()
    opt = hfoptim.AdaLo(model.parameters(), **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=enabled)
    assert scaler.is_enabled() == enabled
    for _ in range(5):
        opt.zero_grad()
        loss = _loss(model)
        scaler.scale(loss).backward()
        scaler.step(opt, loss=loss.detach())
        scaler.update()
    if enabled:
        assert scaler.get_scale() == 2.0**12  # no inf/NaN: every step ran
    for a, b in zip(_params(model), _params(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the loss really reaches the rule through the scaler: another loss, another result
    other = _model()
    opt = hfoptim.AdaLo(other.parameters(), **HP)
    other_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=enabled)
    loss = _loss(other)
    other_scaler.scale(loss).backward()
    other_scaler.step(opt, loss=loss.detach() * 3)
    assert not all(torch.equal(a, b) for a, b in zip(_params(other), _params(_run_with_loss_argument(steps=1)[0])))


def test_grad_scaler_refuses_a_closure():
    model = _model()
    opt = hfoptim.AdaLo(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model)).backward()
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: _loss(model))


def test_lr_is_ignored_and_a_set_lr_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hfoptim.AdaLo([torch.nn.Parameter(torch.zeros(2))])  # default lr: no warning
    with pytest.warns(UserWarning, match="ignores lr"):
        model, _ = _run_with_loss_argument(lr=5e-5)
    reference, _ = _run_with_loss_argument()
    for a, b in zip(_params(model), _params(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for bad in ({"kappa": 0.0}, {"mode": "aggressive"}, {"betas": (0.9, 1.0)}, {"eps": -1.0}):
        with pytest.raises(HyperparameterError, match=next(iter(bad))):
            hfoptim.AdaLo(p, **bad)
    opt = hfoptim.AdaLo(p)
    p[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="> -1"):
        opt.step(loss=-1.5)
    with pytest.raises(ValueError, match="non-finite"):
        opt.step(loss=float("nan"))
