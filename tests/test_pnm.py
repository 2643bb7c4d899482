import pytest
import torch
from pytorch_optimizer import PNM as POPNM
from pytorch_optimizer import AdaPNM as POAdaPNM

import hfoptim
from tests.anchor import compare_with_anchor
from tests.harness import check_parity, gradients
from tests.references.pnm import AdaPNMRef, PNMRef

PNM_HP = dict(lr=5e-2, betas=(0.8, 0.6), weight_decay=0.05)
ADAPNM_HP = dict(lr=2e-2, betas=(0.8, 0.95, 0.6), eps=1e-6, weight_decay=0.05)


def test_pnm_matches_paper_reference():
    check_parity(lambda ps, foreach: hfoptim.PNM(ps, foreach=foreach, **PNM_HP), lambda: PNMRef(**PNM_HP))


@pytest.mark.parametrize("amsgrad", [True, False])
def test_adapnm_matches_paper_reference(amsgrad):
    check_parity(
        lambda ps, foreach: hfoptim.AdaPNM(ps, foreach=foreach, amsgrad=amsgrad, **ADAPNM_HP),
        lambda: AdaPNMRef(**ADAPNM_HP, amsgrad=amsgrad),
    )


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "make, make_ref",
    [
        (lambda ps, fe: hfoptim.PNM(ps, foreach=fe, **PNM_HP), lambda: PNMRef(**PNM_HP)),
        (lambda ps, fe: hfoptim.AdaPNM(ps, foreach=fe, **ADAPNM_HP), lambda: AdaPNMRef(**ADAPNM_HP)),
    ],
    ids=["pnm", "adapnm"],
)
def test_parity_is_per_parameter(make, make_ref, foreach):
    """A parameter that gets its first gradient one step late alternates on its own parity,
    even inside one multi-tensor bucket with parameters on the other parity."""
    init = [
        torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i, s in enumerate([(5,), (3, 4)])
    ]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    refs_p = [x.clone() for x in init]
    opt, refs = make(params, foreach), [make_ref(), make_ref()]
    for t in range(1, 12):
        grads = gradients(refs_p, t)
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 1 and t == 1) else g.clone()
        opt.step()
        for i, (ref, rp, g) in enumerate(zip(refs, refs_p, grads)):
            if not (i == 1 and t == 1):
                ref.step(rp, g.clone())
        if t > 1:
            assert int(opt.state[params[1]]["step"]) == t - 1
        for p, rp, ref in zip(params, refs_p, refs):
            torch.testing.assert_close(p.detach(), rp, rtol=1e-9, atol=1e-12)
            for key, value in ref.state.items():
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("betas", [(1.0, 1.0), (0.9, -0.1), (0.9,), (0.9, float("inf"))])
def test_pnm_rejects_bad_betas(betas):
    with pytest.raises(hfoptim.HyperparameterError, match="betas"):
        hfoptim.PNM([torch.nn.Parameter(torch.zeros(2))], betas=betas)


def test_adapnm_rejects_beta2_of_one():
    with pytest.raises(hfoptim.HyperparameterError, match="betas"):
        hfoptim.AdaPNM([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0, 1.0))


def test_defaults_follow_official_code():
    p = [torch.nn.Parameter(torch.zeros(2))]
    g = hfoptim.PNM(p).param_groups[0]
    assert (g["betas"], g["weight_decay"], g["weight_decay_mode"]) == ((0.9, 1.0), 0.0, "decoupled")
    g = hfoptim.AdaPNM(p).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["amsgrad"], g["weight_decay_mode"]) == (
        1e-3,
        (0.9, 0.999, 1.0),
        1e-8,
        True,
        "decoupled",
    )


def test_pnm_matches_pytorch_optimizer():
    """Anchor: pytorch_optimizer.PNM computes the same update (decoupled decay); exact."""
    compare_with_anchor(
        lambda ps: hfoptim.PNM(ps, **PNM_HP),
        lambda ps: POPNM(ps, **PNM_HP),
        state_pairs=(("pos_momentum", "pos_momentum"), ("neg_momentum", "neg_momentum")),
    )


@pytest.mark.parametrize("amsgrad", [True, False])
def test_adapnm_matches_pytorch_optimizer(amsgrad):
    """Anchor: pytorch_optimizer.AdaPNM (``ams_bound`` = our ``amsgrad``).

    Intended differences: pytorch_optimizer divides (sqrt(v) + eps) by sqrt(1 - b2^t), i.e. its
    eps is eps / sqrt(1 - b2^t) in the official code's form we follow, and adds 1e-15 to v before
    the root; compared at eps = 0, where only the 1e-15 remains."""
    hp = {**ADAPNM_HP, "eps": 0.0}
    pairs = [("exp_avg", "exp_avg"), ("neg_exp_avg", "neg_exp_avg"), ("exp_avg_sq", "exp_avg_sq")]
    if amsgrad:
        pairs.append(("max_exp_avg_sq", "max_exp_avg_sq"))
    compare_with_anchor(
        lambda ps: hfoptim.AdaPNM(ps, amsgrad=amsgrad, **hp),
        lambda ps: POAdaPNM(ps, ams_bound=amsgrad, **hp),
        rtol=1e-7,
        atol=1e-12,
        state_pairs=tuple(pairs),
    )
