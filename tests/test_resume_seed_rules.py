"""Save mid-run, load into a fresh optimizer, continue: identical to an uninterrupted run, for
AdEMAMix (with warm-ups), Adan, nSGDA, AdaLo (loss EMA) and Amos (scalar state, momentum)."""

import io

import pytest
import torch

import hfoptim
from tests.harness import SHAPES, gradients

CASES = {
    "ademamix": dict(lr=1e-2, t_alpha=5, t_beta3=7, weight_decay=0.1),
    "adan": dict(lr=1e-2, weight_decay=0.1, weight_decay_mode="decoupled"),
    "nsgda": dict(lr=1e-2, momentum=0.7),
    "adalo": dict(kappa=2.0, mode="compliant"),
    "amos": dict(lr=0.05, momentum=0.5),
    # issue 16: the G-L gradient history (shifted every step), eps accumulated into v
    "adagl": dict(lr=1e-2, alpha=0.6, history=3, weight_decay=0.1),
    "adamomentum": dict(lr=1e-2, eps=1e-6, weight_decay=0.1),
}


def _run(name, steps, resume_at=None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]
    opt = hfoptim.create_optimizer(params, name, **CASES[name])
    for t in range(1, steps + 1):
        if t == resume_at:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            opt = hfoptim.create_optimizer(params, name, **CASES[name])
            opt.load_state_dict(torch.load(buffer, weights_only=False))
        for p, g in zip(params, gradients([p.detach() for p in params], t)):
            p.grad = g
        opt.step(loss=2.0 / t)
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_mid_run_is_exact(name):
    for a, b in zip(_run(name, 12), _run(name, 12, resume_at=6)):
        assert torch.equal(a, b)


def test_state_of_another_rule_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    adan = hfoptim.Adan([p])
    p.grad = torch.randn(3)
    adan.step()
    with pytest.raises(ValueError, match="adan"):
        hfoptim.AdEMAMix([p]).load_state_dict(adan.state_dict())
