"""Adan against its paper-literal reference and pytorch_optimizer.Adan.

Intended differences from the anchor: pytorch_optimizer keeps ``-g_prev`` as ``previous_grad``
(we keep ``g_prev`` as ``prev_grad``), calls proximal decay ``weight_decouple=False`` and decoupled
decay ``weight_decouple=True``, and divides ``sqrt(v)/sqrt(bc3)`` where we take ``sqrt(v/bc3)``
(equal up to rounding).
"""

import pytest
import torch

import hfoptim
from tests.harness import SHAPES, check_parity, gradients
from tests.references.adan import AdanRef

HP = dict(lr=2e-2, betas=(0.9, 0.85, 0.995), eps=1e-6, weight_decay=0.07)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay_mode": "proximal"},
        {"weight_decay_mode": "decoupled"},
        {"weight_decay_mode": "cautious"},
        {"weight_decay_mode": "l2"},
        {"denominator": "atan2"},
    ],
    ids=["default", "proximal", "decoupled", "cautious", "l2", "atan2"],
)
def test_adan_matches_paper_reference(options):
    check_parity(
        lambda params, foreach: hfoptim.Adan(params, foreach=foreach, **HP, **options),
        lambda: AdanRef(**HP, **options),
    )


def test_adan_default_weight_decay_mode_is_proximal():
    opt = hfoptim.Adan([torch.nn.Parameter(torch.zeros(2))])
    assert opt.param_groups[0]["weight_decay_mode"] == "proximal"
    assert opt.param_groups[0]["betas"] == (0.98, 0.92, 0.99)


def test_first_step_has_no_gradient_difference():
    p = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = hfoptim.Adan([p], **HP)
    p.grad = torch.full_like(p, 3.0)
    opt.step()
    assert torch.equal(opt.state[p]["exp_avg_diff"], torch.zeros_like(p))
    assert torch.equal(opt.state[p]["prev_grad"], p.grad)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("mode", ["proximal", "decoupled"])
def test_adan_matches_pytorch_optimizer(foreach, mode):
    from pytorch_optimizer import Adan as PoAdan

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, dtype=torch.float64, generator=gen) for s in SHAPES]
    ours_p = [torch.nn.Parameter(x.clone()) for x in init]
    theirs_p = [torch.nn.Parameter(x.clone()) for x in init]
    ours = hfoptim.Adan(ours_p, foreach=foreach, weight_decay_mode=mode, **HP)
    theirs = PoAdan(theirs_p, foreach=foreach, weight_decouple=mode == "decoupled", **HP)
    for t in range(1, 31):
        grads = gradients([p.detach() for p in theirs_p], t)
        for a, b, g in zip(ours_p, theirs_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for a, b in zip(ours_p, theirs_p):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq"):
                torch.testing.assert_close(ours.state[a][key], theirs.state[b][key], rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(ours.state[a]["prev_grad"], -theirs.state[b]["previous_grad"])
