"""Every modifier against a paper-literal AdamW reference with the modifier applied by the
paper's formula (tests/references/modifiers.py), non-default values, both paths; plus the
pytorch_optimizer Lamb anchor for the "lamb" name (AdamW + trust ratio)."""

import pytest
import torch
from pytorch_optimizer import Lamb as POLamb

import hfoptim
from hfoptim.core.optimizer import RuleOptimizer
from hfoptim.rules.adamw import AdamWRule
from tests.anchor import compare_with_anchor
from tests.harness import check_parity, gradients
from tests.references.modifiers import ModifiedAdamWRef

HP = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


class AdamWAnyDecayRule(AdamWRule):
    """AdamW allowing every weight-decay form (AdamW itself has no proximal form); unregistered."""

    name = ""
    weight_decay_modes = ("decoupled", "cautious", "proximal", "l2")


CASES = {
    "decoupled": {"weight_decay_mode": "decoupled"},
    "l2": {"weight_decay_mode": "l2"},
    "cautious_wd": {"weight_decay_mode": "cautious", "weight_decay": 0.3},
    "proximal": {"weight_decay_mode": "proximal", "weight_decay": 0.3},
    "cautious_mask": {"cautious": True},
    "agc": {"agc": 0.9, "agc_eps": 0.05},
    "soft_clip": {"soft_clip": True},
    "soft_clip_eps": {"soft_clip": True, "soft_clip_eps": 0.05},
    "centralize": {"centralize": True},
    "trust_ratio": {"trust_ratio": True, "trust_clamp": 2.5},
    "trust_ratio_unclamped": {"trust_ratio": True, "trust_clamp": None},
    "trust_ratio_l2": {"trust_ratio": True, "weight_decay_mode": "l2"},
    "atan2": {"denominator": "atan2"},
    "softplus": {"denominator": "softplus", "softplus_beta": 20.0},
    "all_together": {
        "agc": 0.9,
        "soft_clip": True,
        "centralize": True,
        "cautious": True,
        "trust_ratio": True,
        "weight_decay_mode": "cautious",
    },
}


def make(params, foreach, options):
    return RuleOptimizer(params, AdamWAnyDecayRule, foreach=foreach, **{**HP, **options})


@pytest.mark.parametrize("case", list(CASES))
def test_modifier_matches_paper_reference(case):
    options = CASES[case]
    check_parity(lambda ps, foreach: make(ps, foreach, options), lambda: ModifiedAdamWRef(**{**HP, **options}))


@pytest.mark.parametrize("case", [c for c in CASES if c != "decoupled"])
def test_modifier_changes_the_run(case):
    """Guards against vacuous parity: with these values each modifier does change the result."""
    init = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) for s in [(6, 4), (9,)]]
    finals = []
    for options in ({}, CASES[case]):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(ps, True, options)
        for t in range(1, 6):
            for p, g in zip(ps, gradients([p.detach() for p in ps], t)):
                p.grad = g
            opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in ps]))
    assert not torch.allclose(finals[0], finals[1], rtol=1e-6, atol=1e-9)


def test_agc_leaves_small_gradients_alone_even_below_the_norm_floor():
    """NFNets triggers on the true gradient norm; the 1e-6 floor only guards the division."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = hfoptim.AdamW([p], lr=1.0, agc=1e-4, agc_eps=1e-3, weight_decay=0.0)  # max_norm = 1e-7
    p.grad = torch.full((4,), 1e-8, dtype=torch.float64)  # ||g|| = 2e-8 < max_norm: not clipped
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * p.grad, rtol=1e-12, atol=0)


def test_cautious_mask_renormalizes_by_the_whole_tensors_mean():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = hfoptim.AdamW([p], lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, cautious=True)
    p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    opt.step()  # u = sign(g): all agree with g, mask mean 1
    torch.testing.assert_close(p.detach(), -torch.sign(p.grad), rtol=1e-12, atol=0)


def test_softplus_beta_default_is_the_papers():
    opt = hfoptim.AdamW([torch.nn.Parameter(torch.zeros(2))], denominator="softplus")
    assert opt.param_groups[0]["softplus_beta"] == 50.0


@pytest.mark.parametrize(
    "bad",
    [
        {"agc": 0.0},
        {"agc": -1.0},
        {"trust_clamp": 0.0},
        {"softplus_beta": 0.0},
        {"weight_decay_mode": "proximal"},
        {"cautious": 1},
    ],
)
def test_bad_modifier_values_name_the_option(bad):
    name = next(iter(bad))
    with pytest.raises(hfoptim.HyperparameterError, match=name):
        hfoptim.AdamW([torch.nn.Parameter(torch.zeros(2))], **bad)


def test_lamb_matches_pytorch_optimizer():
    """Anchor: pytorch_optimizer.Lamb against our "lamb" (= AdamW + trust ratio).

    Configured to match: grad_averaging=True (m is an EMA), adam_debias=True (pytorch_optimizer
    otherwise divides the whole step by 1 - b1^t, outside the trust ratio), eps=0, clamp 10 both.
    Intended differences, not exercised here: pytorch_optimizer does not bias-correct v (a
    per-tensor factor the trust ratio cancels when eps = 0), adds eps to ||u|| in the ratio, and
    with weight decay multiplies p by 1 - lr wd first and takes ||p|| after that decay, keeping the
    decay outside the ratio; we follow the LAMB paper (decay inside the ratio, ||p|| before the
    step), so the anchor runs with weight_decay=0 and the paper form is checked against the
    reference above."""
    hp = dict(lr=3e-2, betas=(0.8, 0.95), weight_decay=0.0)
    compare_with_anchor(
        lambda ps: hfoptim.create_optimizer(ps, "lamb", eps=0.0, **hp),
        lambda ps: POLamb(ps, eps=0.0, grad_averaging=True, adam_debias=True, **hp),
        rtol=1e-9,
        atol=1e-12,
        state_pairs=(("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")),
    )


def test_lamb_with_decay_keeps_the_decay_inside_the_trust_ratio():
    """LAMB, arXiv 1904.00962, Algorithm 2: p <- p - lr phi(||p||) (r + wd p) / ||r + wd p||."""
    options = {"trust_ratio": True, "weight_decay": 0.5}
    check_parity(
        lambda ps, foreach: hfoptim.create_optimizer(ps, "lamb", foreach=foreach, **{**HP, **options}),
        lambda: ModifiedAdamWRef(**{**HP, **options}),
    )


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_takes_its_decay_inside_the_step_when_last_and_through_the_engine_otherwise(monkeypatch, foreach):
    """Last update modifier, the trust ratio returns ``ratio r`` and the engine skips its decay;
    followed by another one it returns ``ratio r - wd p`` for the engine's decay: the same step."""
    from hfoptim.modifiers.update import TrustRatio

    original, applied = TrustRatio.apply, []

    def run(last: bool):
        def apply(self, ctx, x, g, p):
            ctx.last_update_modifier = last
            u = original(self, ctx, x, g, p)
            applied.append(ctx.decay_applied)
            return u

        monkeypatch.setattr(TrustRatio, "apply", apply)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64)) for _ in range(2)]
        opt = hfoptim.create_optimizer(params, "lamb", weight_decay=0.3, lr=5e-2, foreach=foreach)
        for step in range(4):
            for i, p in enumerate(params):
                p.grad = torch.randn_like(p) * (i + 1) + step
            opt.step()
        return [p.detach().clone() for p in params]

    folded = run(last=True)
    assert applied and all(applied)
    applied.clear()
    through_engine = run(last=False)
    assert applied and not any(applied)
    for a, b in zip(folded, through_engine):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_soft_clip_eps_lets_a_zero_initialised_tensor_move():
    """LoRA's B starts at zero: with the source's 1e-12 floor its clipped gradient is ~1e-12;
    soft_clip_eps raises the floor of the parameter RMS."""
    moved = []
    for eps in (1e-12, 1e-3):
        p = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.float64))
        opt = hfoptim.create_optimizer([p], "adamw", lr=1.0, soft_clip=True, soft_clip_eps=eps, weight_decay=0.0)
        p.grad = torch.ones(4, 8, dtype=torch.float64)
        opt.step()
        moved.append(opt.state[p]["exp_avg"].abs().max().item())
    assert moved[0] == pytest.approx(0.1 * 1e-12)
    assert moved[1] == pytest.approx(0.1 * 1e-3)
