"""Warm-up-free step control (AdamW^2, arXiv 2505.21910) as the ``spectral_cap`` modifier:
float64 parity with a paper-literal reference on both engine paths, the power iteration's
estimate against the exact sigma1, and the cap's edge cases. No authors' code was found."""

import pytest
import torch

import hfoptim
from hfoptim.core.stats import LocalStats, ParamView
from hfoptim.modifiers.spectral import DEFAULT_TAU, top_singular_values
from tests.harness import check_parity
from tests.references.spectral_cap import SpectralCapAdamWRef

HP = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)


@pytest.mark.parametrize("tau, iters", [(0.03, 5), (0.01, 2)])
def test_spectral_cap_matches_reference(tau, iters):
    refs = []

    def make_ref():
        refs.append(SpectralCapAdamWRef(**HP, tau=tau, iters=iters))
        return refs[-1]

    check_parity(
        lambda params, foreach: hfoptim.AdamW(
            params, foreach=foreach, spectral_cap=tau, spectral_cap_iters=iters, **HP
        ),
        make_ref,
    )
    fired = [c for r in refs for c in r.capped]
    assert any(fired), "the cap never fired: the test proves nothing"
    if tau == 0.03:
        assert not all(fired), "the cap fired everywhere: the uncapped branch is untested"


def test_power_iteration_converges_to_the_exact_sigma1():
    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(13, 11), (5, 3, 2, 2), (1, 9), (40, 3)]]
    views = [ParamView.of(m) for m in mats]
    got = top_singular_values(LocalStats(), mats, views, iters=300)
    for m, s in zip(mats, got):
        exact = torch.linalg.matrix_norm(m.reshape(m.shape[0], -1), ord=2)
        torch.testing.assert_close(s, exact, rtol=1e-6, atol=0)


def test_zero_matrix_is_not_frozen_and_vectors_are_untouched():
    """LoRA's B starts at zero: sigma1(W) = 0 must not cap its step to zero. 1-D tensors are left
    alone (same trajectory as plain AdamW)."""
    b = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    vec = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    twin = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = hfoptim.AdamW([b, vec], spectral_cap=1e-6, weight_decay=0.0)
    plain = hfoptim.AdamW([twin], weight_decay=0.0)
    for t in range(3):
        b.grad = torch.full((4, 3), 1.0 + t, dtype=torch.float64)
        vec.grad = twin.grad = torch.linspace(-1, 1, 5, dtype=torch.float64)
        opt.step()
        plain.step()
    assert b.abs().min() > 0
    torch.testing.assert_close(vec, twin, rtol=0, atol=0)


def test_suffix_and_options():
    assert hfoptim.get_optimizer("adamw_spectralcap").options == {"spectral_cap": DEFAULT_TAU}
    assert "ademamix_spectralcap" in hfoptim.list_optimizers()
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="spectral_cap"):
        hfoptim.AdamW(p, spectral_cap=0.0)
    with pytest.raises(ValueError, match="spectral_cap_iters"):
        hfoptim.AdamW(p, spectral_cap=0.1, spectral_cap_iters=0)
