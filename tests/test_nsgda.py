"""nSGDA against its paper-literal (seed-form) reference. No installed library implements it."""

import pytest
import torch

import hfoptim
from tests.harness import check_parity
from tests.references.nsgda import NSGDARef

HP = dict(lr=3e-2, momentum=0.8, eps=1e-5, weight_decay=0.2)


@pytest.mark.parametrize(
    "options",
    [{}, {"weight_decay_mode": "decoupled"}, {"weight_decay_mode": "cautious"}, {"momentum": 0.0}],
    ids=["l2-default", "decoupled", "cautious", "no-momentum"],
)
def test_nsgda_matches_reference(options):
    check_parity(
        lambda params, foreach: hfoptim.NSGDA(params, foreach=foreach, **{**HP, **options}),
        lambda: NSGDARef(**{**HP, **options}),
    )


def test_each_tensor_moves_by_lr_in_norm():
    """With eps = 0 and no weight decay, each tensor's step has L2 norm exactly lr."""
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(3,), (4, 5), (2, 3, 4)]]
    before = [p.detach().clone() for p in params]
    opt = hfoptim.NSGDA(params, lr=0.1, eps=0.0, weight_decay=0.0)
    for p in params:
        p.grad = torch.randn_like(p) * 100
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(torch.linalg.vector_norm(p.detach() - b), torch.tensor(0.1, dtype=torch.float64))


def test_defaults():
    group = hfoptim.NSGDA([torch.nn.Parameter(torch.zeros(2))]).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["eps"]) == (4e-5, 0.9, 1e-2, 1e-8)
    assert group["weight_decay_mode"] == "l2"
