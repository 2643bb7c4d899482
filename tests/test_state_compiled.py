"""The compiled path for compressed state (hfoptim.core.compiled_step).

The same rule code runs traced by torch.compile, one kernel per parameter; it must agree with
the plain path (up to floating-point contraction, which can move a value sitting on a code
midpoint to the neighbouring code), compile without graph breaks, not recompile when the
learning rate or the step changes, and fall back to the plain path with a warning when
compiling fails. The tests that compile are marked ``slow`` (a first compilation takes tens of
seconds on a small CPU).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hfoptim
from hfoptim.core import compiled_step, kernel_build
from hfoptim.core.stats import ParamView
from hfoptim.state.blockwise8bit import dequantize, quantize, scale_shape
from hfoptim.state.dynamic_code import SIGNED, UNSIGNED, decode_codes
from tests.harness import DEVICE

ROOT = Path(__file__).resolve().parents[1]

#: rows of whole 256-blocks, rows with a short last block, a vector of whole blocks, a vector
#: ending in a short block, rows shorter than a block
SHAPES = [(64, 512), (48, 300), (4096,), (3000,), (40, 100)]
HP = dict(lr=3e-3, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)
#: non-default hyperparameters of the rules whose betas or options differ from AdamW's
RULE_HP = {
    # the warm-ups of alpha and beta3 read the (traced) step; T = 3 < steps: past the end too
    "ademamix": dict(HP, betas=(0.85, 0.98, 0.995), alpha=3.0, t_alpha=3.0, t_beta3=3.0),
    "adan": dict(HP, betas=(0.9, 0.9, 0.98)),
    "adapnm": dict(HP, betas=(0.85, 0.98, 0.8)),
    "adafactor": dict(lr=3e-3, weight_decay=0.05, beta1=0.9),
    # issue 16
    "adagl": dict(HP, alpha=0.6, history=3, step_control="mean"),
    "adamomentum": dict(HP, eps_mode="accumulate"),
    "adamw_spectralcap": dict(HP, spectral_cap=1e-3, spectral_cap_iters=3),
    # issue 16 (i16): adaptive memory, beta_t from whole-tensor inner products in the graph
    "adamw_am": dict(HP, am_lambda=0.3),
    "sgdm_am": dict(lr=3e-3, weight_decay=0.05, am_lambda=0.5),
}


def _compiled(fn, options: dict | None = None):
    return torch.compile(fn, dynamic=False, fullgraph=True, options=options)


def _run(name: str, compile: str, steps: int = 4, lr_schedule: bool = False, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in SHAPES]
    hp = RULE_HP.get(name.rsplit("_", 1)[0], HP)
    opt = hfoptim.create_optimizer(params, name, compile=compile, state_min_numel=256, **hp, **kwargs)
    for t in range(1, steps + 1):
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(DEVICE)
        if lr_schedule:
            for group in opt.param_groups:
                group["lr"] = HP["lr"] / t
        opt.step()
    return params, opt


@pytest.mark.slow
@pytest.mark.parametrize(
    # adan: its first-step guard, adapnm: its step-parity swap and adafactor: its relative step
    # read the step, which is a traced tensor here (a Python branch on it breaks the graph)
    "name",
    [
        *("adamw_8bit", "ademamix_8bit", "adamw_bf16", "adan_8bit", "adapnm_8bit", "adafactor_bf16", "adamw_4bit"),
        # issue 16: a shifted gradient history; eps accumulated into v; power iteration in the graph
        *("adagl_8bit", "adamomentum_8bit", "adamw_spectralcap_8bit", "adamw_am_8bit", "sgdm_am_8bit"),
        # per-row statistics: in place on CPU through the kit's local-buffer fix (core/local_buffers.py)
        *("adamw_8bit+agc", "adan_8bit+norm_loss", "ademamix_8bit+centralize", "adamw_8bit+soft_clip"),
    ],
)
def test_compiled_path_agrees_with_the_plain_path(name):
    from torch._dynamo.utils import counters

    name, _, option = name.partition("+")
    options = {option: {"agc": 0.05, "norm_loss": 0.01}.get(option, True)} if option else {}
    compiled_step.reset()
    counters.clear()
    compiled, c_opt = _run(name, "on", lr_schedule=True, **options)
    # every tensor took the kernel at every step
    assert sum(compiled_step.calls.values()) == 4 * len(SHAPES), compiled_step.calls
    plain, p_opt = _run(name, "off", lr_schedule=True, **options)
    # one graph per shape, traced whole by the kit: no recompilation for the learning rate or
    # the step, which change every step here
    assert compiled_step.traced == {"kit": len(SHAPES), "dynamo": 0}, compiled_step.traced
    # a per-row statistic summed in another order moves its factor (AGC's clip) by an ulp, which
    # can flip a code sitting on a midpoint; that element's later updates then move by about lr
    # times a code spacing (seen: one element of 4000 by 6.5e-6, lr 3e-3)
    _assert_agrees(compiled, c_opt, plain, p_opt, atol=1e-5 if option else 1e-6)


def _assert_agrees(compiled, c_opt, plain, p_opt, atol):
    """Parameters and state of a compiled run against the plain run's."""
    for p, q in zip(compiled, plain):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol)
        for key, value in p_opt.state[q].items():
            mine = c_opt.state[p][key]
            if value.dtype == torch.uint8:  # codes: a rounding difference may flip a rare one
                assert (mine != value).float().mean() < 1e-3, key
            elif value.dtype == torch.bfloat16:  # rounded to bf16: the same, a rare one by a few ulps
                # (on an H200 one element of 32768 of adafactor_bf16 by 4 ulps: Triton's fp32
                # order of operations moves a value across a rounding boundary)
                close = torch.isclose(mine.float(), value.float(), rtol=1e-2, atol=1e-6)
                assert (~close).float().mean() < 1e-3, key
            else:
                torch.testing.assert_close(mine.float(), value.float(), rtol=1e-2, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, view",
    [
        ((64, 512), None),  # whole blocks
        ((48, 300), None),  # a short last block per row
        ((1, 3000), None),  # one row with a short last block (inductor 2.13 miscompiled index math here)
        ((512, 1376), None),  # a Llama-style down-projection with an odd intermediate size
        ((40, 100), None),  # rows shorter than a block
        ((3000,), None),
        ((5, 7, 40), None),
        ((700,), ParamView(global_shape=torch.Size((5000,)), row_start=300, local_rows=700)),  # a shard in a block
    ],
)
def test_compiled_quantize_and_dequantize_equal_eager(shape, view, fresh_dynamo):
    view = view or ParamView(global_shape=torch.Size(shape))
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    scale = torch.rand(scale_shape(view), generator=gen)
    x = torch.randn(shape, generator=gen)
    for code in (SIGNED, UNSIGNED):
        dq = lambda c, s, code=code: dequantize(c, s, view, code)  # noqa: E731
        q = lambda v, s, code=code: quantize(v, s, view, code)  # noqa: E731
        assert torch.equal(dq(codes, scale), _compiled(dq)(codes, scale))
        assert torch.equal(q(x, scale), _compiled(q)(x, scale))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(64, 512), (48, 300), (1, 3000), (40, 100), (3000,), (5, 7, 41)])
def test_compiled_4bit_encode_and_decode_equal_eager(shape, fresh_dynamo):
    """The 4-bit form's encode (block or rank-1 maxima, nearest level, packing) and decode,
    compiled alone, give the eager bytes and values exactly, first and second moments."""
    from hfoptim.core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
    from hfoptim.core.stats import LocalStats
    from hfoptim.state import CODECS

    codec, view = CODECS["4bit"], ParamView(global_shape=torch.Size(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for slot, value in ((Slot("m", FIRST_MOMENT), x), (Slot("v", SECOND_MOMENT), x.square())):

        def roundtrip(value, slot=slot):
            stored = {
                k: torch.zeros(s, dtype=torch.uint8 if k.endswith(".packed") else torch.float32)
                for k, s in codec.shapes(slot, view, value).items()
            }
            codec.encode(slot, stored, value, view, stats=LocalStats())
            return stored, codec.decode(slot, stored, view, torch.float32)

        eager, eager_value = roundtrip(value)
        compiled, compiled_value = _compiled(roundtrip)(value)
        for key in eager:
            assert torch.equal(eager[key], compiled[key]), key
        assert torch.equal(eager_value, compiled_value)


def test_compiled_4bit_code_finds_the_nearest_level_at_every_midpoint(fresh_dynamo):
    """The compiled 4-bit encode (fifteen selects over the midpoints) gives what ``bucketize``
    gives (the eager encode) on every midpoint, one ulp on either side of it, every level and
    beyond both ends, for both codes: a value on a midpoint takes the lower level."""
    from hfoptim.state.fourbit import LINEAR4, SIGNED4

    for code in (SIGNED4, LINEAR4):
        mids = code.midpoints
        y = torch.cat(
            [
                mids,
                torch.nextafter(mids, torch.full_like(mids, 2.0)),
                torch.nextafter(mids, torch.full_like(mids, -2.0)),
                code.table,
                torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]),
            ]
        )
        expected = torch.bucketize(y, mids).to(torch.uint8)
        assert torch.equal(_compiled(code.encode)(y), expected), code.name


@pytest.fixture
def no_inductor_cache():
    """Every compilation generates its own code: no kernel from inductor's caches (the tests that
    read the generated code would read another compilation's)."""
    with torch._inductor.config.patch(force_disable_caches=True):
        yield


@contextlib.contextmanager
def _kit_vectors():
    """The kit's vector bit casts, gathers and narrowing, as around its compilations."""
    from hfoptim.core.vector_bitcast import vector_bitcasts
    from hfoptim.core.vector_gather import vector_gathers
    from hfoptim.core.vector_narrow import vector_narrowing

    with vector_bitcasts(), vector_gathers(), vector_narrowing():
        yield


@pytest.mark.slow
@pytest.mark.parametrize("vector", [False, True], ids=["inductor-code", "kit-vectors"])
def test_compiled_8bit_code_forms_are_exact(vector, fresh_dynamo, no_inductor_cache):
    """The compiled 8-bit code (codes read and written as bytes) gives the table's values for
    every code, in a vector and in rows, and encodes to what ``bucketize`` gives on every
    midpoint, one ulp either side of it and every level: with inductor's own code and with the
    kit's vector bit casts, gathers and narrowing (entered around the kit's compilations), whose
    C++ casts with ``at::vec::cast``, reads the encode table with ``at::vec::gather`` and stores
    the int32 codes as bytes without ``at::vec::convert``."""
    from torch._inductor.utils import run_and_get_code

    kit = _kit_vectors if vector else contextlib.nullcontext
    with kit():
        every_code = torch.arange(256, dtype=torch.uint8)
        _, sources = run_and_get_code(_compiled(lambda c: decode_codes(c, SIGNED)), every_code)
    source = "\n".join(sources)
    # the decode's exponent field: a register cast, or inductor's scalar loop of c10::bit_cast
    assert ("at::vec::cast<int32_t>" in source) == vector and ("c10::bit_cast" in source) != vector
    codes = torch.arange(256, dtype=torch.uint8)
    for code in (SIGNED, UNSIGNED):
        decode = _compiled(lambda c, code=code: decode_codes(c, code))
        with kit():
            assert torch.equal(decode(codes), code.table)
            assert torch.equal(decode(codes.view(16, 16).flip(0).contiguous()), code.table.view(16, 16).flip(0))
        mids = code.midpoints
        up, down = torch.full_like(mids, 2.0), torch.full_like(mids, -2.0)
        y = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down), code.magnitudes])
        expected = torch.bucketize(y, mids).to(torch.uint8)
        if code.signed:  # negative values: the magnitude's code with the sign bit
            y, expected = torch.cat([y, -y[y > 0]]), torch.cat([expected, expected[y > 0] + 128])
        assert torch.equal(code.encode(y), expected), code.name
        with kit():
            encoded, sources = run_and_get_code(_compiled(code.encode), y)
        assert torch.equal(encoded, expected), code.name
        # the table read: one vector gather, or inductor's scalar loop through a stack buffer;
        # the codes' store: the kit's narrowing, or ATen's element-by-element conversion
        assert ("at::vec::gather<4>" in "\n".join(sources)) == vector
        assert ("at::vec::convert<uint8_t>" in "\n".join(sources)) != vector


@pytest.mark.slow
def test_traced_table_reads_wrap_no_negative_index(fresh_dynamo, no_inductor_cache):
    """A traced table read (:func:`hfoptim.core.tracing.table_lookup`: the 8-bit encode's table,
    the 4-bit decode's levels) is a gather, whose indices inductor does not wrap: indexing
    ``table[i]`` adds a 64-bit select per element for a negative ``i`` (the control below), which
    made the 8-bit encode 1.7x slower compiled alone. The same entries either way."""
    from torch._inductor.utils import run_and_get_code

    from hfoptim.core.tracing import table_lookup
    from hfoptim.state.fourbit import SIGNED4

    table = torch.arange(3329, dtype=torch.int32) * 3
    index = torch.randint(0, 3329, (8, 256), dtype=torch.int32)

    def compiled(fn):  # with the kit's inductor options, as its kernels are compiled
        return _compiled(fn, kernel_build.INDUCTOR_OPTIONS)

    looked, sources = run_and_get_code(compiled(lambda i: table_lookup(table, i) + 1), index)
    indexed, control = run_and_get_code(compiled(lambda i: table[i.long()] + 1), index)
    assert torch.equal(looked, table[index.long()] + 1) and torch.equal(indexed, looked)
    assert "VecMask<int64_t" in "\n".join(control)  # the wrap: a 64-bit mask of i < 0
    assert "VecMask<int64_t" not in "\n".join(sources)
    y = torch.linspace(-1.0, 1.0, 4096).view(16, 256)
    encoded, sources = run_and_get_code(compiled(SIGNED.encode), y)
    assert torch.equal(encoded, SIGNED.encode(y)) and "VecMask<int64_t" not in "\n".join(sources)
    codes = torch.randint(0, 16, (16, 256), dtype=torch.uint8)
    decoded, sources = run_and_get_code(compiled(SIGNED4.decode), codes)
    assert torch.equal(decoded, SIGNED4.decode(codes)) and "VecMask<int64_t" not in "\n".join(sources)


#: run in a process of its own with inductor's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)
_AVX2_STEPS = """
import torch, hfoptim
from hfoptim.core import compiled_step, vector_bytes, vector_narrow
from tests.test_state_compiled import _run, _assert_agrees, SHAPES
from torch._inductor import cpu_vec_isa
assert isinstance(cpu_vec_isa.pick_vec_isa(), cpu_vec_isa.VecAVX2), cpu_vec_isa.pick_vec_isa()
byte_loads = []
line_of = vector_bytes.byte_load_line
vector_bytes.byte_load_line = lambda *a: byte_loads.append(a) or line_of(*a)
narrowed = []
narrow_of = vector_narrow.narrow_line
vector_narrow.narrow_line = lambda *a: narrowed.append(a) or narrow_of(*a)
for name in ("adamw_8bit", "adan_8bit", "adamw_4bit"):
    compiled_step.reset()
    compiled, c_opt = _run(name, "on", lr_schedule=True)
    assert sum(compiled_step.calls.values()) == 4 * len(SHAPES), compiled_step.calls
    plain, p_opt = _run(name, "off", lr_schedule=True)
    _assert_agrees(compiled, c_opt, plain, p_opt, atol=1e-6)
assert byte_loads and narrowed and {bits for _, bits in narrowed} == {256}
print("ok", len(byte_loads), len(narrowed))
"""


@pytest.mark.slow
def test_avx2_kernels_load_bytes_without_a_stack_buffer_and_step_as_the_plain_path(tmp_path):
    """With inductor's AVX2 kernels (the AVX2-only AMD EPYC; ``ATEN_CPU_CAPABILITY=avx2`` here, in
    a process of its own with an inductor cache of its own, which does not key on it) the kit's
    compilations load eight codes with one instruction (:mod:`hfoptim.core.vector_bytes`) and
    store int32 codes as bytes with a byte shuffle (:mod:`hfoptim.core.vector_narrow`), and the
    8-bit and 4-bit steps compiled so agree with the plain path."""
    env = dict(
        os.environ,
        ATEN_CPU_CAPABILITY="avx2",
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
        HFOPTIM_TEST_DEVICE="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_STEPS], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


@pytest.mark.slow
def test_vector_gathers_read_32_bit_tables_only(fresh_dynamo, no_inductor_cache):
    """Inside ``vector_gathers`` a load from a 32-bit table at an in-kernel index (with a constant
    offset) is a vector gather with the same values; a 64-bit table and a contiguous load keep
    inductor's own code."""
    from torch._inductor.utils import run_and_get_code

    from hfoptim.core.vector_gather import vector_gathers

    index = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    tables = {
        torch.float32: torch.randn(1003),
        torch.int32: torch.randint(-(2**31), 2**31 - 1, (1003,), dtype=torch.int32),
        torch.int64: torch.arange(1003) * 3,
    }
    for dtype, table in tables.items():

        def read(i, t=table):
            return t[i * 2 % 1000 + 3]

        with vector_gathers() as installed:
            got, sources = run_and_get_code(_compiled(read), index)
        assert installed
        assert torch.equal(got, read(index)), dtype
        assert ("at::vec::gather<4>" in "\n".join(sources)) == (dtype != torch.int64), dtype


def test_a_failing_compile_warns_once_and_runs_the_plain_path(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    compiled_step.reset()
    monkeypatch.setattr(compiled_step, "_compiled_fn", lambda key=(): broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback, f_opt = _run("adamw_8bit", "on")
    monkeypatch.undo()
    compiled_step.reset()
    assert sum("the fused optimizer step failed to compile" in str(w.message) for w in caught) == 1
    plain, p_opt = _run("adamw_8bit", "off")
    for p, q in zip(fallback, plain):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_a_kernel_the_gather_hook_cannot_read_keeps_inductors_load(fresh_dynamo, no_inductor_cache, monkeypatch):
    """A kernel object without what the gather hook reads (another inductor's) keeps inductor's
    own load instead of failing the compilation."""
    from torch._inductor.utils import run_and_get_code

    from hfoptim.core import vector_gather

    def unreadable(*args):
        raise AttributeError("_load_mask")

    monkeypatch.setattr(vector_gather, "_gather_line", unreadable)
    table, index = torch.randn(1003), torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    with vector_gather.vector_gathers():
        got, sources = run_and_get_code(_compiled(lambda i: table[i * 2 % 1000 + 3]), index)
    assert torch.equal(got, table[index * 2 % 1000 + 3])
    assert "at::vec::gather" not in "\n".join(sources)


def test_vector_bitcasts_gathers_and_narrowing_are_installed_only_inside_the_context():
    """The kit's vector bit casts, gathers and narrowing replace inductor's code only while one of
    its compilations runs."""
    from torch._inductor.codegen import cpp

    from hfoptim.core.vector_bitcast import vector_bitcasts
    from hfoptim.core.vector_gather import vector_gathers
    from hfoptim.core.vector_narrow import vector_narrowing

    inductor_cast = cpp.CppVecOverrides.__dict__["to_dtype_bitcast"]
    inductor_load = cpp.CppVecKernel.__dict__["load"]
    inductor_convert = cpp.CppVecKernel.__dict__["get_to_dtype_expr"]
    with vector_bitcasts() as casts, vector_gathers() as gathers, vector_narrowing() as narrowing:
        assert casts and cpp.CppVecOverrides.__dict__["to_dtype_bitcast"] is not inductor_cast
        assert gathers and cpp.CppVecKernel.__dict__["load"] is not inductor_load
        assert narrowing and cpp.CppVecKernel.__dict__["get_to_dtype_expr"] is not inductor_convert
    assert cpp.CppVecOverrides.__dict__["to_dtype_bitcast"] is inductor_cast
    assert cpp.CppVecKernel.__dict__["load"] is inductor_load
    assert cpp.CppVecKernel.__dict__["get_to_dtype_expr"] is inductor_convert


@pytest.mark.slow
def test_vector_narrowing_keeps_the_low_byte_of_every_int32(fresh_dynamo, no_inductor_cache):
    """Inside ``vector_narrowing`` a compiled conversion of int32 to uint8 is the kit's (no
    ``at::vec::convert``) and gives eager torch's bytes (the value modulo 256) for every input:
    in range, negative, past 255 and at both ends of int32, over a length with a vector tail;
    a conversion from fp32 keeps inductor's own code."""
    from torch._inductor.utils import run_and_get_code

    from hfoptim.core.vector_narrow import vector_narrowing

    edges = torch.tensor([0, 1, 127, 128, 255, 256, 257, -1, -128, -129, -256, 2**31 - 1, -(2**31)], dtype=torch.int32)
    x = torch.cat([edges, torch.randint(-(2**31), 2**31 - 1, (4099,), generator=torch.Generator().manual_seed(0))])
    with vector_narrowing() as installed:
        got, sources = run_and_get_code(_compiled(lambda v: (v + 3).to(torch.uint8)), x)
    assert installed and torch.equal(got, (x + 3).to(torch.uint8))
    assert "at::vec::convert<uint8_t>" not in "\n".join(sources)
    y = torch.linspace(0.0, 255.0, 4099)
    with vector_narrowing():
        from_floats, sources = run_and_get_code(_compiled(lambda v: v.to(torch.uint8)), y)
    assert torch.equal(from_floats, y.to(torch.uint8))
    assert "_mm512_cvtepi32_epi8" not in "\n".join(sources) and "_mm256_shuffle_epi8" not in "\n".join(sources)


@pytest.mark.slow
def test_inductors_disk_cache_keys_the_kits_code_generation(fresh_dynamo, monkeypatch):
    """A kernel compiled with the kit's code-generation hooks is found again in inductor's disk
    cache by a later compilation with them, and not by one without them (or, through the hash
    of the hooks' sources, with other hooks): the key carries a mark of them."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    def step_and_count(kit_codegen: bool = True) -> tuple[int, int]:
        compiled_step.reset()  # (which turns the hooks on)
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(kernel_build, "_kit_codegen", kit_codegen)
        p = torch.nn.Parameter(torch.randn(512, 256, generator=torch.Generator().manual_seed(0)))
        opt = hfoptim.create_optimizer([p], "adamw_8bit", compile="on", lr=1e-3, state_min_numel=1)
        p.grad = torch.ones_like(p)
        opt.step()
        assert sum(compiled_step.calls.values()) == 1
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    mark = kernel_build.INDUCTOR_OPTIONS["post_grad_custom_pre_pass"]
    with fresh_cache():
        assert step_and_count() == (0, 1)
        assert step_and_count() == (1, 0)
        with_hooks = mark.uuid()
        assert step_and_count(kit_codegen=False) == (0, 1)
        assert mark.uuid() != with_hooks
        assert step_and_count(kit_codegen=False) == (1, 0)
    compiled_step.reset()


def test_the_kits_cache_mark_names_the_cpus_vector_capability(monkeypatch):
    """Inductor's disk cache does not key a kernel by the instruction set it was generated for:
    the kit's mark carries ATen's CPU capability (which ``ATEN_CPU_CAPABILITY`` lowers), so a
    cache written by an AVX-512 process is not read by an AVX2 one."""
    mark = kernel_build.INDUCTOR_OPTIONS["post_grad_custom_pre_pass"]
    here = mark.uuid()
    assert torch.backends.cpu.get_cpu_capability() in here
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "ANOTHER")
    assert mark.uuid() != here


def test_a_compile_failing_with_the_cpu_flags_instruction_set_is_tried_with_inductors_checks(monkeypatch):
    """The kernels compile with inductor's instruction set taken from the CPU's flags
    (``cpp.vec_isa_ok``: no test build per instruction set); a compilation that fails so (a
    compiler without an instruction set the CPU lists) is tried again with inductor's checks,
    and only a failure then counts: no warning, the compiled path, the same numbers."""
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    settings = []

    def picky(*args, **kwargs):
        settings.append(inductor_config.cpp.vec_isa_ok)
        if inductor_config.cpp.vec_isa_ok:
            raise RuntimeError("-mamx-tile: unknown option")
        return compiled_step._advance_one(*args)

    compiled_step.reset()
    cpu_vec_isa.valid_vec_isa_list.cache_clear()  # undecided, as in a fresh process
    monkeypatch.setattr(compiled_step, "_compiled_fn", lambda key=(): picky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retried, _ = _run("adamw_8bit", "on", steps=1)
    monkeypatch.undo()
    assert settings[:2] == [True, None] and set(settings[2:]) == {None}  # trusted once, then checked
    assert not any("the fused optimizer step failed to compile" in str(w.message) for w in caught)
    assert sum(compiled_step.calls.values()) > 0
    compiled_step.reset()
    plain, _ = _run("adamw_8bit", "off", steps=1)
    for p, q in zip(retried, plain):  # the traced step run as Python: the plain path's formulas
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_cpu_flags_instruction_set_is_the_kits_only(monkeypatch):
    """Inductor's list of instruction sets, computed from the CPU's flags for the kit's kernels, is
    not left for the process's other compilations (they check as before)."""
    from torch._inductor import cpu_vec_isa

    compiled_step.reset()
    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    try:
        _run("adamw_8bit", "on", steps=1)
        assert sum(compiled_step.calls.values()) > 0
        assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0
    finally:
        compiled_step.reset()


def test_the_kits_kernels_build_no_test_program_for_the_cpus_extensions(monkeypatch):
    """The AVX-512 extensions (bf16, VNNI, AMX tiles) come from the CPU's flags as the instruction
    set does: from an empty inductor cache the kit's first compilation builds no test program
    (only AMX-FP16's compiler check keeps its build); afterwards inductor's test builds are its
    own again and what it found is forgotten, so other compilations check as before."""
    from torch._inductor import cpu_vec_isa
    from torch._inductor.utils import fresh_cache

    test_builds = []
    inductors_check = cpu_vec_isa.VecISA.check_build

    def counted(isa, code):
        test_builds.append(code)
        return inductors_check(isa, code)

    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", counted)
    compiled_step.reset()
    cpu_vec_isa.valid_vec_isa_list.cache_clear()  # undecided, as in a fresh process
    kernel_build._forget_extensions(cpu_vec_isa)
    try:
        with fresh_cache():
            _run("adamw_8bit", "on", steps=1)
        assert sum(compiled_step.calls.values()) > 0
        assert [code for code in test_builds if code != cpu_vec_isa.VecAMX._amx_fp16_code] == []
        assert cpu_vec_isa.VecISA.check_build is counted
        assert cpu_vec_isa.valid_vec_isa_list.cache_info().currsize == 0
        assert all(klass.__bool__.cache_info().currsize == 0 for klass in (cpu_vec_isa.VecAVX512, cpu_vec_isa.VecAMX))
        assert not any("_is_avx512_bf16_supported" in vars(isa) for isa in cpu_vec_isa.supported_vec_isa_list)
    finally:
        compiled_step.reset()


def test_auto_compiles_only_large_tensors_and_off_never(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(tuple(args[2].shape))
        raise RuntimeError("stop")  # then the plain path runs

    compiled_step.reset()
    monkeypatch.setattr(compiled_step, "_compiled_fn", lambda key=(): spy)
    params = [torch.nn.Parameter(torch.zeros(256, 256)), torch.nn.Parameter(torch.zeros(64, 64))]
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hfoptim.create_optimizer(params, "adamw_8bit").step()  # compile="auto"
    assert set(calls) == {(256, 256)}  # 65536 elements: compiled; 4096: plain
    compiled_step.reset()
    calls.clear()
    hfoptim.create_optimizer(params, "adamw_8bit", compile="off").step()
    assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hfoptim.create_optimizer(params, "adamw").step()  # dense state compiles too (large tensors)
    assert set(calls) == {(256, 256)}
    compiled_step.reset()


def _kernel_shapes(monkeypatch, groups, name: str, **options) -> set:
    """The shapes ``name`` with ``options`` sends to the compiled kernel in one step of
    ``groups`` (the kernel runs uncompiled here: only the decision is tested)."""
    return set(_kernel_calls(monkeypatch, groups, name, **options))


def _kernel_calls(monkeypatch, groups, name: str, **options) -> dict:
    """The kernel calls per key shape ``name`` with ``options`` makes in one step of ``groups``
    (the kernel runs uncompiled here: only the decision is tested)."""
    compiled_step.reset()
    monkeypatch.setattr(compiled_step, "_compiled_fn", lambda key=(): compiled_step._advance_one)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.full_like(p, 0.01)
    try:
        hfoptim.create_optimizer(groups, name, **options).step()
        counts: dict = {}
        for key, n in compiled_step.calls.items():
            counts[tuple(key[1])] = counts.get(tuple(key[1]), 0) + n
        return counts
    finally:
        compiled_step.reset()


def test_auto_compiles_small_tensors_of_a_shape_a_group_has_many_of(monkeypatch):
    """compile='auto' gives the kernel to tensors under 65536 elements whose state a form codes
    tensor by tensor (8-bit, 4-bit, bf16, SMMF) when their group steps 32 or more of their shape
    (LoRA adapters: one compilation for all of them); 31 of a shape, dense state (foreach operations
    over the bucket), tensors kept in fp32 (under state_min_numel) and another group's tensors of
    the shape do not count. An 8-bit step in rows of one block takes the kernel whatever the count
    when a tensor of 65536+ elements of its group takes the same kernel of any row count
    (compiled_step.large_rows_blocks): no compilation of its own."""

    def params(n: int, shape) -> list:
        return [torch.nn.Parameter(torch.zeros(shape)) for _ in range(n)]

    lora = [{"params": params(32, (16, 256)) + params(31, (256, 16)) + params(40, (64,))}]
    for name in ("ademamix_4bit", "adamw_bf16"):
        assert _kernel_shapes(monkeypatch, lora, name) == {(16, 256)}, name
    # SMMF's kernel sees a tensor as its square matrix (SMMF.row_block): 4096 elements, 64x64
    assert _kernel_shapes(monkeypatch, lora, "adamw_smmf") == {(64, 64)}
    # 8-bit: rows of one block, by the kernel of any number of rows (compiled_step._rows_free)
    assert _kernel_shapes(monkeypatch, lora, "adamw_8bit") == {(None, 256)}
    assert _kernel_shapes(monkeypatch, lora, "adamw") == set()  # dense: foreach over the bucket
    assert _kernel_shapes(monkeypatch, lora, "adamw_8bit", compile="off") == set()
    assert _kernel_shapes(monkeypatch, lora, "adamw_8bit", state_min_numel=8192) == set()  # fp32 state
    split = [{"params": params(16, (16, 256))}, {"params": params(16, (16, 256)), "weight_decay": 0.0}]
    assert _kernel_shapes(monkeypatch, split, "adamw_8bit") == set()
    assert _kernel_shapes(monkeypatch, split, "adamw_8bit", compile="on") == {(None, 256)}
    few = params(3, (16, 256)) + params(3, (256, 16))
    assert _kernel_calls(monkeypatch, [{"params": few}], "adamw_8bit") == {}
    # beside a large tensor of rows of 256, the 16x256 ones share its kernel; rows of 16 do not
    big = params(1, (512, 512))
    assert _kernel_calls(monkeypatch, [{"params": few + big}], "adamw_8bit") == {(None, 256): 4}
    assert _kernel_calls(monkeypatch, [{"params": few + big}], "ademamix_4bit") == {(512, 512): 1}
    tall = params(1, (8192, 16))  # rows of 16, 131072 elements: the 256x16 ones share its kernel
    assert _kernel_calls(monkeypatch, [{"params": few + big + tall}], "adamw_8bit") == {(None, 256): 4, (None, 16): 4}


def test_the_per_unit_decisions_follow_the_counts_and_options_of_each_step(monkeypatch):
    """The compiled path remembers its decision per unit (compiled_step.unit_plan) by what it
    reads: a step in which fewer tensors of a shape have gradients, or after an option changed,
    decides again."""
    compiled_step.reset()
    monkeypatch.setattr(compiled_step, "_compiled_fn", lambda key=(): compiled_step._advance_one)
    # no tensor of the group takes a kernel by its size, so the count decides (auto_takes)
    params = [torch.nn.Parameter(torch.zeros(256, 16)) for _ in range(32)]
    opt = hfoptim.create_optimizer(params, "adamw_8bit")

    def kernels_of_a_step() -> int:
        before = sum(compiled_step.calls.values())
        opt.step()
        return sum(compiled_step.calls.values()) - before

    try:
        for p in params:
            p.grad = torch.full_like(p, 0.01)
        assert kernels_of_a_step() == 32
        params[0].grad = None  # 31 of the shape this step: the plain path
        assert kernels_of_a_step() == 0
        params[0].grad = torch.full_like(params[0], 0.01)
        assert kernels_of_a_step() == 32
        opt.param_groups[0]["agc"] = 0.01  # still takes it (a row-local modifier), as a new plan
        assert kernels_of_a_step() == 32
        opt.param_groups[0]["compile"] = "off"
        assert kernels_of_a_step() == 0
        assert len(opt.kernel_plans) == 3
    finally:
        compiled_step.reset()


def test_8bit_kernels_see_rows_of_whole_blocks_as_rows_of_one_block(monkeypatch):
    """On CPU, an elementwise rule with 8-bit state (dense slots beside it allowed) and no modifier
    steps a matrix of whole 256-blocks as ``(blocks, 256)`` (compiled_step.block_rows); rows with
    a short block, 4-bit, bf16 and dense state alone, and a modifier keep the parameter's shape."""

    def shapes(name, shape=(64, 512), **options):
        params = [torch.nn.Parameter(torch.zeros(shape))]
        return _kernel_shapes(monkeypatch, [{"params": params}], name, compile="on", **options)

    for name in ("adamw_8bit", "ademamix_8bit", "adan_8bit", "adamw_cautious_8bit"):
        # (None, 256): 128 rows of 256, by a kernel for any number of rows (compiled_step._rows_free)
        expected = {(64, 512)} if "cautious" in name else {(None, 256)}
        assert shapes(name) == expected, name
    assert shapes("adamw_8bit", state_min_numel=1 << 20) == {(64, 512)}  # fp32 state: nothing to gain
    assert shapes("adamw_8bit", (48, 300)) == {(48, 300)}
    assert shapes("adamw_8bit", agc=0.05) == {(64, 512)}
    for name in ("adamw_4bit", "adamw_bf16", "adamw"):
        assert shapes(name) == {(64, 512)}, name


def test_a_step_in_rows_of_one_block_writes_what_the_parameters_shape_writes(monkeypatch):
    """The kernel's step of a ``(blocks, 256)`` view, run uncompiled here, leaves the parameter, the
    codes and the scales (returned by the kernel and written by the call) bit for bit where its
    step in the parameter's shape leaves them."""
    compiled_step.reset()
    monkeypatch.setattr(compiled_step, "_compiled_fn", lambda key=(): compiled_step._advance_one)
    block_rows = compiled_step.block_rows
    try:
        for name in ("adamw_8bit", "adan_8bit"):
            runs = []
            for view in (block_rows, lambda *args: None):
                monkeypatch.setattr(compiled_step, "block_rows", view)
                runs.append(_run(name, "on", steps=3))
            assert sum(key[1] == (None, 256) for key in compiled_step.calls) == 1
            assert sum(key[1] == (64, 512) for key in compiled_step.calls) == 1
            (blocks, b_opt), (whole, w_opt) = runs
            for p, q in zip(blocks, whole):
                assert torch.equal(p, q), name
                for key, value in w_opt.state[q].items():
                    assert torch.equal(b_opt.state[p][key], value), (name, key)
            compiled_step.reset()
    finally:
        compiled_step.reset()


@pytest.mark.slow
def test_8bit_steps_in_rows_of_one_block_compile_to_one_outer_loop(fresh_dynamo, no_inductor_cache, monkeypatch):
    """Compiled in rows of one block, an ``adamw_8bit`` or ``adan_8bit`` step runs under one outer
    loop over the blocks (inductor's outer-loop fusion: the maxima, the codes and the update of a
    block in one pass) and keeps what it computes per block in buffers of one block: it allocates
    nothing of the tensor's size. The kit's local-buffer fix lets it compile: without it inductor
    fails with ``KeyError`` and the step warns and falls back to the plain path."""
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    def step(name: str) -> tuple[list, str]:
        compiled_step.reset()
        metrics.reset()
        p = torch.nn.Parameter(torch.randn(64, 512))
        p.grad = torch.randn(64, 512)
        _, sources = run_and_get_code(hfoptim.create_optimizer([p], name, compile="on").step)
        return list(metrics.cpp_outer_loop_fused_inner_counts), "\n".join(sources)

    try:
        for name in ("adamw_8bit", "adan_8bit"):
            fused, source = step(name)
            # one kernel for any number of rows (compiled_step._rows_free)
            assert set(compiled_step.calls) and all(key[1] == (None, 256) for key in compiled_step.calls)
            # one outer loop holding the step's inner loops: the first moment's maxima, then the
            # update with the second moment's maxima, then the second moment's codes
            assert len(fused) == 1 and fused[0].inner_kernel_number >= 3, (name, fused)
            # the per-block values in local buffers, none of the kernel's (rows, 256) shape
            assert "local_buffer_data" in source and not re.search(r"empty_strided_cpu\(\(\w+, 256\)", source), name
        monkeypatch.setattr(kernel_build, "unread_users_allow_local_buffers", contextlib.nullcontext)
        with pytest.warns(RuntimeWarning, match="KeyError"):
            step("adamw_8bit")
        assert not compiled_step.calls
    finally:
        compiled_step.reset()


def _steps_in_rows(shapes, name: str = "adamw_8bit") -> tuple[list, list, set]:
    """Three compiled steps of ``name`` over parameters of ``shapes`` (the largest cut into row
    pieces by ``chunk_bytes``: 65536 elements a call for a kernel in rows of one block, which
    holds a byte per element: hfoptim.core.compiled_step.block_rows_bytes): the parameters, their
    state and the shapes of the kernel keys."""
    compiled_step.reset()
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = hfoptim.create_optimizer(
        params, name, compile="on", chunk_bytes=65536, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)
    )
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, [dict(opt.state[p]) for p in params], {key[1] for key in compiled_step.calls}


@pytest.mark.slow
def test_one_8bit_kernel_steps_every_row_count_as_kernels_of_one_count_do(fresh_dynamo, monkeypatch, caplog):
    """Compiled in rows of one block, the 8-bit step is one kernel for any number of rows
    (compiled_step._rows_free): whole tensors of three shapes and the row pieces of a larger one
    take it, bit for bit as kernels of one row count each. Where such a kernel fails to trace or
    compile, the step compiles kernels of one row count instead, said once in the log."""
    from hfoptim.core import tracing

    shapes = [(64, 512), (96, 256), (300, 512), (32, 1024)]
    try:
        any_rows = _steps_in_rows(shapes)
        assert any_rows[2] == {(None, 256)}

        def depends_on_rows(shape_env):
            raise tracing.TraceFailed("the kernel depends on the number of rows: as a test")

        monkeypatch.setattr(tracing, "_check_any_rows", depends_on_rows)
        with caplog.at_level("INFO", logger="hfoptim.core.compiled_step"):
            shaped = _steps_in_rows(shapes)
        said = [r.getMessage() for r in caplog.records if "kernels of one row count instead" in r.getMessage()]
        assert len(said) == 1 and "as a test" in said[0] and not compiled_step._any_rows
        # one kernel per row count: 128 blocks (64x512, 32x1024), 96, and the pieces of 300x512
        assert (None, 256) not in shaped[2] and {(128, 256), (96, 256)} < shaped[2]
        assert compiled_step._failed is None
        for p, q in zip(any_rows[0], shaped[0]):
            assert torch.equal(p, q)
        for mine, theirs in zip(any_rows[1], shaped[1]):
            for key, value in mine.items():
                assert torch.equal(theirs[key], value), key
    finally:
        compiled_step.reset()


def test_ademamix_8bit_with_its_warm_ups_takes_the_kernel_of_any_row_count():
    """Under AdEMAMix's warm-ups (``t_alpha``, ``t_beta3``) its slow weight is a 0-d tensor, whose
    ``lerp`` fake tensors failed to broadcast over a row count traced as a symbol: the trace
    failed, torch logged its traceback and every later kernel took one row count
    (tracing._broadcast_first; so in make demo, whose matrices have rows of 128). Now the kernels
    of any row count step such tensors, as the plain path does."""
    hp = dict(lr=1e-2, betas=(0.8, 0.99, 0.995), alpha=4.0, t_alpha=10, t_beta3=10, weight_decay=0.1)

    def run(mode: str):
        gen = torch.Generator().manual_seed(0)
        shapes = ((64, 512), (96, 256), (40, 128), (48, 128))  # rows of whole blocks, and short ones
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = hfoptim.create_optimizer(params, "ademamix_8bit", compile=mode, **hp)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, opt

    compiled_step.reset()
    try:
        compiled, c_opt = run("on")
        assert compiled_step._any_rows and {key[1] for key in compiled_step.calls} == {(None, 256), (None, 128)}
        plain, p_opt = run("off")
        _assert_as_the_plain_path(compiled, c_opt, plain, p_opt)
    finally:
        compiled_step.reset()


def test_the_local_buffer_fix_answers_only_for_unread_buffers_and_only_inside():
    """Inside ``unread_users_allow_local_buffers`` a loop body asked for the index of a buffer it
    does not read answers its own contiguous index (no condition on the buffer); a buffer it
    reads keeps its index, and outside the context inductor's ``KeyError`` is back."""
    from types import SimpleNamespace

    import sympy
    from torch._inductor.loop_body import LoopBody, MemoryUsageType

    from hfoptim.core.local_buffers import unread_users_allow_local_buffers

    x0, x1 = sympy.symbols("x0 x1")
    read = SimpleNamespace(buffer_name="buf1", index_name="index0")
    body = SimpleNamespace(
        memory_usage={MemoryUsageType.LOAD: [read]}, indexing_exprs={"index0": x0}, var_ranges={x0: 8, x1: 256}
    )
    with unread_users_allow_local_buffers() as installed:
        assert installed
        assert LoopBody.get_read_expr(body, "buf1") == x0
        assert LoopBody.get_read_expr(body, "buf0") == 256 * x0 + x1
    with pytest.raises(KeyError):
        LoopBody.get_read_expr(body, "buf0")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_bf16"])
def test_compiled_path_steps_experts_and_conv1d_as_the_plain_path(name):
    """Units seen through a parameter layout (one expert of a fused tensor: a view into the
    parameter and into its stacked state; a Conv1D weight: a transposed view) take the compiled
    path like any parameter and agree with the plain path."""

    def run(mode: str):
        gen = torch.Generator().manual_seed(0)
        experts = torch.nn.Parameter(torch.randn(3, 48, 300, generator=gen))
        conv = torch.nn.Parameter(torch.randn(300, 48, generator=gen))
        layouts = {experts: "batch_out_in", conv: "in_out"}
        opt = hfoptim.create_optimizer([experts, conv], name, compile=mode, param_layouts=layouts, **HP)
        for t in range(1, 4):
            gen = torch.Generator().manual_seed(t)
            for p in (experts, conv):
                p.grad = torch.randn(p.shape, generator=gen) * 0.1
            opt.step()
        return (experts, conv), opt

    compiled_step.reset()
    compiled, c_opt = run("on")
    assert compiled_step._compiled and compiled_step._failed is None
    plain, p_opt = run("off")
    _assert_as_the_plain_path(compiled, c_opt, plain, p_opt)


def _assert_as_the_plain_path(compiled, c_opt, plain, p_opt) -> None:
    """Parameters and state of a compiled run as those of the plain run. A rounding difference
    may flip a rare 8-bit code (module docstring): that element's step then differs by about lr
    times one code interval (1.5e-5 seen), no other."""
    for p, q in zip(compiled, plain):
        close = torch.isclose(p, q, rtol=1e-5, atol=1e-6)
        assert close.float().mean() > 1 - 1e-3 and torch.allclose(p, q, rtol=1e-5, atol=1e-4)
        for key, value in p_opt.state[q].items():
            mine = c_opt.state[p][key]
            if value.dtype == torch.uint8:
                assert (mine != value).float().mean() < 1e-3, key
            else:
                torch.testing.assert_close(mine.float(), value.float(), rtol=1e-2, atol=1e-6)
