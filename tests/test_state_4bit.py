"""4-bit state (hfoptim.state.fourbit; Li, Chen, Zhu, NeurIPS 2023, arXiv 2309.01507).

What is proven here:

* the levels are the authors' to the bit (thu-ml/low-bit-optimizers, ``lpmm``, commit
  e3e2854728e498c2a606e3fdb88daa27ae94f9a6: ``create_dynamic_map(True, 3, 4)`` for first moments,
  ``create_pow_map(4, False, 1)`` for second moments, written below as fp32 bit patterns), and
  encoding is their kernel's nearest rounding (``quantize_bsearch`` without noise, transcribed
  below: ties go to the lower level, values beyond the ends to the end levels);
* two codes per byte, a line's first half in the low four bits and its second half in the high
  four (theirs pairs elements ``2k`` and ``2k + 1``; ``planar_from_interleaved`` turns their
  bytes and format-1 checkpoints into ours, losslessly), rows never sharing a byte;
* the whole quantizer against a transcription of lpmm's ``quant_scaling`` + ``nonlinear_quant``
  ("group" scaling in flat blocks of 128 for ``exp_avg``, "rank1" for ``exp_avg_sq``: the min of
  the per-dimension maxima, flat blocks of 128 for vectors): the same codes (their bytes
  reordered, bit for bit) and scales, on tensors whose rows are whole blocks (ours follow rows, theirs the flat tensor);
  decoding is their dequantization, and the no-zero map keeps every decoded second moment
  positive wherever its scale is;
* the 4-bit/fp32 threshold is the GLOBAL size; the foreach and per-tensor engine paths agree;
* 4-bit AdamW and AdEMAMix stepped beside their fp32 twin (same gradients, non-default
  hyperparameters, 150 steps) stay within the bounds of ``test_4bit_stays_near_its_fp32_twin``;
* a state_dict round trip mid-run changes nothing (bit-identical continuation);
* bytes: AdamW keeps 1/2 + 4/128 + 1/2 + 4 (rows + cols) / numel bytes per parameter (1.033 on a
  4096x4096 matrix), measured equal to ``hfoptim.memory.estimate``;
* against torchao's AdamW4bit (measured here: final losses 1.156 ours, 1.154 torchao, 1.142
  fp32 AdamW; each 0.20 of the distance travelled from fp32 AdamW, 0.18 from each other; 1.039
  vs 1.063 state bytes per parameter on a 1024x1024 matrix).

Exactness under FSDP2 and ZeRO is proven by the sharding matrix (tests/distributed: every
``*_4bit`` name is a case; codes compared element by element with one process).
"""

from __future__ import annotations

import struct
from unittest import mock

import pytest
import torch

import hfoptim
from hfoptim import memory
from hfoptim.core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
from hfoptim.core.stats import LocalStats, ParamView
from hfoptim.state import CODECS, resolve
from hfoptim.state.convert import STATE_FORMAT
from hfoptim.state.fourbit import BLOCK4, LINEAR4, SIGNED4, pack, packed_shape, planar_from_interleaved, unpack
from tests.harness import check_resume_mid_run, interleaved
from tests.test_state_8bit import _batches, _mlp, run_twins

CODEC = CODECS["4bit"]
HP = dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)
HP_ADEMAMIX = dict(HP, betas=(0.85, 0.98, 0.995), alpha=3.0)

#: lpmm's first-moment map (create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)), as
#: fp32 bit patterns computed from their code at the commit above
LPMM_SIGNED = [
    0xBF633333, 0xBF29999A, 0xBEE00000, 0xBE599999, 0xBD9EB852, 0xBD051EB9, 0xBBB43958, 0x00000000,
    0x3BB43958, 0x3D051EB9, 0x3D9EB852, 0x3E599999, 0x3EE00000, 0x3F29999A, 0x3F633333, 0x3F800000,
]  # fmt: skip


def _floats(bits: list[int]) -> torch.Tensor:
    return torch.tensor([struct.unpack("<f", struct.pack("<I", b))[0] for b in bits], dtype=torch.float32)


# ----------------------------------------------------------------------------------- the codes
def test_levels_are_the_authors():
    assert torch.equal(SIGNED4.table, _floats(LPMM_SIGNED))
    # the paper's description: 0, +1, and per decade 10^-e (e = 0, 1, 2) 2^(2-e) levels of each sign
    mags = SIGNED4.table.double()
    for e, count in ((0, 4), (1, 2), (2, 1)):
        inside = ((mags.abs() > 10.0 ** -(e + 1)) & (mags.abs() < 10.0**-e)).sum().item()
        assert inside == 2 * count, e
    assert 0.0 in SIGNED4.table.tolist() and 1.0 in SIGNED4.table.tolist() and -1.0 not in SIGNED4.table.tolist()
    # second moments: linspace(0, 1, 17)[1:] -- the linear map without zero
    assert torch.equal(LINEAR4.table, torch.linspace(0, 1, 17)[1:])
    assert float(LINEAR4.table.min()) == 1 / 16


def _lpmm_bsearch(qmap: list[float], x: float) -> int:
    """lpmm's ``quantize_bsearch`` (quantization_kernel.cu) without noise, transcribed."""
    lo, hi = 0, len(qmap)
    f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
    if x <= qmap[lo]:
        return lo
    if qmap[hi - 1] <= x:
        return hi - 1
    while lo < hi:
        mi = (lo + hi) >> 1
        if qmap[mi] <= x:
            lo = mi + 1
        else:
            hi = mi
    mid = f32(f32(qmap[lo - 1] + qmap[lo]) * 0.5)
    return lo if mid < x else lo - 1


@pytest.mark.parametrize("code", [SIGNED4, LINEAR4], ids=["signed", "linear"])
def test_encode_is_the_authors_nearest_rounding(code):
    gen = torch.Generator().manual_seed(0)
    mids = code.midpoints
    y = torch.cat(
        [
            torch.rand(3000, generator=gen) * 2.2 - 1.1,
            torch.logspace(-6, 0, 300),
            -torch.logspace(-6, 0, 300),
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            code.table,
            torch.tensor([0.0, -0.0, 1.0, 5.0, -5.0]),
        ]
    )
    got = code.encode(y)
    assert got.dtype == torch.uint8
    qmap = code.table.tolist()
    expected = torch.tensor([_lpmm_bsearch(qmap, v) for v in y.tolist()], dtype=torch.uint8)
    assert torch.equal(got, expected)
    # nearest in the plain sense (up to the fp32 rounding of the midpoints)
    chosen = (code.decode(got) - y).abs()
    best = (y[:, None] - code.table[None, :]).abs().min(dim=1).values
    assert bool((chosen <= best + 6e-8).all())


# ----------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("shape", [(4, 6), (3, 7), (5,), (1,), (2, 3, 5), (0, 4)])
def test_two_codes_per_byte_first_half_low(shape):
    view = ParamView(global_shape=torch.Size(shape))
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack(codes, view)
    assert tuple(packed.shape) == packed_shape(view)
    assert torch.equal(unpack(packed, view), codes)
    if not codes.numel():
        return
    lines = codes.reshape(shape[0], -1) if len(shape) >= 2 else codes.reshape(1, -1)
    bytes_ = packed.reshape(lines.shape[0], -1)
    half = -(-lines.shape[1] // 2)
    assert torch.equal(bytes_ & 15, lines[:, :half])  # the first half in the low four bits
    assert torch.equal(bytes_[:, : lines.shape[1] - half] >> 4, lines[:, half:])  # the second in the high
    if lines.shape[1] % 2:  # an odd line's last byte has a zero high half
        assert bool((bytes_[:, -1] >> 4 == 0).all())
    # format 1 (and the authors' code): elements 2k and 2k + 1 in byte k, reordered losslessly
    pairs = torch.nn.functional.pad(lines, (0, lines.shape[1] % 2)).reshape(lines.shape[0], -1, 2)
    interleaved = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(packed.shape)
    assert torch.equal(planar_from_interleaved(interleaved, view), packed)


# ------------------------------------------------------------------------- the authors' quantizer
def _lpmm_quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """lpmm's ``vectorwise_quant`` for the default config (functional.py: ``quant_scaling``,
    ``group_tensor``, ``get_sm3_statistics``, ``_compute_sm3_scale_tensor``, ``pack_nonlinear``),
    transcribed: returns the packed bytes of the flattened tensor and the scales."""
    if kind == FIRST_MOMENT or x.dim() == 1:  # "group" (and "rank1" of a vector): flat blocks of 128
        flat = x.reshape(-1)
        pad = (-flat.numel()) % 128
        groups = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 128)
        scales = [groups.abs().amax(dim=1, keepdim=True)]
        normalized = groups.div(scales[0])
    else:  # "rank1": min over dimensions of the max over all the other dimensions
        maxima = []
        for k in range(x.dim()):
            m = x.abs()
            for d in range(x.dim()):
                if d != k:
                    m = m.max(dim=d, keepdim=True).values
            maxima.append(m)
        scale = maxima[0].clone()
        for m in maxima[1:]:
            scale = torch.min(scale, m)
        scales = maxima
        normalized = x.div(scale)
    qmap = (SIGNED4 if kind == FIRST_MOMENT else LINEAR4).table.tolist()
    idx = torch.tensor([_lpmm_bsearch(qmap, v) for v in normalized.reshape(-1).tolist()], dtype=torch.uint8)
    idx = idx[: x.numel()]
    pairs = torch.cat([idx, idx.new_zeros(idx.numel() % 2)]).view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), scales


@pytest.mark.parametrize("kind", [FIRST_MOMENT, SECOND_MOMENT])
@pytest.mark.parametrize("shape", [(6, 256), (3, 4, 64), (1024,), (2, 2, 3, 64)])
def test_quantizer_equals_the_authors(kind, shape):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 0, shape[-1])  # per-column spread
    if kind == SECOND_MOMENT:
        x = x.square()
    slot = Slot("s", kind)
    view = ParamView.of(x)
    stored = CODEC.init(slot, x, view, stats=LocalStats())
    theirs, scales = _lpmm_quantize(x, kind)
    assert torch.equal(stored["s.packed"], planar_from_interleaved(theirs, view).reshape(stored["s.packed"].shape))
    if kind == FIRST_MOMENT or x.dim() == 1:
        assert torch.equal(stored["s.scale"].reshape(-1), scales[0].reshape(-1))
    else:
        for k, m in enumerate(scales):
            assert torch.equal(stored[f"s.max{k}"], m.reshape(-1))
    # decoding is their dequantization: level times scale
    decoded = CODEC.decode(slot, stored, view, torch.float32)
    levels = (SIGNED4 if kind == FIRST_MOMENT else LINEAR4).table
    codes = torch.stack([theirs & 15, theirs >> 4], dim=1).reshape(-1)[: x.numel()].long()
    if kind == FIRST_MOMENT or x.dim() == 1:
        per_element = scales[0].expand(-1, 128).reshape(-1)[: x.numel()]
    else:
        scale = scales[0]
        for m in scales[1:]:
            scale = torch.min(scale, m)
        per_element = scale.reshape(-1)
    assert torch.equal(decoded.reshape(-1), levels[codes] * per_element)


def test_rows_that_are_not_whole_blocks_keep_their_own_blocks():
    """Ours: blocks of 128 along each row (a (5, 300) tensor: 3 blocks per row, the last of 44);
    lpmm: flat blocks across rows. Each element is within half a level spacing of its block's
    maximum, and a row's scales are its own maxima."""
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    slot = Slot("m", FIRST_MOMENT)
    stored = CODEC.init(slot, x, ParamView.of(x), stats=LocalStats())
    scale = stored["m.scale"]
    assert tuple(scale.shape) == (5, 3)
    for b in range(3):
        assert torch.equal(scale[:, b], x[:, b * BLOCK4 : (b + 1) * BLOCK4].abs().amax(dim=1))
    decoded = CODEC.decode(slot, stored, ParamView.of(x), torch.float32)
    per_element = scale.repeat_interleave(BLOCK4, dim=1)[:, :300]
    # half the widest gap (0.225, between 0.4375 and 0.6625), or -1 to the lowest level -0.8875
    worst = max(float(SIGNED4.table.diff().max()) / 2, 1 + float(SIGNED4.table[0]))
    assert bool(((decoded - x).abs() <= (worst + 1e-6) * per_element).all())
    top = x == per_element  # a positive block maximum is stored exactly (level +1; there is no -1)
    assert int(top.sum()) > 0 and torch.equal(decoded[top], x[top])


def test_second_moments_never_decode_to_zero_where_their_scale_is_positive():
    """The zero-point problem: with a zero level, 1/sqrt(v) of a small entry would explode."""
    v = torch.rand(64, 256, generator=torch.Generator().manual_seed(4)) ** 8  # many tiny entries
    v[0, 0] = 0.0
    slot = Slot("v", SECOND_MOMENT)
    stored = CODEC.init(slot, v, ParamView.of(v), stats=LocalStats())
    decoded = CODEC.decode(slot, stored, ParamView.of(v), torch.float32)
    scale = torch.minimum(stored["v.max0"][:, None], stored["v.max1"][None, :])
    assert bool((scale >= v).all())  # rank-1 scales bound every element
    assert bool((decoded >= scale / 16).all()) and bool((decoded > 0).all())
    zeros = CODEC.decode(
        slot,
        CODEC.init(slot, torch.zeros(8, 256), ParamView.of(v[:8]), stats=LocalStats()),
        ParamView.of(v[:8]),
        torch.float32,
    )
    assert bool((zeros == 0).all())  # an all-zero state (the initial one) decodes to zero


@pytest.mark.parametrize("kind", [FIRST_MOMENT, SECOND_MOMENT])
@pytest.mark.parametrize("shape", [(1000,), (5, 300), (3, 4, 50)])
def test_the_exported_value_encodes_back_to_the_same_state(kind, shape):
    """A resharded checkpoint (FSDP2 + DCP) carries slots whose stored tensors cannot be cut
    by rows (vectors) as ``export_value`` and encodes it again for the new shards: the codes
    and scales must come back bit for bit -- also for blocks whose largest magnitude is
    negative, which the plain decode would return at 0.8875 of their scale (no -1 level)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    if kind == SECOND_MOMENT:
        x = x.square()
    slot, view = Slot("s", kind), ParamView(global_shape=torch.Size(shape))
    stored = CODEC.init(slot, x, view, stats=LocalStats())
    again = CODEC.init(slot, CODEC.export_value(slot, stored, view, torch.float32), view, stats=LocalStats())
    for key in stored:
        assert torch.equal(again[key], stored[key]), key
    if kind == FIRST_MOMENT:  # the plain decode does not round-trip here
        plain = CODEC.init(slot, CODEC.decode(slot, stored, view, torch.float32), view, stats=LocalStats())
        assert not torch.equal(plain["s.scale"], stored["s.scale"])


def test_threshold_is_decided_from_the_global_size():
    rule = hfoptim.AdamW.rule_class
    group = {"state": "4bit", "state_min_numel": 4096}
    slot = rule.slots[0]
    big_shard = ParamView(global_shape=torch.Size((64, 128)), row_start=0, local_rows=2)  # 256 local
    small_whole = ParamView(global_shape=torch.Size((40, 100)))
    assert resolve.codec_for(rule, slot, group, big_shard) is CODEC
    assert resolve.codec_for(rule, slot, group, small_whole) is CODECS["fp32"]


# ---------------------------------------------------------------------------------- engine paths
def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 300), (5000,), (7,), (3, 4, 50), (64, 129)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(t, params):
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("name", ["adamw_4bit", "ademamix_4bit"])
def test_foreach_and_per_tensor_paths_agree(name):
    hp = HP if name.startswith("adamw") else HP_ADEMAMIX
    runs = []
    for foreach in (True, False):
        params = _params()
        opt = hfoptim.create_optimizer(params, name, state_min_numel=256, compile="off", foreach=foreach, **hp)
        for t in range(1, 8):
            _grads(t, params)
            opt.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            if value.dtype == torch.uint8:  # a rounding difference may move a value across a midpoint
                assert (value != other).float().mean() < 2e-3, key
            else:
                torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-7)
    assert "exp_avg_sq.max1" in opt_a.state[a[0]] and "exp_avg.packed" in opt_a.state[a[0]]


# ---------------------------------------------------------------------------------- fp32 twin
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, hp, param_bound, state_bounds",
    [
        ("adamw", HP, 0.5, {"exp_avg": 0.4, "exp_avg_sq": 0.3}),
        ("ademamix", HP_ADEMAMIX, 1.0, {"exp_avg": 0.4, "exp_avg_sq": 0.3, "exp_avg_slow": 2.0}),
    ],
    ids=["adamw", "ademamix"],
)
def test_4bit_stays_near_its_fp32_twin(name, hp, param_bound, state_bounds):
    """Error bound. Each encode rounds a value to the nearest of 16 levels of its block's (first
    moment) or rank-1 (second moment) scale: up to 11% of the block maximum for first moments,
    3% of the scale for second moments -- ten times the 8-bit form's steps. Measured over 150
    steps with the same gradients (tests/test_state_8bit.py's MLP and data): AdamW parameters
    0.35 of the distance travelled, exp_avg 0.28, exp_avg_sq 0.18; AdEMAMix parameters 0.76,
    exp_avg 0.29, exp_avg_sq 0.21. The bounds below hold with a margin of about 1.4.

    AdEMAMix's slow EMA (b3 = 0.995 here) is NOT tracked: each step adds 0.5% of the gradient,
    far below half a level spacing, so nearest rounding returns most entries to the level they
    had (the second moment here, b2 = 0.98, adds 2% of a heavy-tailed g^2 per step and keeps
    moving): measured deviation 1.43, about sqrt(2), a stored slow EMA no longer correlated with
    the exact one. The bound 2.0 only says it stays finite and not
    anti-correlated; ademamix_4bit is documented with this limitation (use ademamix_8bit)."""
    param_dev, state_dev, compressed = run_twins(name, "4bit", hp)
    assert {"exp_avg.packed", "exp_avg_sq.packed"} <= compressed
    assert param_dev < param_bound, f"{name}: parameters deviate by {param_dev:.3f}"
    for key, bound in state_bounds.items():
        assert state_dev[key] < bound, f"{name}: {key} deviates by {state_dev[key]:.3f}"


# ---------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", ["adamw_4bit", "ademamix_4bit"])
def test_state_dict_round_trip_mid_run_changes_nothing(name):
    check_resume_mid_run(name, _params, HP if name.startswith("adamw") else HP_ADEMAMIX, "exp_avg.packed")


def as_format1(state_dict: dict, params: list) -> dict:
    """``state_dict`` as hfoptim's state format 1 saved it: every 4-bit code interleaved."""
    changed = 0
    for pid, pstate in state_dict["state"].items():
        for key in [k for k in pstate if k.endswith(".packed")]:
            old = interleaved(pstate[key], ParamView.of(params[pid]))
            changed += not torch.equal(old, pstate[key])
            pstate[key] = old
    assert changed >= 4  # the upgrade is what makes the resume exact
    state_dict["hfoptim"]["format"] = 1
    return state_dict


@pytest.mark.parametrize("name", ["adamw_4bit", "ademamix_4bit"])
def test_a_format1_checkpoint_resumes_exactly(name):
    """A checkpoint of state format 1 (codes interleaved) is upgraded on load: the run goes on
    exactly as the uninterrupted one, odd rows (64x129) and a vector included."""
    hp = HP if name.startswith("adamw") else HP_ADEMAMIX
    check_resume_mid_run(name, _params, hp, "exp_avg.packed", saved=as_format1)


def test_a_checkpoint_of_a_newer_format_is_refused_by_name():
    params = _params()
    opt = hfoptim.create_optimizer(params, "adamw_4bit", state_min_numel=256, compile="off")
    _grads(1, params)
    opt.step()
    state_dict = opt.state_dict()
    assert state_dict["hfoptim"]["format"] == STATE_FORMAT
    state_dict["hfoptim"]["format"] = STATE_FORMAT + 1
    with pytest.raises(ValueError, match=f"hfoptim state format {STATE_FORMAT + 1}.*newer hfoptim"):
        opt.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------- bytes
def test_bytes_per_parameter_measured_and_estimated():
    p = torch.nn.Parameter(torch.zeros(1024, 1536))
    p.grad = torch.ones_like(p)
    opt = hfoptim.create_optimizer([p], "adamw_4bit", compile="off")
    opt.step()
    measured = memory.state_bytes(opt)
    assert measured.total == memory.estimate([p], "adamw_4bit").total
    numel = p.numel()
    expected = numel / 2 + 4 * numel / 128 + numel / 2 + 4 * (1024 + 1536) + 4  # codes, scales, maxima, step
    assert measured.total == expected
    assert measured.per_param == pytest.approx(1.0378, abs=1e-4)
    assert memory.per_param("adamw_4bit") == pytest.approx(0.5 + 4 / 128 + 0.5 + 8 * 4096 / 4096**2, abs=1e-6)
    assert memory.per_param("ademamix_4bit") == pytest.approx(2 * (0.5 + 4 / 128) + 0.5 + 8 / 4096, abs=1e-6)


# ------------------------------------------------------------------------------------- torchao
def test_trajectory_and_bytes_against_torchao_adamw4bit():
    """Anchor: torchao's AdamW4bit (a dev dependency, not a dependency of hfoptim): 4-bit codes in
    flat blocks of 128 for BOTH moments (the authors' maps: dynamic exponent, linear without
    zero for the second moment), no rank-1 normalization, fp32 kept below 4096 elements; its
    step run uncompiled here (same arithmetic). Same data, same non-default hyperparameters, 80
    steps: both end within 5% of the fp32 loss, as close to each other as each is to fp32 AdamW,
    and our state is no larger (rank-1 maxima instead of a scale per 128 second moments)."""
    ao = pytest.importorskip("torchao.optim")
    widths = (256, 256, 8)
    models = {k: _mlp(widths=widths) for k in ("fp32", "ours", "ao")}
    start = [p.detach().clone() for p in models["fp32"].parameters()]
    with mock.patch.object(torch, "compile", lambda fn, **options: fn):
        opts = {
            "fp32": torch.optim.AdamW(models["fp32"].parameters(), **HP),
            "ours": hfoptim.create_optimizer(models["ours"], "adamw_4bit", compile="off", **HP),
            "ao": ao.AdamW4bit(models["ao"].parameters(), **HP),
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
    for key in ("ours", "ao"):
        assert abs(final[key] - final["fp32"]) < 0.05 * final["fp32"], final

    def distance(a, b):
        travelled = sum((q - s).norm() ** 2 for q, s in zip(models["fp32"].parameters(), start)) ** 0.5
        apart = sum((p - q).norm() ** 2 for p, q in zip(models[a].parameters(), models[b].parameters())) ** 0.5
        return (apart / travelled).item()

    ours_fp32, ao_fp32, ours_ao = distance("ours", "fp32"), distance("ao", "fp32"), distance("ours", "ao")
    assert ours_fp32 < 0.4 and ao_fp32 < 0.4, (ours_fp32, ao_fp32)
    assert ours_ao < 1.5 * max(ours_fp32, ao_fp32), (ours_fp32, ao_fp32, ours_ao)
    assert memory.state_bytes(opts["ours"]).total <= memory.state_bytes(opts["ao"]).total
