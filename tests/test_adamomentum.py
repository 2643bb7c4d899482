"""AdaMomentum (arXiv 2106.11514) against its paper-literal float64 reference, both eps readings."""

import pytest
import torch

import hfoptim
from tests.harness import check_parity
from tests.references.adamomentum import AdaMomentumRef

HP = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.05)


@pytest.mark.parametrize("eps_mode", ["accumulate", "denominator"])
def test_adamomentum_matches_paper_reference(eps_mode):
    check_parity(
        lambda params, foreach: hfoptim.AdaMomentum(params, foreach=foreach, eps_mode=eps_mode, **HP),
        lambda: AdaMomentumRef(**HP, eps_mode=eps_mode),
    )


def test_the_two_eps_readings_agree_at_zero_eps_and_differ_otherwise():
    """The readings differ only by where eps enters; at eps = 0 they are the same algorithm."""
    hp = {**HP, "eps": 0.0}
    check_parity(
        lambda params, foreach: hfoptim.AdaMomentum(params, foreach=foreach, eps_mode="denominator", **hp),
        lambda: AdaMomentumRef(**hp, eps_mode="accumulate"),
    )
    with pytest.raises(AssertionError):
        check_parity(
            lambda params, foreach: hfoptim.AdaMomentum(params, foreach=foreach, eps_mode="denominator", **HP),
            lambda: AdaMomentumRef(**HP, eps_mode="accumulate"),
            steps=3,
        )


def test_second_moment_tracks_the_momentum_not_the_gradient():
    """Alternating gradients +-G: Adam's v grows to G^2, AdaMomentum's stays at the (small)
    squared momentum, so its steps are larger than Adam's along a direction that reverses."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = hfoptim.AdaMomentum([p], betas=(0.9, 0.999), eps=0.0, eps_mode="denominator")
    m = v = 0.0
    for t in range(1, 6):
        g = 1.0 if t % 2 else -1.0
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * m * m
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor([v], dtype=torch.float64))
    assert v < 0.001 * 5 * 0.1**2 * 1.01  # far below the g^2 EMA (about 0.005)


def test_defaults_and_bad_eps_mode():
    opt = hfoptim.AdaMomentum([torch.nn.Parameter(torch.zeros(3))])
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["eps_mode"]) == (1e-3, (0.9, 0.999), 1e-8, "accumulate")
    assert group["weight_decay"] == 0.0 and group["weight_decay_mode"] == "decoupled"
    with pytest.raises(ValueError, match="eps_mode"):
        hfoptim.AdaMomentum([torch.nn.Parameter(torch.zeros(3))], eps_mode="inside")
