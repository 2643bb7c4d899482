"""AdEMAMix against its paper-literal reference and the installed anchors.

Intended differences from the anchors:
* pytorch_optimizer.AdEMAMix has one warm-up length ``t_alpha_beta3`` for both schedulers; it
  equals ours with ``t_alpha == t_beta3``. It divides ``sqrt(v)/sqrt(bc2)``, we take
  ``sqrt(v/bc2)`` (equal up to rounding). Its ``weight_decouple=True`` is our default decoupled
  decay.
* bitsandbytes.optim.AdEMAMix (optim_bits=32) runs on CPU here; it computes in fp32 only and keeps
  ``[m1, m2]`` stacked in ``state1`` and ``v`` in ``state2``; it is compared in fp32 with an fp32
  tolerance.
"""

import warnings

import pytest
import torch

import hfoptim
from hfoptim.core.hparams import HyperparameterError
from hfoptim.rules.ademamix import beta3_at
from tests.harness import SHAPES, check_parity, gradients
from tests.references.ademamix import AdEMAMixRef

HP = dict(lr=2e-2, betas=(0.85, 0.99, 0.995), alpha=3.5, eps=1e-6, weight_decay=0.05)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"t_alpha": 7, "t_beta3": 13},
        {"t_alpha": 11},
        {"t_beta3": 9.5},
        {"t_alpha": 15, "t_beta3": 6, "denominator": "atan2"},
    ],
    ids=["no-warmup", "both-warmups", "alpha-warmup", "beta3-warmup", "atan2"],
)
def test_ademamix_matches_paper_reference(options):
    check_parity(
        lambda params, foreach: hfoptim.AdEMAMix(params, foreach=foreach, **HP, **options),
        lambda: AdEMAMixRef(**HP, **options),
    )


def test_beta3_schedule_endpoints_and_limits():
    b1, b3 = 0.9, 0.9999
    assert beta3_at(1, b1, b3, None) == b3
    assert abs(beta3_at(0, b1, b3, 100) - b1) < 1e-15  # starts at beta1
    assert abs(beta3_at(100, b1, b3, 100) - b3) < 1e-15  # reaches beta3 at T
    assert beta3_at(500, b1, b3, 100) == b3  # stays there
    values = [beta3_at(t, b1, b3, 100) for t in range(1, 101)]
    assert values == sorted(values)
    assert beta3_at(5, 0.99, 0.9, 10) == 0.9  # b3 <= b1: constant b3
    assert 0 < beta3_at(5, 0.0, 0.9, 10) < 0.9  # b1 = 0: the formula's limit, no log(0)


def test_bad_hyperparameters_are_named():
    p = [torch.nn.Parameter(torch.zeros(2))]
    bad_values = [{"t_alpha": 0}, {"t_beta3": -5}, {"alpha": -1.0}, {"betas": (0.9, 0.999)}, {"betas": (0.9, 0.9, 1.0)}]
    for bad in bad_values:
        with pytest.raises(HyperparameterError, match=next(iter(bad))):
            hfoptim.AdEMAMix(p, **bad)


def _initial():
    return [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]


def _run_pair(ours, theirs, params_a, params_b, steps):
    for t in range(1, steps + 1):
        grads = gradients([p.detach() for p in params_b], t)
        for a, b, g in zip(params_a, params_b, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        yield t


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("warmup", [None, 12])
def test_ademamix_matches_pytorch_optimizer(foreach, warmup):
    from pytorch_optimizer import AdEMAMix as PoAdEMAMix

    init = [x.double() for x in _initial()]
    ours_p = [torch.nn.Parameter(x.clone()) for x in init]
    theirs_p = [torch.nn.Parameter(x.clone()) for x in init]
    ours = hfoptim.AdEMAMix(ours_p, foreach=foreach, t_alpha=warmup, t_beta3=warmup, **HP)
    theirs = PoAdEMAMix(theirs_p, foreach=foreach, t_alpha_beta3=warmup, weight_decouple=True, **HP)
    for _ in _run_pair(ours, theirs, ours_p, theirs_p, 30):
        for a, b in zip(ours_p, theirs_p):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            for key in ("exp_avg", "exp_avg_slow", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[a][key], theirs.state[b][key], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("schedules", [{}, {"t_alpha": 7, "t_beta3": 13}], ids=["no-warmup", "warmups"])
def test_ademamix_matches_bitsandbytes_32bit(schedules):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb

    init = _initial()
    ours_p = [torch.nn.Parameter(x.clone()) for x in init]
    theirs_p = [torch.nn.Parameter(x.clone()) for x in init]
    ours = hfoptim.AdEMAMix(ours_p, **HP, **schedules)
    theirs = bnb.optim.AdEMAMix(theirs_p, optim_bits=32, **HP, **schedules)
    for _ in _run_pair(ours, theirs, ours_p, theirs_p, 20):
        for a, b in zip(ours_p, theirs_p):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
            stacked = theirs.state[b]["state1"]
            torch.testing.assert_close(ours.state[a]["exp_avg"], stacked[0], rtol=2e-5, atol=1e-6)
            torch.testing.assert_close(ours.state[a]["exp_avg_slow"], stacked[1], rtol=2e-5, atol=1e-6)
            torch.testing.assert_close(ours.state[a]["exp_avg_sq"], theirs.state[b]["state2"], rtol=2e-5, atol=1e-6)
