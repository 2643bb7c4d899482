"""The factored, SMMF and shared storage forms with any rule.

1. The codecs alone, in float64: what they keep and what they give back (exact cases), and the
   linearity that makes "row/column sums of the updated V" equal to Adafactor's EMA of row and
   column statistics.
2. Rule x codec parity: AdamW, AdEMAMix and Adan with each form against their paper-literal
   references, each wrapped so that its state is compressed after every step by an independent
   float64 implementation of the form (the reference works on full tensors within a step, as the
   engine does).
3. The fp32 twin: each rule stepped side by side with its fp32-state twin for 200 steps on a
   small model, with the measured deviation bounded.
4. A mid-run state_dict round trip changes nothing; state bytes per parameter are as theory says;
   names and refusals.
"""

import copy
import io
import math

import numpy as np
import pytest
import torch

import hfoptim
from hfoptim.core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
from hfoptim.core.stats import LocalStats, ParamView
from hfoptim.state import CODECS
from hfoptim.state.smmf import pack_bits, signs, square_shape, unpack_bits
from tests.harness import SHAPES, check_parity
from tests.references.adamw import AdamWRef
from tests.references.adan import AdanRef
from tests.references.ademamix import AdEMAMixRef
from tests.references.smmf import nnmf
from tests.references.smmf import square_shape as ref_square_shape

STATS = LocalStats()
V, M = Slot("v", SECOND_MOMENT), Slot("m", FIRST_MOMENT)


def view(shape):
    return ParamView(global_shape=torch.Size(shape))


def roundtrip(form, slot, x):
    codec = CODECS[form]
    stored = codec.init(slot, torch.zeros_like(x), view(x.shape), stats=STATS)
    codec.encode(slot, stored, x, view(x.shape), stats=STATS)
    return codec.decode(slot, stored, view(x.shape), x.dtype, stats=STATS), stored


# ----------------------------------------------------------------------------- 1. codecs alone
def test_factored_keeps_row_and_column_sums_and_rank1_exactly():
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(6, 5, 4, generator=gen, dtype=torch.float64)
    decoded, stored = roundtrip("factored", V, v)
    flat = v.reshape(6, 20)
    torch.testing.assert_close(stored["v.row"], flat.sum(1))
    torch.testing.assert_close(stored["v.col"], flat.sum(0))
    torch.testing.assert_close(decoded, (torch.outer(flat.sum(1), flat.sum(0)) / flat.sum()).reshape(6, 5, 4))
    a, b = (torch.rand(k, generator=gen, dtype=torch.float64) for k in (9, 7))
    rank1 = torch.outer(a, b)
    torch.testing.assert_close(roundtrip("factored", V, rank1)[0], rank1)
    vec = torch.rand(11, generator=gen, dtype=torch.float64)
    decoded, stored = roundtrip("factored", V, vec)
    assert set(stored) == {"v"} and torch.equal(decoded, vec)  # 1-D stays dense


def test_factored_encode_of_updated_v_is_adafactors_ema_of_row_and_column_stats():
    """R_t = rowsum(b V_hat_{t-1} + (1-b) X) = b R_{t-1} + (1-b) X 1 (and for C), because the
    decoded V_hat_{t-1} has the stored row and column sums (both factors have one total)."""
    gen = torch.Generator().manual_seed(1)
    codec, vw = CODECS["factored"], view((8, 5))
    stored = codec.init(V, torch.rand(8, 5, generator=gen, dtype=torch.float64), vw, stats=STATS)
    for b in (0.0, 0.3, 0.999):
        r0, c0 = stored["v.row"].clone(), stored["v.col"].clone()
        x = torch.rand(8, 5, generator=gen, dtype=torch.float64) ** 4
        v_hat = codec.decode(V, stored, vw, torch.float64, stats=STATS)
        codec.encode(V, stored, b * v_hat + (1 - b) * x, vw, stats=STATS)
        torch.testing.assert_close(stored["v.row"], b * r0 + (1 - b) * x.sum(1), rtol=1e-13, atol=0)
        torch.testing.assert_close(stored["v.col"], b * c0 + (1 - b) * x.sum(0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 12, 36, 143, 1000, 4096, 4099])
def test_square_matricization(n):
    rows, cols = square_shape(n)
    assert rows * cols == n and rows >= cols
    assert all(n % i for i in range(cols + 1, math.isqrt(n) + 1))
    assert (rows, cols) == ref_square_shape(n)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_sign_bits_round_trip_one_bit_per_element(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(signs(packed, n, torch.float64), torch.where(mask, 1.0, -1.0).double())


@pytest.mark.parametrize("cut", ["offset", "strided"])
def test_sign_bits_pack_masks_that_are_views(cut):
    # the 64-bit word path needs aligned contiguous bytes: a view at an odd offset or with a
    # stride is packed the same as its copy
    base = torch.rand(2001, generator=torch.Generator().manual_seed(3)) > 0.5
    mask = base[3:] if cut == "offset" else base[::2]
    want = np.packbits(mask.numpy(), bitorder="little")
    assert np.array_equal(pack_bits(mask).numpy(), want)


def test_smmf_keeps_signed_rank1_exactly_and_factors_like_the_paper():
    gen = torch.Generator().manual_seed(2)
    signs = torch.where(torch.rand(6, 6, generator=gen) > 0.5, 1.0, -1.0).double()
    m = signs * torch.outer(
        torch.rand(6, generator=gen, dtype=torch.float64) + 0.1, torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    )
    m = m.reshape(4, 9)  # 36 elements: matricized 6 x 6
    decoded, stored = roundtrip("smmf", M, m)
    torch.testing.assert_close(decoded, m)
    r, c = nnmf(m.reshape(6, 6).abs())
    torch.testing.assert_close(stored["m.row"], r)
    torch.testing.assert_close(stored["m.col"], c)
    v = torch.rand(3, 5, 7, generator=gen, dtype=torch.float64)  # 105 = 15 x 7
    decoded, stored = roundtrip("smmf", V, v)
    r, c = nnmf(v.reshape(15, 7))
    assert set(stored) == {"v.row", "v.col"}
    torch.testing.assert_close(decoded, torch.outer(r, c).reshape(3, 5, 7))


def test_shared_keeps_row_means_or_the_tensor_mean():
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(5, 3, 2, generator=gen, dtype=torch.float64)
    decoded, stored = roundtrip("shared", V, v)
    torch.testing.assert_close(stored["v.row"], v.reshape(5, 6).mean(1))
    torch.testing.assert_close(decoded, v.reshape(5, 6).mean(1, keepdim=True).expand(5, 6).reshape(5, 3, 2))
    vec = torch.rand(9, generator=gen, dtype=torch.float64)
    decoded, stored = roundtrip("shared", V, vec)
    assert stored["v.mean"].shape == ()
    torch.testing.assert_close(decoded, vec.mean().expand(9))


@pytest.mark.parametrize("form", ["factored", "smmf", "shared"])
def test_zero_state_decodes_to_zero_and_scalars_work(form):
    for shape in [(), (1,), (5, 1), (1, 5), (3, 4)]:
        slot = M if form == "smmf" else V
        decoded, _ = roundtrip(form, slot, torch.zeros(shape, dtype=torch.float64))
        assert decoded.shape == torch.Size(shape) and not decoded.any()
    p = torch.nn.Parameter(torch.tensor(0.5))
    opt = hfoptim.AdamW([p], state=form, state_min_numel=0)
    p.grad = torch.tensor(0.25)
    opt.step()
    assert torch.isfinite(p)


@pytest.mark.parametrize("name", ["adamw_factored", "adamw_smmf", "adamw_shared", "adafactor", "smmf"])
def test_empty_parameters_keep_dense_state(name):
    for shape in [(0, 5), (5, 0), (0,)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = hfoptim.create_optimizer([p], name, state_min_numel=0)
        p.grad = torch.zeros(shape)
        opt.step()
        opt.load_state_dict(opt.state_dict())
        assert all(v.shape == torch.Size(shape) for k, v in opt.state[p].items() if k != "step")


# ----------------------------------------------------------------------------- 2. rule x codec parity
def _factored(x):
    if x.dim() < 2:
        return x, {"": x}
    a = x.reshape(x.shape[0], -1)
    r, c = a.sum(1), a.sum(0)
    return (torch.outer(r, c) / r.sum()).reshape(x.shape), {".row": r, ".col": c}


def _shared(x):
    if x.dim() < 2:
        return x.mean().expand(x.shape).clone(), {".mean": x.mean()}
    rows = x.reshape(x.shape[0], -1).mean(1)
    return rows.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape).clone(), {".row": rows}


def _smmf(x, signed):
    a = x.reshape(ref_square_shape(x.numel()))
    r, c = nnmf(a.abs() if signed else a)
    value = torch.outer(r, c)
    parts = {".row": r, ".col": c}
    if signed:
        sign = a > 0
        value = torch.where(sign, value, -value)
        parts[".sign"] = torch.from_numpy(np.packbits(sign.reshape(-1).numpy(), bitorder="little").astype(np.float64))
    return value.reshape(x.shape), parts


class Stored:
    """A reference whose listed slots are kept in a storage form between steps (float64)."""

    def __init__(self, ref, form, slots):
        self.ref, self.form, self.slots = ref, form, slots
        self.parts = {}

    def step(self, p, g):
        self.ref.step(p, g)
        for name, kind in self.slots.items():
            x = self.ref.state[name]
            if self.form == "factored" and kind == SECOND_MOMENT:
                value, parts = _factored(x)
            elif self.form == "shared" and kind == SECOND_MOMENT:
                value, parts = _shared(x)
            elif self.form == "smmf":
                value, parts = _smmf(x, signed=kind == FIRST_MOMENT)
            else:
                continue
            self.ref.state[name] = value
            self.parts[name] = parts

    @property
    def state(self):
        out = {k: v for k, v in self.ref.state.items() if k not in self.parts}
        for name, parts in self.parts.items():
            out.update({name + suffix: value for suffix, value in parts.items()})
        return out


S, F = SECOND_MOMENT, FIRST_MOMENT
RULES = {
    "adamw": (
        dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        AdamWRef,
        {"exp_avg": F, "exp_avg_sq": S},
    ),
    "ademamix": (
        dict(lr=2e-2, betas=(0.85, 0.99, 0.995), alpha=3.5, eps=1e-6, weight_decay=0.05),
        AdEMAMixRef,
        {"exp_avg": F, "exp_avg_slow": F, "exp_avg_sq": S},
    ),
    "adan": (
        dict(lr=2e-2, betas=(0.9, 0.85, 0.995), eps=1e-6, weight_decay=0.07),
        AdanRef,
        {"exp_avg": F, "exp_avg_diff": F, "exp_avg_sq": S},
    ),
}


@pytest.mark.parametrize("form", ["factored", "smmf", "shared"])
@pytest.mark.parametrize("rule", list(RULES))
def test_rule_with_storage_form_matches_stored_reference(rule, form):
    hp, ref_class, slots = RULES[rule]
    check_parity(
        lambda params, foreach: hfoptim.create_optimizer(
            params, f"{rule}_{form}", foreach=foreach, state_min_numel=0, **hp
        ),
        lambda: Stored(ref_class(**hp), form, slots),
        shapes=[*SHAPES, (4, 9)],
    )


# ----------------------------------------------------------------------------- 3. fp32 twin
def _problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 24, generator=gen)
    w1, w2 = torch.randn(32, 24, generator=gen) * 0.6, torch.randn(8, 32, generator=gen) * 0.6
    y = (torch.tanh(x @ w1.T) @ w2.T).argmax(1)
    noisy = torch.rand(256, generator=gen) < 0.3  # label noise: the loss has a floor
    return x, torch.where(noisy, torch.randint(0, 8, (256,), generator=gen), y)


def _train(name, steps=200, **options):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: intra-op threads only contend (8x slower on a busy box)
    try:
        return _train_model(name, steps, **options)
    finally:
        torch.set_num_threads(threads)


def _train_model(name, steps, **options):
    x, y = _problem()
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 40), torch.nn.GELU(), torch.nn.Linear(40, 8)
    )
    start = [p.detach().clone() for p in model.parameters()]
    opt = hfoptim.create_optimizer(model, name, state_min_numel=0, **options)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x), y).item()
    return final, [p.detach().clone() for p in model.parameters()], start


TWIN_HP = {
    "adamw": dict(lr=2e-3, betas=(0.85, 0.98), weight_decay=0.05),
    "ademamix": dict(lr=2e-3, betas=(0.85, 0.98, 0.995), alpha=3.0, weight_decay=0.05),
    "adan": dict(lr=3e-3, betas=(0.95, 0.9, 0.98), weight_decay=0.02),
    "adafactor": dict(lr=2e-2, beta1=0.9),
    "smmf": dict(lr=2e-3, beta1=0.9, weight_decay=0.02),
}
#: (rule, form) -> (bound on |loss / twin loss - 1|, bound on ||p - p_twin|| / ||p_twin - p_0||),
#: bounds = measured x ~1.5. Measured (200 steps, fp32, this model, torch 2.13 CPU, 1 thread):
#:   adamw      factored  loss 0.6209 vs twin 0.6434 (rel 0.035)  dev 0.223
#:   adamw      shared    loss 0.6439 vs 0.6434  (rel 0.001)  dev 0.289
#:   adamw      smmf      loss 1.0927 vs 0.6434  (rel 0.698)  dev 0.535
#:   ademamix   factored  loss 0.2665 vs 0.2691  (rel 0.010)  dev 0.238
#:   ademamix   smmf      loss 0.9586 vs 0.2691  (rel 2.562)  dev 0.661
#:   adan       shared    loss 0.8894 vs 0.8531  (rel 0.043)  dev 0.280
#:   adan       smmf      loss 1.6011 vs 0.8531  (rel 0.877)  dev 0.812
#:   adafactor  factored  loss 0.5235 vs 0.5578  (rel 0.061)  dev 0.245
#:   smmf       smmf      loss 1.1772 vs 0.7800  (rel 0.509)  dev 0.516
#: Factored and shared second moments stay within a few % of the twin's loss; SMMF's rank-1
#: first moment (sign bits x rank-1 magnitudes) costs far more on this small model (its paper
#: reports parity on large CNNs/transformers; the quality benchmark on a tiny LM is elsewhere).
TWIN_BOUNDS = {
    ("adamw", "factored"): (0.06, 0.35),
    ("adamw", "shared"): (0.03, 0.45),
    ("adamw", "smmf"): (1.0, 0.8),
    ("ademamix", "factored"): (0.03, 0.35),
    ("ademamix", "smmf"): (3.8, 1.0),
    ("adan", "shared"): (0.07, 0.42),
    ("adan", "smmf"): (1.3, 1.2),
    ("adafactor", "factored"): (0.09, 0.37),
    ("smmf", "smmf"): (0.75, 0.8),
}
_TWINS = {}


@pytest.mark.parametrize("rule,form", list(TWIN_BOUNDS))
def test_storage_form_stays_near_its_fp32_twin(rule, form):
    if rule not in _TWINS:
        _TWINS[rule] = _train(rule, state="fp32", **TWIN_HP[rule])
    twin_loss, twin, start = _TWINS[rule]
    loss, params, _ = _train(rule, state=form, **TWIN_HP[rule])
    moved = math.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(start, twin)))
    dev = math.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params, twin))) / moved
    rel = abs(loss / twin_loss - 1)
    loss_bound, dev_bound = TWIN_BOUNDS[rule, form]
    print(f"{rule}_{form}: loss {loss:.4f} twin {twin_loss:.4f} rel {rel:.3f} dev {dev:.3f}")
    assert rel <= loss_bound and dev <= dev_bound, (rel, dev)


# ----------------------------------------------------------------------------- 4. checkpoints, bytes, names
@pytest.mark.parametrize(
    "name",
    [
        "adamw_factored",
        "adamw_smmf",
        "adamw_shared",
        "ademamix_smmf",
        "adan_shared",
        "adafactor",
        "smmf",
        "smmf_factored",
    ],
)
def test_mid_run_state_dict_round_trip_changes_nothing(name):
    gen = torch.Generator().manual_seed(4)
    shapes = [(16, 12), (7,), (3, 4, 5), ()]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = hfoptim.create_optimizer(a, name, state_min_numel=0, lr=1e-2)

    def steps(opt, params, gs):
        for step_grads in gs:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    steps(opt_a, a, grads[:6])
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = hfoptim.create_optimizer(b, name, state_min_numel=0, lr=1e-2)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    steps(opt_a, a, grads[6:])
    steps(opt_b, b, grads[6:])
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]) and value.dtype == opt_b.state[q][key].dtype, key


def _state_bytes(opt, p):
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step")


def _smmf_bytes(n, signed):
    i = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return 4 * (n // i + i) + ((n + 7) // 8 if signed else 0)


@pytest.mark.parametrize(
    "name",
    [
        "adamw_factored",
        "adamw_smmf",
        "adamw_shared",
        "ademamix_smmf",
        "ademamix_factored",
        "adan_shared",
        "adafactor",
        "smmf",
    ],
)
def test_state_bytes_per_parameter_are_as_theory_says(name):
    rows, cols = 1024, 768  # n = 786432 = 1024 x 768 (largest divisor <= 886.8 is 768)
    n = rows * cols
    w = torch.nn.Parameter(torch.zeros(rows, cols))
    opt = hfoptim.create_optimizer([w], name)
    w.grad = torch.randn(rows, cols)
    opt.step()
    factored_v, shared_v = 4 * (rows + cols), 4 * rows
    expected = {
        "adamw_factored": 4 * n + factored_v,
        "adamw_smmf": _smmf_bytes(n, True) + _smmf_bytes(n, False),
        "adamw_shared": 4 * n + shared_v,
        "ademamix_smmf": 2 * _smmf_bytes(n, True) + _smmf_bytes(n, False),
        "ademamix_factored": 8 * n + factored_v,
        "adan_shared": 4 * n * 3 + shared_v,  # m, n (diff momentum), previous gradient dense
        "adafactor": factored_v,  # no first moment by default
        "smmf": _smmf_bytes(n, True) + _smmf_bytes(n, False),
    }[name]
    assert _state_bytes(opt, w) == expected
    per_param = {
        "adamw_factored": 4.0091,
        "adamw_smmf": 0.1432,
        "adamw_shared": 4.0052,
        "ademamix_smmf": 0.2773,
        "ademamix_factored": 8.0091,
        "adan_shared": 12.0052,
        "adafactor": 0.0091,
        "smmf": 0.1432,
    }[name]
    assert expected / n == pytest.approx(per_param, abs=1e-4)  # vs fp32: AdamW 8, AdEMAMix 12, Adan 16


def test_names_resolve_and_nonsense_fails_saying_why():
    for name in [
        "adamw_factored",
        "adamw_smmf",
        "ademamix_smmf",
        "adan_shared",
        "adan_factored",
        "adafactor_smmf",
        "smmf_factored",
        "adafactor_shared",
    ]:
        assert name in hfoptim.list_optimizers(), name
    assert "smmf_smmf" not in hfoptim.list_optimizers()
    with pytest.raises(ValueError, match="nothing to compress"):
        hfoptim.get_optimizer("nsgda_factored")
    with pytest.raises(ValueError, match="two storage forms"):
        hfoptim.get_optimizer("adamw_smmf_factored")
    # a slot that the hyperparameters switch off does not count: Amos keeps a first moment only
    # with momentum > 0, so amos_smmf by name (momentum 0) would store nothing compressed
    for name in ("amos_smmf", "amos_8bit", "amos_bf16"):
        assert name not in hfoptim.list_optimizers()
        with pytest.raises(ValueError, match="exp_avg exists only with other hyperparameters"):
            hfoptim.get_optimizer(name)
    amos = hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(8, 8))], "amos", state="8bit", momentum=0.9)
    assert amos.param_groups[0]["state"] == "8bit"
    with pytest.raises(hfoptim.HyperparameterError, match="unknown state form"):
        hfoptim.AdamW([torch.nn.Parameter(torch.zeros(2))], state="factorized")


def test_rule_defaults_and_explicit_forms_per_slot():
    w = torch.nn.Parameter(torch.zeros(64, 64))
    w.grad = torch.ones(64, 64)

    def keys(name, **kw):
        opt = hfoptim.create_optimizer([w], name, **kw)
        opt.step()
        return sorted(k for k in opt.state[w] if k != "step")

    assert keys("smmf_factored") == ["exp_avg.col", "exp_avg.row", "exp_avg.sign", "exp_avg_sq.col", "exp_avg_sq.row"]
    assert keys("smmf", state="fp32") == ["exp_avg", "exp_avg_sq"]
    assert keys("adafactor", state="fp32") == ["exp_avg_sq"]
    assert keys("adamw_factored", state_min_numel=64 * 64 + 1) == ["exp_avg", "exp_avg_sq"]  # small: dense
    assert keys("adafactor", state="shared", state_min_numel=64 * 64 + 1) == ["exp_avg_sq.col", "exp_avg_sq.row"]
    assert keys("adamw", state="smmf") == [
        "exp_avg.col",
        "exp_avg.row",
        "exp_avg.sign",
        "exp_avg_sq.col",
        "exp_avg_sq.row",
    ]


def test_copy_of_optimizer_with_factored_state():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = hfoptim.create_optimizer([w], "adamw_smmf", state_min_numel=0)
    w.grad = torch.randn(8, 8)
    opt.step()
    clone = copy.deepcopy(opt)
    assert set(clone.state_dict()["state"][0]) == set(opt.state_dict()["state"][0])
