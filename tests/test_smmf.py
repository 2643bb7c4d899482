"""SMMF: paper-literal parity (the reference keeps its own factors and sign matrix) and storage.

No installed anchor implements SMMF (pytorch_optimizer 3.x has none; the authors' code is not a
package), so the reference follows the paper's Algorithm 1 with the authors' schedules; the
stored factors and the packed sign bits are compared every step."""

import pytest
import torch

import hfoptim
from tests.harness import SHAPES, check_parity
from tests.references.smmf import STATE_MAP, SMMFRef

# (4, 9): 36 elements -> a 6x6 square; (12,): a vector -> 4x3; plus the harness shapes
SMMF_SHAPES = [*SHAPES, (4, 9), (12,)]

CONFIGS = {
    "momentum": dict(lr=2e-2, beta1=0.8, eps=1e-6, weight_decay=0.1, decay_rate=-0.8, growth_rate=0.99),
    "defaults-schedule": dict(lr=5e-3, beta1=0.95, eps=1e-5, weight_decay=0.02),
    "no-momentum": dict(lr=1e-2, beta1=None, eps=1e-7, decay_rate=-0.6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_smmf_matches_paper_reference(name):
    hp = CONFIGS[name]
    check_parity(
        lambda params, foreach: hfoptim.SMMF(params, foreach=foreach, **hp),
        lambda: SMMFRef(**hp),
        shapes=SMMF_SHAPES,
        state_map=STATE_MAP,
    )


def test_smmf_l2_mode_matches_reference_with_coupled_decay():
    """The authors' weight_decay_mode='adam': g <- g + wd p before the moments."""

    class Coupled(SMMFRef):
        def step(self, p, g):
            wd, self.wd = self.wd, 0.0
            super().step(p, g + wd * p)
            self.wd = wd

    hp = dict(lr=1e-2, beta1=0.9, weight_decay=0.05, decay_rate=-0.7, growth_rate=0.995)
    check_parity(
        lambda params, foreach: hfoptim.SMMF(params, foreach=foreach, weight_decay_mode="l2", **hp),
        lambda: Coupled(**hp),
        shapes=SMMF_SHAPES,
        state_map=STATE_MAP,
    )


def test_smmf_defaults_are_the_authors():
    opt = hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(3))], "smmf")
    g = opt.param_groups[0]
    assert (g["lr"], g["beta1"], g["eps"], g["weight_decay"]) == (1e-3, 0.9, 1e-8, 0.0)
    assert (g["decay_rate"], g["growth_rate"], g["weight_decay_mode"]) == (-0.5, 0.999, "decoupled")


def test_smmf_state_is_square_factors_and_sign_bits_for_every_shape():
    params = {
        "matrix": torch.nn.Parameter(torch.randn(64, 36)),  # 2304 = 48 x 48
        "conv": torch.nn.Parameter(torch.randn(8, 4, 3, 3)),  # 288 = 18 x 16
        "bias": torch.nn.Parameter(torch.randn(10)),  # 10 = 5 x 2
    }
    opt = hfoptim.SMMF(params.values())
    for p in params.values():
        p.grad = torch.randn_like(p)
    opt.step()
    expect = {"matrix": (48, 48), "conv": (18, 16), "bias": (5, 2)}
    for name, p in params.items():
        rows, cols = expect[name]
        shapes = {k: tuple(v.shape) for k, v in opt.state[p].items() if k != "step"}
        assert shapes == {
            "exp_avg.row": (rows,),
            "exp_avg.col": (cols,),
            "exp_avg.sign": ((p.numel() + 7) // 8,),
            "exp_avg_sq.row": (rows,),
            "exp_avg_sq.col": (cols,),
        }, name
        assert opt.state[p]["exp_avg.sign"].dtype == torch.uint8
    opt = hfoptim.SMMF(params.values(), beta1=None)
    opt.step()
    assert set(opt.state[params["matrix"]]) == {"step", "exp_avg_sq.row", "exp_avg_sq.col"}


def test_smmf_bad_hyperparameters():
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(hfoptim.HyperparameterError, match="decay_rate"):
        hfoptim.SMMF(w, decay_rate=-1.5)
    with pytest.raises(hfoptim.HyperparameterError, match="growth_rate"):
        hfoptim.SMMF(w, growth_rate=1.5)
