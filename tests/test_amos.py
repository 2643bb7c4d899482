"""Amos against its jestimator-literal reference and pytorch_optimizer.Amos.

Intended differences from pytorch_optimizer (also in the rule's docstring): it floors the second
moment as ``v + eps`` (we: ``max(v, eps)`` as jestimator; the anchor runs with its eps = 0, so
both are exact for v > 0); its eta for tensors with more than 2 dims is ``sqrt(1/shape[1])``
(we: ``sqrt(2/fan_in)``, fan_in = numel/shape[0]), so the anchor comparison uses 1-D and 2-D
tensors; its momentum averages ``lr u`` (we: ``u``; equal for a constant lr, the state differs by
the factor lr).
"""

import math

import pytest
import torch

import hfoptim
from hfoptim.core.hparams import HyperparameterError
from hfoptim.rules.amos import shape_eta
from tests.harness import SHAPES, check_parity, gradients
from tests.references.amos import AmosRef

HP = dict(lr=0.05, beta=0.95, zeta=0.4, eps=1e-30)


@pytest.mark.parametrize(
    "options",
    [{}, {"eta_gain": 1.0}, {"eta": 0.3}, {"momentum": 0.7}, {"weight_decay": 0.1, "momentum": 0.5}],
    ids=["shape-eta", "eta-gain", "fixed-eta", "momentum", "momentum-and-decoupled-wd"],
)
def test_amos_matches_jestimator_reference(options):
    check_parity(
        lambda params, foreach: hfoptim.Amos(params, foreach=foreach, **HP, **options),
        lambda: AmosRef(**HP, **options),
        steps=30,
    )


def test_amos_state_is_two_scalars_per_tensor_without_momentum():
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = hfoptim.Amos([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(opt.state[p]) == ["decay", "exp_avg_sq", "step"]
    assert opt.state[p]["exp_avg_sq"].shape == () and opt.state[p]["decay"].shape == ()
    assert opt.state[p]["decay"] > 0  # the weight-decay/step-size decay has started


def test_shape_eta():
    assert shape_eta((5,), 2.0) == 0.5
    assert shape_eta((), 2.0) == 0.5
    assert shape_eta((10, 8), 2.0) == math.sqrt(2 / 8)
    assert shape_eta((16, 3, 3, 3), 2.0) == math.sqrt(2 / 27)


def test_zero_gradient_and_zero_lr_stay_finite():
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = hfoptim.Amos([p], lr=0.0)
    for grad in (torch.zeros(3, 4), torch.randn(3, 4)):
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        assert torch.equal(p.detach(), before)
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_bad_hyperparameters_are_named():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for bad in ({"beta": 1.0}, {"zeta": -0.1}, {"eta": 0.0}, {"eta_gain": 0.0}, {"momentum": 1.0}):
        with pytest.raises(HyperparameterError, match=next(iter(bad))):
            hfoptim.Amos(params, **bad)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_amos_matches_pytorch_optimizer(foreach, momentum):
    from pytorch_optimizer import Amos as PoAmos

    shapes = [s for s in SHAPES if len(s) <= 2]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    ours_p = [torch.nn.Parameter(x.clone()) for x in init]
    theirs_p = [torch.nn.Parameter(x.clone()) for x in init]
    ours = hfoptim.Amos(ours_p, foreach=foreach, momentum=momentum, **HP)
    theirs = PoAmos(
        theirs_p,
        foreach=foreach,
        lr=HP["lr"],
        beta=HP["beta"],
        momentum=momentum,
        c_coef=HP["zeta"],
        d_coef=HP["zeta"],
        eps=0.0,
    )
    for t in range(1, 31):
        grads = gradients([p.detach() for p in theirs_p], t)
        for a, b, g in zip(ours_p, theirs_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for a, b in zip(ours_p, theirs_p):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            for key in ("exp_avg_sq", "decay"):
                torch.testing.assert_close(ours.state[a][key], theirs.state[b][key].reshape(()), rtol=1e-10, atol=0)
            if momentum:
                torch.testing.assert_close(ours.state[a]["exp_avg"] * HP["lr"], theirs.state[b]["exp_avg"])
