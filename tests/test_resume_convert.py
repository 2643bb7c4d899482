"""Resumes that keep what the user asked for (hfoptim.state.convert, RuleOptimizer.load_state_dict).

What is proven here:

* for EVERY rule and EVERY pair of storage forms it accepts, a state dict saved with one form
  and loaded by an optimizer asking another is converted: the loaded state has exactly the keys
  (so the bytes) of the form asked, the group keeps asking it, each slot holds the saved value
  decoded (exactly, for a dense target) or that value encoded by the target form, and the run
  continues; converting to fp32 and back gives the saved tensors back;
* saved parameter groups are validated at load (a missing or bad hyperparameter fails then,
  naming it, not with a KeyError at the next step); a ``step`` saved as a plain number loads
  and steps;
* ``hfoptim.convert_state_dict``: torch.optim.AdamW / Adam (L2 decay) state continues in
  hfoptim's AdamW exactly as torch continues (float64, non-default hyperparameters, both engine
  paths), into every adamw storage form; bitsandbytes' AdamW8bit state decodes to exactly what
  bitsandbytes' own ``dequantize_blockwise`` gives; what cannot be converted fails clearly.
"""

from __future__ import annotations

import io
import itertools

import pytest
import torch

import hfoptim
from hfoptim.core.hparams import HyperparameterError
from hfoptim.core.stats import LocalStats, ParamView
from hfoptim.state import CODECS, resolve

SHAPES = [(8, 6), (2, 3, 4), (10,), ()]
FORMS = ["auto", *sorted(CODECS)]


def accepted_forms(cls) -> list[str]:
    forms = []
    for form in FORMS:
        try:
            cls([torch.nn.Parameter(torch.randn(4, 3))], state=form)
        except HyperparameterError:
            continue
        forms.append(form)
    return forms


CASES = [
    (name, a, b) for name, cls in hfoptim.CLASSES.items() for a, b in itertools.product(accepted_forms(cls), repeat=2)
]


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def run(opt, params, steps, start=1):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if opt.rule.needs_loss:
            opt.step(loss=1.0 / t)
        else:
            opt.step()


def saved(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def group_of(opt, p) -> dict:
    """The parameter group holding ``p`` (Muon splits a group into its matrices and the rest)."""
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def decoded(opt, p, slot) -> torch.Tensor:
    group = group_of(opt, p)
    codec = resolve.codec_for(opt.rule, slot, group, ParamView.of(p))
    return codec.decode(slot, opt.state[p], ParamView.of(p), torch.float32, stats=LocalStats())


@pytest.mark.parametrize(("name", "a", "b"), CASES)
def test_load_converts_between_storage_forms(name, a, b):
    cls = hfoptim.CLASSES[name]
    params_a = make_params()
    opt_a = cls(params_a, state=a, state_min_numel=0)
    run(opt_a, params_a, 3)

    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = cls(params_b, state=b, state_min_numel=0)
    opt_b.load_state_dict(saved(opt_a))
    assert opt_b.param_groups[0]["state"] == b

    reference_params = make_params(seed=1)
    reference = cls(reference_params, state=b, state_min_numel=0)
    run(reference, reference_params, 1)
    stats = LocalStats()
    for p_a, p_b, p_ref in zip(params_a, params_b, reference_params):
        group_b = group_of(opt_b, p_b)
        assert set(opt_b.state[p_b]) == set(reference.state[p_ref]), "the loaded state is not in the form asked"
        assert torch.equal(opt_b.state[p_b]["step"], opt_a.state[p_a]["step"])
        view = ParamView.of(p_b)
        for slot in opt_b.rule.active_slots(group_b):
            codec_a = resolve.codec_for(opt_a.rule, slot, group_of(opt_a, p_a), view)
            codec_b = resolve.codec_for(opt_b.rule, slot, group_b, view)
            value_a = decoded(opt_a, p_a, slot)
            if codec_a is codec_b:
                for key in opt_a.state[p_a]:
                    if key == slot.name or key.startswith(slot.name + "."):
                        assert torch.equal(opt_b.state[p_b][key], opt_a.state[p_a][key])
            elif codec_b.identity:
                assert torch.equal(decoded(opt_b, p_b, slot), value_a)
            else:
                stored = codec_b.init(slot, value_a.clone(), view, stats=stats)
                expected = codec_b.decode(slot, stored, view, torch.float32, stats=stats)
                torch.testing.assert_close(decoded(opt_b, p_b, slot), expected, rtol=1e-6, atol=1e-7)

    run(opt_b, params_b, 2, start=4)
    assert all(torch.isfinite(p).all() for p in params_b)
    assert opt_b.state[params_b[0]]["step"].item() == 5.0


@pytest.mark.parametrize("form", sorted(set(CODECS) - {"fp32"}))
def test_to_fp32_and_back_gives_the_saved_tensors(form):
    params = make_params()
    opt = hfoptim.AdamW(params, state=form, state_min_numel=0, lr=3e-3, betas=(0.8, 0.95))
    run(opt, params, 3)
    dense = hfoptim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], state="fp32")
    dense.load_state_dict(saved(opt))
    back_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    back = hfoptim.AdamW(back_params, state=form, state_min_numel=0)
    back.load_state_dict(saved(dense))
    for p, q in zip(params, back_params):
        assert set(opt.state[p]) == set(back.state[q])
        if form == "4bit":
            # the signed 4-bit levels reach +1, not -1: a block led by a negative value re-encodes
            # with a smaller scale (hfoptim/state/convert.py); the moments stay within a level
            group, view = opt.param_groups[0], ParamView.of(p)
            for slot in opt.rule.active_slots(group):
                codec = resolve.codec_for(opt.rule, slot, group, view)
                want = codec.decode(slot, opt.state[p], view, torch.float32, stats=LocalStats())
                got = codec.decode(slot, back.state[q], view, torch.float32, stats=LocalStats())
                torch.testing.assert_close(got, want, rtol=0.15, atol=1e-3 * float(want.abs().max()))
            continue
        for key, value in opt.state[p].items():
            torch.testing.assert_close(back.state[q][key], value, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# parameter groups and steps of a saved state dict


def test_group_lacking_a_key_fails_at_load_naming_it():
    params = make_params()
    opt = hfoptim.AdamW(params)
    run(opt, params, 1)
    sd = saved(opt)
    del sd["param_groups"][0]["betas"]
    with pytest.raises(ValueError, match=r"lacks betas.*betas=\(0\.9, 0\.999\)"):
        opt.load_state_dict(sd)
    sd = saved(opt)
    sd["param_groups"][0]["eps"] = -1.0
    with pytest.raises(ValueError, match="eps=-1.0"):
        opt.load_state_dict(sd)
    sd = saved(opt)
    sd["param_groups"][0]["not_an_option"] = 1
    with pytest.raises(ValueError, match="not_an_option"):
        opt.load_state_dict(sd)
    run(opt, params, 1, start=2)  # the failed loads left the optimizer as it was


def test_storage_and_run_options_stay_the_current_optimizers():
    params = make_params()
    opt = hfoptim.AdamW(params, state="8bit", state_min_numel=0, compile="off", skip_nonfinite=False)
    run(opt, params, 1)
    sd = saved(opt)
    for key in ("state", "state_min_numel", "compile", "skip_nonfinite"):
        del sd["param_groups"][0][key]  # a checkpoint of an older version
    sd["param_groups"][0]["lr"] = 0.123
    fresh_params = make_params()
    fresh = hfoptim.AdamW(fresh_params, state="bf16", state_min_numel=10, compile="on", skip_nonfinite=True)
    with pytest.raises(ValueError, match="another state form"):  # no saved form: the keys are not bf16
        fresh.load_state_dict(sd)
    fresh = hfoptim.AdamW(fresh_params, state="8bit", state_min_numel=0, compile="on", skip_nonfinite=True)
    fresh.load_state_dict(sd)
    group = fresh.param_groups[0]
    assert (group["state"], group["compile"], group["skip_nonfinite"], group["lr"]) == ("8bit", "on", True, 0.123)


@pytest.mark.parametrize("foreach", [True, False])
def test_plain_number_step_loads_and_steps(foreach):
    params = make_params()
    opt = hfoptim.AdamW(params, foreach=foreach, state="8bit", state_min_numel=0)
    run(opt, params, 3)
    sd = saved(opt)
    for pstate in sd["state"].values():
        pstate["step"] = 3  # torch's own optimizers accept a number
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = hfoptim.AdamW(twin_params, foreach=foreach, state="8bit", state_min_numel=0)
    twin.load_state_dict(sd)
    assert all(isinstance(twin.state[p]["step"], torch.Tensor) for p in twin_params)
    run(opt, params, 2, start=4)
    run(twin, twin_params, 2, start=4)
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert twin.state[q]["step"].item() == 5.0


# ---------------------------------------------------------------------------------------------
# hfoptim.convert_state_dict: torch and bitsandbytes Adam/AdamW

TORCH_HP = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def torch_run(cls, steps, **kwargs):
    params = make_params(dtype=torch.float64)
    opt = cls(params, **TORCH_HP, **kwargs)
    for t in range(1, steps + 1):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return opt, params


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(("source", "cls"), [("torch_adamw", torch.optim.AdamW), ("torch_adam", torch.optim.Adam)])
def test_torch_adam_state_continues_exactly_in_hfoptim(source, cls, foreach):
    torch_opt, torch_params = torch_run(cls, 3, foreach=False, maximize=True)
    sd = saved(torch_opt)
    params = [torch.nn.Parameter(p.detach().clone()) for p in torch_params]
    opt = hfoptim.AdamW(params, foreach=foreach)  # hyperparameters come from the state dict
    opt.load_state_dict(hfoptim.convert_state_dict(sd, opt))
    group = opt.param_groups[0]
    assert group["weight_decay_mode"] == ("decoupled" if source == "torch_adamw" else "l2")
    assert (group["lr"], group["betas"], group["eps"], group["maximize"]) == (3e-3, (0.8, 0.95), 1e-6, True)
    for t in range(4, 7):
        gen = torch.Generator().manual_seed(100 + t)
        for p, q in zip(torch_params, params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            q.grad = p.grad.clone()
        torch_opt.step()
        opt.step()
        for p, q in zip(torch_params, params):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(opt.state[q]["exp_avg"], torch_opt.state[p]["exp_avg"], rtol=1e-12, atol=0)
            torch.testing.assert_close(opt.state[q]["exp_avg_sq"], torch_opt.state[p]["exp_avg_sq"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("form", sorted(CODECS))
def test_torch_adamw_state_into_every_adamw_form(form):
    torch_opt, torch_params = torch_run(torch.optim.AdamW, 3)
    params = [torch.nn.Parameter(p.detach().float().clone()) for p in torch_params]
    opt = hfoptim.AdamW(params, state=form, state_min_numel=0)
    opt.load_state_dict(hfoptim.convert_state_dict(saved(torch_opt), opt))
    stats = LocalStats()
    for p, q in zip(torch_params, params):
        view = ParamView.of(q)
        for slot in opt.rule.slots:
            codec = resolve.codec_for(opt.rule, slot, opt.param_groups[0], view)
            value = torch_opt.state[p][slot.name].float()
            expected = codec.decode(
                slot, codec.init(slot, value.clone(), view, stats=stats), view, torch.float32, stats=stats
            )
            torch.testing.assert_close(decoded(opt, q, slot), expected, rtol=1e-6, atol=1e-9)
    run(opt, params, 1, start=4)
    assert opt.state[params[0]]["step"].item() == 4.0


def test_bitsandbytes_adamw8bit_state_decodes_as_bitsandbytes_does():
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 80), (5000,), (30, 7)]  # 8-bit blocks, a short last block, fp32 below min_8bit_size
    bnb_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    bnb_opt = bnb.optim.AdamW8bit(bnb_params, **TORCH_HP)
    for _ in range(3):
        for p in bnb_params:
            p.grad = torch.randn(p.shape, generator=gen)
        bnb_opt.step()
    sd = bnb_opt.state_dict()
    params = [torch.nn.Parameter(p.detach().clone()) for p in bnb_params]
    opt = hfoptim.AdamW(params)
    opt.load_state_dict(hfoptim.convert_state_dict(sd, opt))
    assert opt.param_groups[0]["weight_decay_mode"] == "decoupled"
    for p, q in zip(bnb_params, params):
        state = bnb_opt.state[p]
        for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
            if state[f"state{i}"].dtype == torch.uint8:
                expected = F.dequantize_blockwise(
                    state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256
                )
            else:
                expected = state[f"state{i}"]
            assert torch.equal(opt.state[q][key], expected.reshape(p.shape).float())
        assert opt.state[q]["step"].item() == 3.0
    eight = hfoptim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in bnb_params], state="8bit")
    eight.load_state_dict(hfoptim.convert_state_dict(sd, eight))
    assert "exp_avg.codes" in eight.state[eight.param_groups[0]["params"][0]]


def test_what_cannot_be_converted_fails_clearly():
    params = make_params(dtype=torch.float64)
    opt = hfoptim.AdamW(params)
    amsgrad, _ = torch_run(torch.optim.AdamW, 1, amsgrad=True)
    with pytest.raises(ValueError, match="AMSGrad"):
        hfoptim.convert_state_dict(saved(amsgrad), opt)
    plain, _ = torch_run(torch.optim.AdamW, 1)
    sd = saved(plain)
    del sd["param_groups"][0]["decoupled_weight_decay"]
    with pytest.raises(ValueError, match="source='torch_adam' or source='torch_adamw'"):
        hfoptim.convert_state_dict(sd, opt)
    hfoptim.convert_state_dict(sd, opt, source="torch_adamw")
    with pytest.raises(ValueError, match="load it with optimizer.load_state_dict directly"):
        hfoptim.convert_state_dict(opt.state_dict(), opt)
    with pytest.raises(ValueError, match="adamw"):
        hfoptim.convert_state_dict(saved(plain), hfoptim.Adan(params))
    with pytest.raises(ValueError, match="hfoptim.convert_state_dict"):
        opt.load_state_dict(saved(plain))
