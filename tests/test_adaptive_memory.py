"""Adaptive memory momentum (arXiv 2510.04988): AM-SGD (`sgdm_am`) and AM-AdamW (`adamw_am`)
against the float64 references, the closed-form beta_t against the proximal two-plane model it
minimises, and the options around it."""

import pytest
import torch

import hfoptim
from tests.harness import check_parity
from tests.references.adaptive_memory import AMAdamWRef, AMSGDRef, SGDRef, beta_t

ADAM_HP = dict(lr=2e-2, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.05)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_am_sgd_matches_reference(lam):
    check_parity(
        lambda params, foreach: hfoptim.create_optimizer(
            params, "sgdm_am", foreach=foreach, lr=0.05, weight_decay=0.05, am_lambda=lam
        ),
        lambda: AMSGDRef(lr=0.05, weight_decay=0.05, am_lambda=lam),
    )


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_am_adamw_matches_reference(lam):
    check_parity(
        lambda params, foreach: hfoptim.create_optimizer(params, "adamw_am", foreach=foreach, am_lambda=lam, **ADAM_HP),
        lambda: AMAdamWRef(**ADAM_HP, am_lambda=lam),
    )


def test_sgd_matches_reference():
    check_parity(
        lambda params, foreach: hfoptim.SGDM(params, foreach=foreach, lr=0.05, momentum=0.8, weight_decay=0.05),
        lambda: SGDRef(lr=0.05, momentum=0.8, weight_decay=0.05),
    )


def _model_objective(x, x_t, g, d, lr, lam):
    """The proximal two-plane model: max of the gradient and memory planes through x_t, the
    proximal term and the pull toward repeating the previous step."""
    s = x - x_t
    planes = torch.maximum((g * s).sum(), (d * s).sum())
    return planes + (s * s).sum() / (2 * lr) + lam * ((s + lr * d) ** 2).sum() / (2 * lr)


@pytest.mark.parametrize("lam", [0.0, 0.4, 2.0])
@pytest.mark.parametrize("seed", range(6))
def test_beta_t_minimises_the_two_plane_model(lam, seed):
    """The paper's update with the closed-form beta_t is the minimiser of the proximal model:
    no mixture coefficient on a fine grid, and no random nearby point, does better."""
    gen = torch.Generator().manual_seed(seed)
    g, d = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    d = d * (0.2 + seed / 3)  # memories smaller and larger than the gradient
    x_t, lr = torch.randn(9, generator=gen, dtype=torch.float64), 0.1
    b = beta_t(g, d, lam)
    best = x_t - lr * ((b + lam) * d + (1 - b) * g) / (1 + lam)
    value = _model_objective(best, x_t, g, d, lr, lam)
    for other in torch.linspace(0, 1, 201, dtype=torch.float64):
        x = x_t - lr * ((other + lam) * d + (1 - other) * g) / (1 + lam)
        assert value <= _model_objective(x, x_t, g, d, lr, lam) + 1e-12
    for _ in range(200):
        x = best + 1e-3 * torch.randn(9, generator=gen, dtype=torch.float64)
        assert value <= _model_objective(x, x_t, g, d, lr, lam) + 1e-12


def test_beta_is_per_tensor_and_the_first_step_is_the_gradient():
    """Two tensors, their own beta_t: g = (1, 0), d = (0, 1) mixes halfway (beta 1/2); where the
    gradient points as the memory but twice as steep (g = 2 d), the larger of the two planes is
    the flatter memory plane along the step, so the memory is kept whole (beta 1)."""
    a = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = hfoptim.create_optimizer([a, b], "sgdm_am", lr=1.0)
    a.grad, b.grad = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step()  # no memory yet: d_1 = g_1
    assert torch.equal(opt.state[a]["exp_avg"], a.grad) and torch.equal(opt.state[b]["exp_avg"], b.grad)
    a.grad, b.grad = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 2.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(opt.state[a]["exp_avg"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(opt.state[b]["exp_avg"], torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_am_is_not_stepped_in_row_pieces():
    """A bound on step memory (chunk_bytes) must not cut a tensor whose beta_t is a statistic of
    the whole tensor: the step is the same as unbounded."""
    out = []
    for chunk in (0, 256):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 48, generator=gen))
        opt = hfoptim.create_optimizer([p], "adamw_am", chunk_bytes=chunk)
        for _ in range(3):
            p.grad = torch.randn(64, 48, generator=gen)
            opt.step()
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


def test_names_options_and_refusals():
    assert {"sgdm", "sgdm_am", "adamw_am"} <= set(hfoptim.list_optimizers())
    group = hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw_am").param_groups[0]
    assert group["adaptive_memory"] is True and group["am_lambda"] == 0.0
    group = hfoptim.SGDM([torch.nn.Parameter(torch.zeros(3))]).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay_mode"], group["adaptive_memory"]) == (
        1e-2,
        0.9,
        "l2",
        False,
    )
    with pytest.raises(ValueError, match="nesterov"):
        hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(3))], "adamw_am", nesterov=True)
    with pytest.raises(ValueError, match="am_lambda"):
        hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(3))], "sgdm_am", am_lambda=-1.0)
    with pytest.raises(ValueError, match="unknown"):  # no first moment to adapt
        hfoptim.get_optimizer("adafactor_am")


def test_am_8bit_stores_the_memory_compressed():
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = hfoptim.create_optimizer([p], "adamw_am_8bit", state_min_numel=0)
    for _ in range(3):
        p.grad = torch.randn(64, 80)
        opt.step()
    assert any(v.dtype == torch.uint8 for v in opt.state[p].values())
    assert torch.isfinite(p).all()


AM_CASES = "adamw_am,sgdm_am"  # the 8-bit first moment is sharded as adamw_8bit's (fast subset)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_am_sharded_fsdp2_equals_one_process(tmp_path, nproc):
    """beta_t's inner products are whole-tensor statistics: under FSDP2 (uneven rows, a tensor
    some processes hold none of) they are summed over processes, so the steps equal one process."""
    from tests.distributed.launch import run_worker, torchrun

    summary = run_worker(torchrun(nproc), "fsdp2_worker.py", ["--cases", AM_CASES], tmp_path / "o.json", timeout=600)
    assert sorted(summary["ran"]) == sorted(AM_CASES.split(","))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_am_sharded_zero_equals_one_process(tmp_path, stage):
    """The same under ZeRO-1/2/3 (flat partitions cut tensors anywhere), 3 processes."""
    from tests.distributed.launch import run_worker, torchrun

    args = ["--stage", str(stage), "--cases", AM_CASES]
    summary = run_worker(torchrun(3), "zero_worker.py", args, tmp_path / "o.json", timeout=600)
    assert sorted(summary["ran"]) == sorted(AM_CASES.split(","))
