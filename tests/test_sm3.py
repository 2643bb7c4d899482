"""SM3 (arXiv 1901.11150): paper-literal reference, pytorch_optimizer's SM3, storage forms.

The authors' code, google-research/google-research sm3/sm3.py (TensorFlow 1, read at commit
0c1bbe5fc971a1de1a427debc814e66ab4f1e7fa, not run: no TensorFlow here), computes
``nu = min_d acc_d + g^2``, ``u = (1-m) g rsqrt(nu + 1e-30)``, ``b <- m b + u``, ``acc_d = max nu``
over the other dims, Adagrad for rank <= 1: the paper reference below with ``beta = 0`` and
``eps = 1e-30`` (the first parity case family), so it is covered by it. It has no EMA ``beta``.
"""

import pytest
import torch
from pytorch_optimizer import SM3 as PTOSM3

import hfoptim
from tests.harness import check_parity, gradients
from tests.references.sm3 import SM3Ref

SHAPES = [(7,), (6, 4), (2, 3, 2, 2), (13, 11), ()]
HP = dict(lr=0.05, momentum=0.7, eps=1e-20, weight_decay=0.02)


@pytest.mark.parametrize("beta", [0.0, 0.9], ids=["sm3-ii", "ema"])
@pytest.mark.parametrize("momentum", [0.0, 0.7], ids=["plain", "momentum"])
def test_sm3_matches_paper_reference(beta, momentum):
    hp = {**HP, "momentum": momentum, "beta": beta}
    check_parity(
        lambda params, foreach: hfoptim.SM3(params, foreach=foreach, **hp),
        lambda: SM3Ref(**hp),
        shapes=SHAPES,
        steps=12,
    )


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("options", [dict(momentum=0.0), dict(momentum=0.6, beta=0.8)], ids=["sm3-ii", "mom-ema"])
def test_sm3_matches_pytorch_optimizer(foreach, options):
    """pytorch_optimizer's SM3 (installed version; rsqrt(nu + eps) * g, momentum by lerp,
    accumulators shaped [1]*d + [n_d] + ...): same parameters and accumulators. Differences:
    none in the update; it has no weight decay (0 here) and keeps a momentum buffer even at
    momentum 0 (we keep none)."""
    shapes = [(7,), (6, 4), (2, 3, 2, 2), (13, 11)]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    a = hfoptim.SM3(ours, foreach=foreach, lr=0.07, eps=1e-30, **options)
    b = PTOSM3(theirs, lr=0.07, eps=1e-30, **options)
    for t in range(1, 16):
        for p, q, g in zip(ours, theirs, gradients([p.detach() for p in theirs], t)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
            their = b.state[q]
            torch.testing.assert_close(a.state[p]["acc_row"], their["accumulator_0"].reshape(-1 if p.dim() else ()))
            if p.dim() >= 2:
                rest = torch.cat([their[f"accumulator_{d}"].reshape(-1) for d in range(1, p.dim())])
                torch.testing.assert_close(a.state[p]["acc_rest"], rest)


def test_sm3_state_is_the_cover():
    w = torch.nn.Parameter(torch.randn(40, 30))
    v = torch.nn.Parameter(torch.randn(9))
    opt = hfoptim.create_optimizer([w, v], "sm3")
    w.grad, v.grad = torch.randn_like(w), torch.randn_like(v)
    opt.step()
    assert sorted(opt.state[w]) == ["acc_rest", "acc_row", "step"]
    assert opt.state[w]["acc_row"].shape == (40,) and opt.state[w]["acc_rest"].shape == (30,)
    assert opt.state[v]["acc_row"].shape == (9,)
    # the matrix's accumulators are the row and column maxima of g^2 after one step
    torch.testing.assert_close(opt.state[w]["acc_row"], (w.grad**2).amax(dim=1))
    torch.testing.assert_close(opt.state[w]["acc_rest"], (w.grad**2).amax(dim=0))
    # a state_dict round trip keeps the shapes (they are not the parameter's)
    opt2 = hfoptim.create_optimizer([w, v], "sm3")
    opt2.load_state_dict(opt.state_dict())
    torch.testing.assert_close(opt2.state[w]["acc_rest"], opt.state[w]["acc_rest"])


def test_sm3_momentum_8bit_stores_only_the_momentum():
    w = torch.nn.Parameter(torch.randn(64, 80))
    opt = hfoptim.create_optimizer([w], "sm3", state="8bit", momentum=0.9, state_min_numel=0)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["acc_rest"].dtype == torch.float32
    assert any(k.startswith("momentum_buffer.") for k in opt.state[w])


@pytest.mark.parametrize("form", ["factored", "shared", "smmf"])
def test_sm3_refuses_second_moment_forms_by_name(form):
    with pytest.raises(ValueError, match="own cover"):
        hfoptim.get_optimizer(f"sm3_{form}")


def test_sm3_8bit_without_momentum_says_there_is_nothing_to_compress():
    with pytest.raises(ValueError, match="momentum_buffer exists only"):
        hfoptim.get_optimizer("sm3_8bit")
