import pytest
import torch
from pytorch_optimizer import AdaNorm as POAdaNorm

import hfoptim
from tests.anchor import compare_with_anchor
from tests.harness import check_parity
from tests.references.adanorm import AdaNormRef

HP = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-6, gamma=0.7, weight_decay=0.05)


def shrinking_gradients(params, step, seed=0):
    """Gradients whose norm shrinks over time, so the norm correction (e_t > ||g_t||) fires."""
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    scale = 3.0 if step % 4 == 1 else 0.2
    return [scale * (0.3 * p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype)) for p in params]


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_adanorm_matches_paper_reference(mode):
    check_parity(
        lambda params, foreach: hfoptim.AdaNorm(params, foreach=foreach, weight_decay_mode=mode, **HP),
        lambda: AdaNormRef(**HP, weight_decay_mode=mode),
        grads_fn=shrinking_gradients,
    )


def test_adanorm_correction_really_fires_and_zero_gradient_is_safe():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = hfoptim.AdaNorm([p], gamma=0.5)
    p.grad = torch.full((4,), 2.0, dtype=torch.float64)  # ||g|| = 4 -> e = 2 (< ||g||)
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_grad_norm"], torch.tensor(2.0, dtype=torch.float64))
    p.grad = torch.full((4,), 0.5, dtype=torch.float64)  # ||g|| = 1 -> e = 1.5 > 1: g scaled by 1.5
    m_before = opt.state[p]["exp_avg"].clone()
    opt.step()
    expected = 0.9 * m_before + 0.1 * 1.5 * p.grad
    torch.testing.assert_close(opt.state[p]["exp_avg"], expected)
    p.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg"]).all()


def test_adanorm_norm_state_is_one_number_per_tensor():
    p = torch.nn.Parameter(torch.randn(5, 6))
    opt = hfoptim.AdaNorm([p])
    p.grad = torch.randn(5, 6)
    opt.step()
    assert opt.state[p]["exp_grad_norm"].shape == ()
    assert opt.state[p]["exp_grad_norm"].dtype == torch.float32


def test_adanorm_defaults_follow_paper():
    opt = hfoptim.AdaNorm([torch.nn.Parameter(torch.zeros(3))])
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["gamma"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 0.95, 1e-8, 0.0)
    assert g["weight_decay_mode"] == "l2"


def test_adanorm_matches_pytorch_optimizer():
    """Anchor: pytorch_optimizer.AdaNorm (its r = our gamma), coupled decay, betas set to ours.

    Intended differences: pytorch_optimizer adds eps to the uncorrected sqrt(v) and 1e-15 to v
    before the root; compared at eps = 0, where only the 1e-15 remains."""
    hp = dict(lr=2e-2, betas=(0.8, 0.95), eps=0.0, weight_decay=0.05)
    compare_with_anchor(
        lambda ps: hfoptim.AdaNorm(ps, gamma=0.7, **hp),
        lambda ps: POAdaNorm(ps, r=0.7, weight_decouple=False, **hp),
        rtol=1e-9,
        atol=1e-12,
        state_pairs=(("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_var"), ("exp_grad_norm", "exp_grad_norm")),
    )
