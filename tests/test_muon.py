"""Muon: float64 paper-literal reference, torch.optim.Muon, Moonlight's form, roles and storage.

Anchors and every intended difference:

* torch.optim.Muon (torch 2.13, ``torch/optim/_muon.py``): same momentum (lerp), Nesterov,
  coefficients, bf16 Newton-Schulz and decoupled weight decay; matched to float rounding with
  ``update_scale="original"`` (torch's default) and with ``"match_rms_adamw"`` (its option).
  Differences: our default scale is ``match_rms_adamw``; torch refuses non-2-D parameters, we
  view a 4-D kernel as ``(out, in*k*k)`` (Jordan's muon.py) and give <= 1-D parameters AdamW.
* Moonlight (MoonshotAI/Moonlight examples/toy_train.py @ abaa96ec0096e095b3195f7c0f1b3ffed945b281):
  ``momentum_form="sum"`` is its ``B = mu B + g``, ``g + mu B``; its NS normalises by
  ``||X|| + 1e-7`` where torch and we clamp the norm at 1e-7 (equal unless the norm is ~1e-7); its
  AdamW part adds eps before the bias correction of ``sqrt(v)`` (eps scaled by ``sqrt(1 - b2^t)``),
  ours is torch's AdamW. Checked against a float64 transcription of those formulas below.
* KellerJordan/Muon muon.py @ 1430c3495b60613a6bb6f035ef38456529443a14: the same iteration and
  coefficients as torch's (torch's docstring names it as its source); not run separately.
"""

from __future__ import annotations

import math

import pytest
import torch

import hfoptim
from hfoptim.rules.muon import newton_schulz
from tests.harness import check_parity, gradients
from tests.references.muon import MuonRef, newton_schulz_literal

#: non-default everywhere (torch's lerp momentum, a different cubic iteration, ...)
HP = dict(
    lr=0.03,
    weight_decay=0.07,
    momentum=0.8,
    ns_steps=4,
    ns_eps=1e-6,
    betas=(0.8, 0.9),
    eps=1e-6,
)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"update_scale": "original"},
        {"nesterov": False},
        {"momentum_form": "sum"},
        {"ns_coefficients": (1.5, -0.5, 0.0), "ns_steps": 7},  # the classical cubic Newton-Schulz
    ],
    ids=["moonlight-scale", "original-scale", "no-nesterov", "sum-momentum", "cubic-ns"],
)
def test_muon_matches_float64_reference(options):
    """Matrices (2-D, 4-D, odd sizes, tall and wide) by Newton-Schulz in float64 (``ns_dtype="param"``),
    the vector by AdamW, params and state after every step, both engine paths."""
    check_parity(
        lambda params, foreach: hfoptim.Muon(params, foreach=foreach, ns_dtype="param", **{**HP, **options}),
        lambda: MuonRef(**{**HP, **options}),
        shapes=[(7,), (6, 4), (2, 3, 2, 2), (13, 11), (5, 9)],
    )


def _torch_pair(scale: str, shapes, foreach: bool, steps: int = 12):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    a = hfoptim.Muon(ours, lr=0.02, weight_decay=0.05, momentum=0.9, update_scale=scale, foreach=foreach)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.05, momentum=0.9, adjust_lr_fn=scale)
    for t in range(1, steps + 1):
        grads = gradients([p.detach() for p in theirs], t)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], rtol=0, atol=0)
            # torch adds the bf16 update with alpha = -lr*s; we scale it in fp32 first: rounding only
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    return a, b


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("scale", ["original", "match_rms_adamw"])
def test_muon_matches_torch_muon(scale, foreach):
    """torch.optim.Muon, bf16 Newton-Schulz (both defaults): momentum bit for bit, parameters to
    fp32 rounding, tall, wide and one-row matrices."""
    _torch_pair(scale, [(13, 7), (6, 20), (1, 9), (32, 32)], foreach)


def test_newton_schulz_is_torch_iteration_and_orthogonalizes():
    """Our iteration is torch's, bit for bit in bf16; its singular values land in Jordan's band."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(1)
    G = torch.randn(48, 20)
    ours = newton_schulz(G.bfloat16(), 5, (3.4445, -4.7750, 2.0315), 1e-7)
    theirs = _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)
    singular = torch.linalg.svdvals(ours.float())
    assert float(singular.min()) > 0.5 and float(singular.max()) < 1.3
    # float64, many classical cubic steps: converges to U V^T
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    exact = newton_schulz(G.double(), 60, (1.5, -0.5, 0.0), 1e-7)
    torch.testing.assert_close(exact, U @ Vh, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(exact, newton_schulz_literal(G.double(), 60, (1.5, -0.5, 0.0), 1e-7))


def _moonlight_step(p, g, state, lr, wd, mu, betas, eps, t):
    """MoonshotAI/Moonlight examples/toy_train.py (@abaa96e) formulas in float64: sum momentum,
    Nesterov, NS over ||X|| + 1e-7, 0.2 sqrt(max(A, B)); AdamW with eps added before the bias
    correction."""
    if p.dim() >= 2:
        B = state["momentum_buffer"] = mu * state.get("momentum_buffer", torch.zeros_like(p)) + g
        u = g + mu * B
        X = u.T if u.shape[0] > u.shape[1] else u
        X = X / (torch.linalg.matrix_norm(X) + 1e-7)
        for _ in range(5):
            A = X @ X.T
            X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
        O = X.T if u.shape[0] > u.shape[1] else X
        p.mul_(1 - lr * wd).sub_(lr * 0.2 * math.sqrt(max(p.shape)) * O)
        return
    b1, b2 = betas
    m = state["exp_avg"] = b1 * state.get("exp_avg", torch.zeros_like(p)) + (1 - b1) * g
    v = state["exp_avg_sq"] = b2 * state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - b2) * g * g
    scale = (1 - b1**t) / (1 - b2**t) ** 0.5
    p.mul_(1 - lr * wd).sub_(lr / scale * m / (eps + v.sqrt()))


def test_muon_matches_moonlight_formulas():
    """Moonlight's Muon (sum momentum, its defaults: lr 1e-3 scale, wd 0.1, betas (0.9, 0.95)),
    float64: equal up to the two eps placements named in the module docstring (1e-6 relative)."""
    torch.manual_seed(2)
    shapes = [(12, 5), (4, 9), (9,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    ref = [x.clone() for x in init]
    states = [{} for _ in shapes]
    opt = hfoptim.Muon(ours, lr=2e-2, weight_decay=0.1, momentum_form="sum", ns_dtype="param")
    for t in range(1, 11):
        grads = gradients(ref, t)
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for p, g, s in zip(ref, grads, states):
            _moonlight_step(p, g, s, 2e-2, 0.1, 0.95, (0.9, 0.95), 1e-8, t)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-8)


def test_auto_split_by_dimension_and_explicit_groups():
    """A plain parameter list: >= 2-D Muon, the rest AdamW (two groups, param_names kept); an
    explicit algorithm='muon' group of vectors is refused with the fix."""
    w, c, b = (torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (2, 3, 2, 2), (4,)])
    opt = hfoptim.Muon([{"params": [w, b, c], "param_names": ["w", "b", "c"], "lr": 0.1}])
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    assert opt.param_groups[0]["params"] == [w, c] and opt.param_groups[0]["param_names"] == ["w", "c"]
    assert opt.param_groups[1]["params"] == [b] and opt.param_groups[1]["lr"] == 0.1
    for p in (w, b, c):
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[w]) == {"step", "momentum_buffer"}
    assert set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(ValueError, match=r"algorithm='muon' orthogonalizes matrices.*\(4,\).*algorithm='adamw'"):
        hfoptim.Muon([{"params": [b], "algorithm": "muon"}])
    only_vectors = hfoptim.Muon([b])
    assert [g["algorithm"] for g in only_vectors.param_groups] == ["adamw"]


def test_state_dict_round_trip_keeps_groups():
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4), (4,)]]
    opt = hfoptim.create_optimizer(params, "muon_8bit", state_min_numel=0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    twin = hfoptim.create_optimizer(params, "muon_8bit", state_min_numel=0)
    twin.load_state_dict(opt.state_dict())
    assert [g["algorithm"] for g in twin.param_groups] == ["muon", "adamw"]
    assert torch.equal(twin.state[params[0]]["momentum_buffer.codes"], opt.state[params[0]]["momentum_buffer.codes"])


@pytest.mark.parametrize("form", ["8bit", "bf16"])
def test_low_precision_momentum_tracks_fp32_twin(form):
    """Muon's momentum in 8-bit (signed dynamic code, blocks) and bf16: stored compressed, the
    parameters stay within a small distance of the fp32 twin over 30 steps (the orthogonalized
    update has unit-scale singular values, so a relative error in the momentum moves it little)."""
    torch.manual_seed(4)
    shapes = [(64, 96), (96,)]
    init = [torch.randn(s) for s in shapes]
    low = [torch.nn.Parameter(x.clone()) for x in init]
    full = [torch.nn.Parameter(x.clone()) for x in init]
    a = hfoptim.create_optimizer(low, f"muon_{form}", lr=1e-2, state_min_numel=0, ns_dtype="fp32")
    b = hfoptim.create_optimizer(full, "muon", lr=1e-2, ns_dtype="fp32")
    for t in range(1, 31):
        grads = gradients([p.detach() for p in full], t)
        for p, q, g in zip(low, full, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    keys = set(a.state[low[0]])
    if form == "8bit":
        assert a.state[low[0]]["momentum_buffer.codes"].dtype == torch.uint8, keys
    else:
        assert a.state[low[0]]["momentum_buffer.bf16"].dtype == torch.bfloat16, keys
    moved = (full[0].detach() - init[0]).norm()
    gap = (low[0] - full[0]).detach().norm()
    assert float(gap) < 0.05 * float(moved), (float(gap), float(moved))


def test_orthogonalization_runs_once_per_matrix():
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4), (5, 3), (4,)]]
    for foreach in (True, False):
        opt = hfoptim.Muon(params, foreach=foreach)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        runs = [x for call in opt.layout.stats.matrix_runs for x in call]
        assert runs == [1] * 4  # 2 matrices x 2 steps, never the vector


def test_bf16_parameters_step_in_fp32():
    p = torch.nn.Parameter(torch.randn(8, 6).bfloat16())
    ref = torch.nn.Parameter(p.detach().float().clone())
    a, b = hfoptim.Muon([p], lr=0.01), hfoptim.Muon([ref], lr=0.01)
    for _ in range(3):
        g = torch.randn(8, 6)
        p.grad, ref.grad = g.bfloat16(), g.bfloat16().float()
        a.step()
        b.step()
        ref.data = ref.data.bfloat16().float()
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.float(), ref.detach(), rtol=1e-2, atol=1e-2)
