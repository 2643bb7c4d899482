"""Adafactor: paper-literal parity (the reference keeps R and C itself), anchors
torch.optim.Adafactor and pytorch_optimizer AdaFactor, and the precision fix measured."""

import pytest
import torch
from pytorch_optimizer import AdaFactor as PoAdaFactor

import hfoptim
from tests.harness import check_parity, gradients
from tests.references.adafactor import STATE_MAP, AdafactorRef

# non-default values; eps1 large enough to matter at 1e-9, lr above 1/sqrt(t) for t > 11 so the
# relative step switches from lr to 1/sqrt(t) within the run
CONFIGS = {
    "relative+scaled": dict(lr=0.3, decay_rate=-0.6, eps1=1e-3, eps2=1e-3, clip_threshold=0.9, weight_decay=0.1),
    "momentum+eps2floor": dict(
        lr=0.3, beta1=0.85, decay_rate=-0.7, eps1=1e-2, eps2=2.0, clip_threshold=1.3, weight_decay=0.05
    ),
    "plain-lr": dict(
        lr=0.02, beta1=0.8, decay_rate=-0.5, eps1=1e-4, relative_step=False, scale_parameter=False, clip_threshold=0.7
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_adafactor_matches_paper_reference(name):
    hp = CONFIGS[name]
    check_parity(
        lambda params, foreach: hfoptim.Adafactor(params, foreach=foreach, **hp),
        lambda: AdafactorRef(**hp),
        state_map=STATE_MAP,
    )


def test_adafactor_by_name_defaults_are_the_papers():
    opt = hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(3, 3))], "adafactor")
    group = opt.param_groups[0]
    assert (group["lr"], group["beta1"], group["decay_rate"]) == (1e-2, None, -0.8)
    assert (group["eps1"], group["eps2"], group["clip_threshold"]) == (1e-30, 1e-3, 1.0)
    assert group["relative_step"] and group["scale_parameter"] and group["weight_decay"] == 0.0


def test_adafactor_state_is_factored_and_has_no_first_moment_by_default():
    w, b = torch.nn.Parameter(torch.randn(64, 48)), torch.nn.Parameter(torch.randn(48))
    opt = hfoptim.Adafactor([w, b])
    for p in (w, b):
        p.grad = torch.randn_like(p)
    opt.step()
    assert {k: tuple(v.shape) for k, v in opt.state[w].items()} == {
        "step": (),
        "exp_avg_sq.row": (64,),
        "exp_avg_sq.col": (48,),
    }
    assert {k: tuple(v.shape) for k, v in opt.state[b].items()} == {"step": (), "exp_avg_sq": (48,)}
    opt = hfoptim.Adafactor([w], beta1=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq.row", "exp_avg_sq.col"}


def _run_against(make_theirs, ours_hp, steps=25, shapes=((7,), (6, 4), (13, 11)), state=None):
    """Our Adafactor vs an anchor in float64 on 1-D and 2-D shapes (both factor 2-D tensors the
    same way; for >2-D tensors the anchors factor the last two dims, we (shape[0], rest))."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    a, b = hfoptim.Adafactor(ours, **ours_hp), make_theirs(theirs)
    for t in range(1, steps + 1):
        grads = gradients([p.detach() for p in ours], t, 3)
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m, t=t: f"step {t}: {m}")
            if state is not None:
                state(a.state[p], b.state[q], p)


def test_adafactor_matches_torch_adafactor():
    """Anchor torch.optim.Adafactor (same relative step min(lr, 1/sqrt t), same RMS(X) scale and
    clipping). Intended differences, configured away here: torch clamps V and 1^T R at eps1
    instead of adding eps1 to G^2 (ours: eps1=0; theirs: eps1=None -> machine eps, never active
    on these gradients); torch decays weights by lr*wd, we by alpha_t*wd (wd=0 here); torch
    factors the last two dims of >2-D tensors (1-D/2-D shapes only). torch keeps row/column
    MEANS, we keep sums: R_ours = R_torch * cols."""

    def state(ours, theirs, p):
        if p.dim() == 2:
            torch.testing.assert_close(ours["exp_avg_sq.row"], theirs["row_var"].reshape(-1) * p.shape[1])
            torch.testing.assert_close(ours["exp_avg_sq.col"], theirs["col_var"].reshape(-1) * p.shape[0])
        else:
            torch.testing.assert_close(ours["exp_avg_sq"], theirs["variance"])

    _run_against(
        lambda ps: torch.optim.Adafactor(ps, lr=0.3, beta2_decay=-0.6, eps=(None, 1e-3), d=1.3, foreach=False),
        dict(lr=0.3, decay_rate=-0.6, eps1=0.0, eps2=1e-3, clip_threshold=1.3),
        state=state,
    )


@pytest.mark.parametrize("momentum", [False, True])
def test_adafactor_matches_pytorch_optimizer(momentum):
    """Anchor pytorch_optimizer AdaFactor. Intended differences: its relative step ignores lr
    (rho = min(1e-2, 1/sqrt t): ours with lr=1e-2); it averages alpha_t * U_hat in the momentum, we
    U_hat and multiply by alpha_t after, so the momentum case runs with a constant step
    (relative_step=False, scale_parameter=False); its beta2 is capped (cap set above every
    beta2_t of the run); its momentum is bf16 by default (set to float64); it factors the last
    two dims of >2-D tensors; it combines the factors as (R/mean R)^-1/2 C^-1/2 (no precision
    difference in float64; see test_precision_fix)."""
    if momentum:
        ours = dict(
            lr=0.05,
            beta1=0.8,
            decay_rate=-0.7,
            eps1=1e-3,
            clip_threshold=0.9,
            relative_step=False,
            scale_parameter=False,
            weight_decay=0.1,
        )
        theirs = dict(lr=0.05, betas=(0.8, 0.999999), relative_step=False, scale_parameter=False)
    else:
        ours = dict(lr=1e-2, decay_rate=-0.7, eps1=1e-3, eps2=0.5, clip_threshold=0.9, weight_decay=0.1)
        theirs = dict(lr=1e-2, betas=(None, 0.999999), eps2=0.5)

    def state(o, t, p):
        if p.dim() == 2:
            torch.testing.assert_close(o["exp_avg_sq.row"], t["exp_avg_sq_row"] * p.shape[1])
            torch.testing.assert_close(o["exp_avg_sq.col"], t["exp_avg_sq_col"] * p.shape[0])
        if momentum:
            torch.testing.assert_close(o["exp_avg"] * 0.05, t["exp_avg"])

    _run_against(
        lambda ps: PoAdaFactor(
            ps,
            decay_rate=ours["decay_rate"],
            eps1=1e-3,
            clip_threshold=0.9,
            weight_decay=0.1,
            momentum_dtype=torch.float64,
            foreach=False,
            **theirs,
        ),
        ours,
        state=state,
    )


def _decode_rsqrt(r, c, dtype):
    from hfoptim.core.rule import SECOND_MOMENT, Slot
    from hfoptim.core.stats import LocalStats, ParamView
    from hfoptim.state.factored import Factored

    stored = {"v.row": r.to(dtype), "v.col": c.to(dtype)}
    view = ParamView(global_shape=torch.Size((r.numel(), c.numel())))
    v_hat = Factored().decode(Slot("v", SECOND_MOMENT), stored, view, torch.float32, stats=LocalStats())
    return 1.0 / v_hat.sqrt()


def _second_moment(lo, seed=0, rows=257, cols=129):
    """G^2 + eps1 of a gradient whose row and column scales span 10^lo .. 10^2."""
    gen = torch.Generator().manual_seed(seed)
    rs = 10 ** torch.empty(rows, 1, dtype=torch.float64).uniform_(lo, 2, generator=gen)
    cs = 10 ** torch.empty(1, cols, dtype=torch.float64).uniform_(lo, 2, generator=gen)
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * rs * cs
    return g * g + 1e-30


@pytest.mark.parametrize("lo", [-3, -8])
def test_precision_fix(lo):
    """V_hat^-1/2 from the stored fp32 factors, ours ((R / 1^T R) C in fp32, one square root
    last) against the common (R / mean R)^-1/2 C^-1/2, both against float64. Measured
    (lo=-3 / -8, V down to 1e-18 / 1e-30): ours max rel. error 1.91e-7 / 1.62e-7, the common
    form in fp32 2.37e-7 / 2.33e-7, and 1.2e-2 when it runs in bf16 (pytorch_optimizer computes
    in the gradient's dtype; we always decode in fp32 at least). Bound: 2 fp32 ulps."""
    v = _second_moment(lo)
    r, c = v.sum(1), v.sum(0)
    exact = (torch.outer(r, c) / r.sum()).rsqrt()

    def err(x):
        return ((x.double() - exact) / exact).abs().max().item()

    ours = err(_decode_rsqrt(r, c, torch.float32))
    for dtype, bound in ((torch.float32, 5e-7), (torch.bfloat16, 5e-2)):
        rf, cf = (r / c.numel()).to(dtype), (c / r.numel()).to(dtype)  # the means common code keeps
        common = err((rf / rf.mean()).rsqrt().unsqueeze(1) * cf.rsqrt().unsqueeze(0))
        assert ours <= common, (dtype, ours, common)
        assert common <= bound
    assert ours <= 2 * torch.finfo(torch.float32).eps, ours


def test_factored_decode_stays_finite_beyond_fp32_range():
    """Known limit of taking the root last: where the rank-1 value of a tiny row and a tiny
    column falls below fp32's smallest normal (element magnitudes 1e-30..1e4 here, V_hat down
    to 1e-60), V_hat cannot be represented; the decode floors it at 1.2e-38 so the update stays
    finite (the common form keeps the range, rounding twice). Measured max rel. error of the
    root there: 1.0 (floored entries), 2.6e-7 for the common fp32 form."""
    v = _second_moment(-15)
    r, c = v.sum(1), v.sum(0)
    assert torch.isfinite(_decode_rsqrt(r, c, torch.float32)).all()
    zero = _decode_rsqrt(torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.float32)
    assert torch.isinf(zero).all()  # an all-zero state decodes to exactly 0


def test_adafactor_bf16_params_compute_in_fp32():
    w = torch.nn.Parameter(torch.randn(32, 16, dtype=torch.bfloat16))
    opt = hfoptim.Adafactor([w], beta1=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.state[w]["exp_avg_sq.row"].dtype == torch.float32
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    assert torch.isfinite(w.float()).all()


def test_adafactor_bad_hyperparameters():
    w = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(hfoptim.HyperparameterError, match="decay_rate"):
        hfoptim.Adafactor(w, decay_rate=0.5)
    with pytest.raises(hfoptim.HyperparameterError, match="clip_threshold"):
        hfoptim.Adafactor(w, clip_threshold=0.0)
    with pytest.raises(hfoptim.HyperparameterError, match="beta1"):
        hfoptim.Adafactor(w, beta1=1.0)
