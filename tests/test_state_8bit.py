"""Blockwise 8-bit state (hfoptim.state.blockwise8bit, hfoptim.state.dynamic_code).

What is proven here:

* the codes are the dynamic tree / dynamic codes of arXiv 2110.02861 (levels per decade, range,
  largest level exactly 1) and encoding picks the nearest code, exactly as ``torch.bucketize``
  over the midpoints;
* blocks of 256 follow the parameter's rows; a shard of whole rows encodes to exactly the rows of
  the whole tensor's codes and scales; the 8-bit/fp32 threshold is the GLOBAL size;
* the fp32 form is bit-identical whether chosen by name or forced by the threshold;
* 8-bit AdamW and AdEMAMix stepped beside their fp32 twin (same gradients, non-default
  hyperparameters, 150 steps on a small MLP) stay within the bounds stated in
  ``test_8bit_stays_near_its_fp32_twin``;
* a state_dict round trip in the middle of a run changes nothing (bit-identical continuation);
* against bitsandbytes' AdamW8bit on the same data: similar trajectory, no more bytes per
  parameter.
"""

from __future__ import annotations

import math

import pytest
import torch

import hfoptim
from hfoptim import memory
from hfoptim.core import tracing
from hfoptim.core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
from hfoptim.core.stats import LocalStats, ParamView
from hfoptim.state import CODECS, resolve
from hfoptim.state.blockwise8bit import dequantize, normalized, quantize, scale_shape
from hfoptim.state.dynamic_code import BLOCK, SIGNED, UNSIGNED, decode_codes, encode_normalized
from tests.harness import check_resume_mid_run

CODEC = CODECS["8bit"]
HP = dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)
HP_ADEMAMIX = dict(HP, betas=(0.85, 0.98, 0.995), alpha=3.0)


# ----------------------------------------------------------------------------------- the codes
@pytest.mark.parametrize("code, bits", [(SIGNED, 7), (UNSIGNED, 8)], ids=["signed", "unsigned"])
def test_codes_follow_the_dynamic_tree_layout(code, bits):
    mags = code.magnitudes.double()
    assert mags.numel() == 2**bits and mags[0] == 0 and mags[-1] == 1.0
    assert bool((mags.diff() > 0).all()), "magnitudes must increase with the index"
    assert math.isclose(mags[1].item(), 10.0 ** -(bits - 1), rel_tol=1e-6)  # 1e-6 signed, 1e-7 unsigned
    for e in range(bits):  # decade e holds 2^(bits-1-e) levels in (10^-(e+1), 10^-e]
        inside = ((mags > 10.0 ** -(e + 1) * (1 + 1e-6)) & (mags <= 10.0**-e * (1 + 1e-6))).sum().item()
        assert inside == 2 ** (bits - 1 - e), f"decade {e}: {inside} levels"
    if code.signed:
        assert torch.equal(code.table[128:], -code.table[:128])


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_encode_is_the_nearest_code(code):
    gen = torch.Generator().manual_seed(0)
    mids = code.midpoints
    y = torch.cat(
        [
            torch.rand(100_000, generator=gen),
            torch.logspace(-9, 0, 20_000),
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-1.0)),
            code.magnitudes,
        ]
    )
    if code.signed:
        y = torch.cat([y, -y])
    got = encode_normalized(y, code).long()
    expected = torch.bucketize(y.abs(), mids) + ((y < 0).long() * 128 if code.signed else 0)
    assert torch.equal(got, expected)
    # and "nearest" in the plain sense: no table value is closer than the chosen one
    chosen = (decode_codes(got.to(torch.uint8), code) - (y if code.signed else y.abs())).abs()
    best = (y[:, None] if code.signed else y.abs()[:, None]) - code.table[None, :]
    assert bool((chosen <= best.abs().min(dim=1).values + 6e-8).all())


@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_eager_and_traced_encodes_give_the_same_codes_for_every_float(code):
    """The eager encode (two tables) and the traced one (the packed table and integer arithmetic,
    run here eagerly as traced code) agree on both edges and inner points of every bf16 interval,
    both signs, zeros of either sign, infinities, NaNs, and the midpoints and their neighbours."""
    gen = torch.Generator().manual_seed(1)
    upper = torch.arange(1 << 16, dtype=torch.int32) << 16
    lower = torch.cat([torch.tensor([0, 1, 0x7FFF, 0x8000, 0xFFFF]), torch.randint(0, 1 << 16, (6,), generator=gen)])
    y = (upper[:, None] | lower.to(torch.int32)[None, :]).reshape(-1).view(torch.float32)
    mids = code.midpoints
    y = torch.cat([y, mids, -mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-1.0))])
    assert bool(y.isnan().any()) and bool(y.isinf().any())
    with tracing._traced():
        traced = encode_normalized(y, code)
    eager = encode_normalized(y, code)
    assert eager.dtype == traced.dtype == torch.uint8
    assert torch.equal(eager, traced)


@pytest.mark.parametrize("shape", [(16, 2048), (2048, 16), (8, 300), (768,), (300,)])
@pytest.mark.parametrize("code", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_eager_and_traced_block_scaling_give_the_same_codes_and_values(code, shape):
    """Eagerly and traced, whole blocks take their scales by broadcasting over the ``(blocks,
    block)`` view, and the code's eager tables and traced arithmetic give the same numbers, bit
    for bit, for lines of whole blocks and lines ending in a short block."""
    torch.manual_seed(0)
    value = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1)) * 3
    if not code.signed:
        value = value.abs()
    view = ParamView(global_shape=torch.Size(shape))
    scale = LocalStats().block_absmax([value], [view], BLOCK)[0]
    eager_normalized = normalized(value, scale, view, code)
    eager_codes = quantize(value, scale, view, code)
    eager_values = dequantize(eager_codes, scale, view, code)
    with tracing._traced():
        traced_normalized = normalized(value, scale, view, code)
        traced_codes = quantize(value, scale, view, code)
        traced_values = dequantize(traced_codes, scale, view, code)
    assert torch.equal(eager_normalized, traced_normalized)
    assert torch.equal(eager_codes, traced_codes)
    assert torch.equal(eager_values, traced_values)


# ----------------------------------------------------------------------------------- the blocks
@pytest.mark.parametrize("shape", [(6, 300), (4, 512), (3, 5, 70), (1000,), (256,), (7,)])
def test_blocks_follow_rows_and_scales_are_block_maxima(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    view = ParamView.of(x)
    slot = Slot("m", FIRST_MOMENT)
    stored = CODEC.init(slot, x, view, stats=LocalStats())
    scale = stored["m.scale"]
    if x.dim() >= 2:
        rows = x.reshape(shape[0], -1)
        blocks = math.ceil(rows.shape[1] / BLOCK)
        assert tuple(scale.shape) == (shape[0], blocks)
        for b in range(blocks):  # a block never crosses a row; the last one may be short
            assert torch.equal(scale[:, b], rows[:, b * BLOCK : (b + 1) * BLOCK].abs().amax(dim=1))
    else:
        flat = x.reshape(-1)
        assert tuple(scale.shape) == (math.ceil(flat.numel() / BLOCK),)
        for b in range(scale.numel()):
            assert scale[b] == flat[b * BLOCK : (b + 1) * BLOCK].abs().max()
    assert stored["m.codes"].dtype == torch.uint8 and stored["m.codes"].shape == x.shape
    decoded = CODEC.decode(slot, stored, view, torch.float32)
    # the block maximum is stored exactly; every element within half a code spacing (0.9/128)
    assert torch.equal(decoded.abs().reshape(-1).max(), x.abs().max())
    assert (decoded - x).abs().max() <= 0.9 / 128 * x.abs().max() + 1e-7


def test_a_shard_of_whole_rows_holds_whole_blocks():
    """FSDP2 splits dimension 0: a process holding rows [3, 7) of a (10, 300) tensor computes
    the same codes and scales as those rows of the whole tensor, with no communication."""
    x = torch.randn(10, 300, generator=torch.Generator().manual_seed(2))
    slot = Slot("v", SECOND_MOMENT)
    whole = CODEC.init(slot, x.abs(), ParamView.of(x), stats=LocalStats())
    shard_view = ParamView(global_shape=x.shape, row_start=3, local_rows=4)
    shard = CODEC.init(slot, x[3:7].abs(), shard_view, stats=LocalStats())
    assert torch.equal(shard["v.codes"], whole["v.codes"][3:7])
    assert torch.equal(shard["v.scale"], whole["v.scale"][3:7])
    assert tuple(shard["v.scale"].shape) == scale_shape(shard_view) == (4, 2)


@pytest.mark.parametrize("kind", [FIRST_MOMENT, SECOND_MOMENT])
@pytest.mark.parametrize(
    ("shape", "view"),
    [
        ((10, 300), None),
        ((3000,), None),
        ((4, 300), ParamView(global_shape=torch.Size((10, 300)), row_start=3, local_rows=4)),
    ],
)
def test_zero_state_is_created_without_encoding_and_equals_encoded_zeros(kind, shape, view):
    """The engine creates zero-initialised 8-bit slots as zero codes and scales (no encode pass
    over the state on the first step): exactly what encoding zeros stores, in both codes."""
    slot = Slot("m", kind)
    view = view or ParamView.of(torch.empty(shape))
    zeros = torch.zeros(shape)
    fast = CODEC.init_zeros(slot, zeros, torch.float32, view, stats=LocalStats())
    encoded = CODEC.init(slot, zeros, view, stats=LocalStats())
    assert fast.keys() == encoded.keys()
    for key, value in encoded.items():
        assert torch.equal(fast[key], value) and fast[key].dtype == value.dtype, key


def test_threshold_is_decided_from_the_global_size():
    rule = hfoptim.AdamW.rule_class
    group = {"state": "8bit", "state_min_numel": 4096}
    slot = rule.slots[0]
    big_shard = ParamView(global_shape=torch.Size((64, 128)), row_start=0, local_rows=2)  # 256 local
    small_whole = ParamView(global_shape=torch.Size((40, 100)))  # 4000 < 4096
    assert resolve.codec_for(rule, slot, group, big_shard) is CODEC
    assert resolve.codec_for(rule, slot, group, small_whole) is CODECS["fp32"]


# ---------------------------------------------------------------------------------- fp32 twin
def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40, 300), (5000,), (7,), (3, 4, 5)]]


def test_fp32_form_is_bit_identical_to_the_default_and_to_a_threshold_fallback():
    """state='fp32', the default state, and state='8bit' on tensors all below the threshold must
    run exactly the same arithmetic (the last one also through the chunked path: chunks forced
    small: groups of 1000 elements, larger tensors in row pieces)."""
    runs = []
    for options in ({"state": "fp32"}, {}, {"state": "8bit", "state_min_numel": 10**9, "chunk_bytes": 64 * 1000}):
        params = _params()
        opt = hfoptim.AdamW(params, **HP, **options)
        for t in range(1, 8):
            gen = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append((params, opt))
    (ref, ref_opt), *others = runs
    for params, opt in others:
        for p, q in zip(params, ref):
            assert torch.equal(p, q)
            assert set(opt.state[p]) == set(ref_opt.state[q])
            for key in opt.state[p]:
                assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key


def _mlp(seed=0, widths=(48, 300, 256, 8)):
    """A small MLP; the default widths give rows of 48 (one short block per row) and of 300 (a
    full block and a short one)."""
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1])


def _batches(steps, seed=1, width=48):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, 8, generator=gen)
    for _ in range(steps):
        x = torch.randn(32, width, generator=gen)
        yield x, (x @ w).argmax(dim=1)


def decoded_state(opt, p) -> dict[str, torch.Tensor]:
    group = opt.param_groups[0]
    view = opt.param_view(p)
    out = {}
    for slot in opt.rule.active_slots(group):
        codec = resolve.codec_for(opt.rule, slot, group, view)
        out[slot.name] = codec.decode(slot, opt.state[p], view, torch.float32)
    return out


def run_twins(name: str, form: str, hp: dict, steps: int = 150):
    """The fp32 optimizer and its ``form`` twin, fed the SAME gradients (computed on the fp32
    model) for ``steps`` steps; returns the largest relative parameter deviation (relative to the
    distance the fp32 parameter travelled) and the largest relative state deviation per slot."""
    ref_model, twin_model = _mlp(), _mlp()
    start = [p.detach().clone() for p in ref_model.parameters()]
    ref = hfoptim.create_optimizer(ref_model, name, **hp)
    twin = hfoptim.create_optimizer(twin_model, name, state=form, state_min_numel=256, compile="off", **hp)
    for x, y in _batches(steps):
        loss = torch.nn.functional.cross_entropy(ref_model(x), y)
        ref.zero_grad()
        loss.backward()
        for a, b in zip(twin_model.parameters(), ref_model.parameters()):
            a.grad = b.grad.clone()
        ref.step()
        twin.step()
    param_dev = max(
        ((a - b).norm() / (b - s).norm()).item()
        for a, b, s in zip(twin_model.parameters(), ref_model.parameters(), start)
    )
    state_dev: dict[str, float] = {}
    for a, b in zip(twin_model.parameters(), ref_model.parameters()):
        for key, value in decoded_state(twin, a).items():
            exact = ref.state[b][key]
            state_dev[key] = max(state_dev.get(key, 0.0), ((value - exact).norm() / exact.norm()).item())
    compressed = {k for p in twin_model.parameters() for k in twin.state[p] if "." in k}
    return param_dev, state_dev, compressed


@pytest.mark.parametrize(
    "name, hp, param_bound, state_bounds",
    [
        ("adamw", HP, 0.12, {"exp_avg": 0.05, "exp_avg_sq": 0.06}),
        ("ademamix", HP_ADEMAMIX, 0.2, {"exp_avg": 0.06, "exp_avg_slow": 0.2, "exp_avg_sq": 0.08}),
    ],
    ids=["adamw", "ademamix"],
)
def test_8bit_stays_near_its_fp32_twin(name, hp, param_bound, state_bounds):
    """Error bound. Each encode rounds a value to the nearest of 64 (first moment) or 128
    (second moment) levels per decade of its block's maximum: at most 0.7% / 0.35% of the block
    maximum for the largest values. Over 200 steps with the same gradients (measured: AdamW
    parameters 4%, moments 2-3%; AdEMAMix 7%, its slow EMA 9% -- a b3 = 0.995 EMA adds 0.5% of
    g per step, below the code spacing, so its error accumulates most) the bounds below hold
    with a margin of about 2."""
    param_dev, state_dev, compressed = run_twins(name, "8bit", hp)
    assert {"exp_avg.codes", "exp_avg_sq.codes"} <= compressed
    assert param_dev < param_bound, f"{name}: parameters deviate by {param_dev:.3f}"
    for key, bound in state_bounds.items():
        assert state_dev[key] < bound, f"{name}: {key} deviates by {state_dev[key]:.3f}"


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", ["adamw_8bit", "ademamix_8bit"])
def test_state_dict_round_trip_mid_run_changes_nothing(name):
    check_resume_mid_run(name, _params, HP if name.startswith("adamw") else HP_ADEMAMIX, "exp_avg.codes")


# ------------------------------------------------------------------------------- bitsandbytes
def test_trajectory_and_bytes_against_bitsandbytes_adamw8bit():
    """Anchor: bitsandbytes' AdamW8bit (blockwise, 256 per block, dynamic codes; runs on CPU).
    Intended differences: bitsandbytes' own dynamic map (levels placed differently, largest
    just below 1), blocks over the flat tensor (ours follow rows; same here: the row lengths
    are multiples of 256 or the tensors are small), eps added to sqrt(v) before the bias
    correction of v (``m_hat / (sqrt(v) + eps sqrt(1-b2^t))`` scaled), and no per-tensor step
    counter tensor. Both quantize the same tensors (4096+ elements). Same data, same
    non-default hyperparameters, 80 steps: both end within 3% of the fp32 loss, their
    parameters as close to each other as each is to fp32 AdamW, and our state is no larger. (On
    rows that are not a multiple of 256 elements, row-laid blocks keep one more scale per row
    than bitsandbytes' flat blocks: 4 bytes per row.)"""
    bnb = pytest.importorskip("bitsandbytes")
    widths = (256, 256, 8)  # rows of 256 elements: whole blocks, as in transformers
    models = {k: _mlp(widths=widths) for k in ("fp32", "ours", "bnb")}
    start = [p.detach().clone() for p in models["fp32"].parameters()]
    opts = {
        "fp32": torch.optim.AdamW(models["fp32"].parameters(), **HP),
        "ours": hfoptim.create_optimizer(models["ours"], "adamw_8bit", compile="off", **HP),
        "bnb": bnb.optim.AdamW8bit(models["bnb"].parameters(), **HP),
    }
    losses = {k: [] for k in models}
    for x, y in _batches(80, seed=3, width=256):
        for key, model in models.items():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opts[key].zero_grad()
            loss.backward()
            opts[key].step()
            losses[key].append(loss.item())
    final = {k: sum(v[-30:]) / 30 for k, v in losses.items()}
    for key in ("ours", "bnb"):
        assert abs(final[key] - final["fp32"]) < 0.03 * final["fp32"], final

    def distance(a, b):
        travelled = sum((q - s).norm() ** 2 for q, s in zip(models["fp32"].parameters(), start)) ** 0.5
        apart = sum((p - q).norm() ** 2 for p, q in zip(models[a].parameters(), models[b].parameters())) ** 0.5
        return (apart / travelled).item()

    ours_fp32, bnb_fp32, ours_bnb = distance("ours", "fp32"), distance("bnb", "fp32"), distance("ours", "bnb")
    assert ours_fp32 < 0.3 and bnb_fp32 < 0.3, (ours_fp32, bnb_fp32)
    assert ours_bnb < 1.5 * max(ours_fp32, bnb_fp32), (ours_fp32, bnb_fp32, ours_bnb)
    assert "state1" in opts["bnb"].state[next(models["bnb"].parameters())]
    # bytes: the whole model, and a large matrix alone
    assert memory.state_bytes(opts["ours"]).total <= memory.state_bytes(opts["bnb"]).total
    big = [torch.nn.Parameter(torch.zeros(1024, 1024)) for _ in range(2)]
    for p in big:
        p.grad = torch.ones_like(p)
    ours, theirs = hfoptim.create_optimizer([big[0]], "adamw_8bit", compile="off"), bnb.optim.AdamW8bit([big[1]])
    ours.step(), theirs.step()
    per_ours, per_bnb = memory.state_bytes(ours).per_param, memory.state_bytes(theirs).per_param
    assert per_ours <= per_bnb, (per_ours, per_bnb)
    assert per_ours == pytest.approx(2 + 8 / 256, abs=1e-5)
