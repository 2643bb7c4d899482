import pytest
import torch

import hfoptim
from tests.harness import check_parity, gradients
from tests.references.adamw import AdamWRef

HP = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": True}, {"denominator": "atan2"}, {"denominator": "softplus"}],
    ids=["plain", "nesterov", "atan2", "softplus"],
)
def test_adamw_matches_paper_reference(options):
    check_parity(
        lambda params, foreach: hfoptim.AdamW(params, foreach=foreach, **HP, **options),
        lambda: AdamWRef(**HP, **options),
    )


def test_adam_atan2_by_name_has_no_eps_effect():
    check_parity(
        lambda params, foreach: hfoptim.create_optimizer(params, "adam_atan2", foreach=foreach, **HP),
        lambda: AdamWRef(**HP, denominator="atan2"),
    )


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_matches_torch_adamw(foreach):
    """Anchor: torch.optim.AdamW. Intended difference: torch divides sqrt(v)/sqrt(bc2), we take
    sqrt(v/bc2); equal up to rounding."""
    torch.manual_seed(0)
    shapes = [(7,), (6, 4), (2, 3, 2, 2), (13, 11)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    a = hfoptim.AdamW(ours, foreach=foreach, **HP)
    b = torch.optim.AdamW(theirs, foreach=foreach, **HP)
    for t in range(1, 31):
        grads = gradients([p.detach() for p in theirs], t)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"])
