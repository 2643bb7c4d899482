"""The compiled path (hfoptim.core.compiled_step) for dense fp32 state and the other uncompressed forms.

Every registered name whose state is not 8-bit, 4-bit or bf16 either takes the compiled path or
is one of the named exceptions (:func:`hfoptim.core.compiled_step.plain_reason`). The compiled step
agrees with the plain one in float64 and float32, with no graph break and one graph per shape:
a learning-rate schedule and the step counter are traced inputs, not recompiles.
"""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim.core import compiled_step
from tests.harness import DEVICE

COMPRESSED = ("_4bit", "_8bit", "_bf16")
#: the names that stay on the plain path, and why (the test below checks the reason given)
EXCEPTIONS = {
    "adalo": "training loss",  # its step size is a new Python number each step
    "cpr": "CPR",  # per-tensor decisions on the bound each step
    "adamcpr": "CPR",
    "swd": "stable weight decay",  # every update waits for all second moments
    "adams": "stable weight decay",
    "muon": "Muon",  # matrices orthogonalized whole
}
DENSE_NAMES = [n for n in hfoptim.list_optimizers() if not n.endswith(COMPRESSED)]
#: a matrix and a vector (the compile time of each shape is paid per test)
SHAPES = [(24, 40), (300,)]
HP = dict(lr=3e-3, weight_decay=0.05)
#: non-default hyperparameters for the rules whose options differ from AdamW's
RULE_HP = {
    "adamw": dict(HP, betas=(0.85, 0.98), eps=1e-7),
    "ademamix": dict(HP, betas=(0.85, 0.98, 0.995), alpha=3.0, t_alpha=3.0, t_beta3=3.0),
    "adan": dict(HP, betas=(0.9, 0.9, 0.98)),
    "adapnm": dict(HP, betas=(0.85, 0.98, 0.8)),
    "adafactor": dict(lr=3e-3, weight_decay=0.05, beta1=0.9),
    "adagl": dict(HP, alpha=0.6, history=3, step_control="mean"),
    "adamomentum": dict(HP, eps_mode="accumulate"),
    "amos": dict(HP, momentum=0.9),
}
#: each rule with its own state, each modifier that compiles and each uncompressed storage form (on AdamW):
#: every other dense name is a combination of these traced pieces
COMPILED = [
    *("adamw", "adafactor", "adagl", "adamomentum", "adam_atan2", "adamw2", "adan", "adanorm", "ademamix"),
    *("amos", "diffgrad", "lamb", "nadamw", "nsgda", "pnm", "adapnm", "sm3", "smmf"),
    *("adamw_gradnorm", "adamw_cautious", "adamw_trust"),
    # per-row statistics: in place on CPU through the kit's local-buffer fix (core/local_buffers.py)
    *("adamw_agc", "adamw_softclip", "adamw_gc", "adamw_normloss", "adan_normloss"),
    *("adamw_spectralcap", "adamw_cwd", "adamw_atan2", "adamw_softplus", "adamw_nesterov"),
    *("adamw_lookahead", "adamw_factored", "adamw_smmf", "adamw_shared", "muon"),
]


def _exceptions(name: str) -> list[str]:
    parts = name.split("_")
    return [reason for key, reason in EXCEPTIONS.items() if parts[0] == key or key in parts[1:]]


def _hp(name: str) -> dict:
    return RULE_HP.get(name.split("_")[0], RULE_HP["adamw"] if name.startswith("adamw") else HP)


def test_every_dense_name_compiles_or_is_a_named_exception():
    assert len(DENSE_NAMES) > 150
    for name in DENSE_NAMES:
        params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
        opt = hfoptim.create_optimizer(params, name, compile="on", **HP)
        engine = getattr(opt, "optimizer", opt)  # a Lookahead wraps the engine
        reasons = {compiled_step.plain_reason(engine, group, torch.device("cpu")) for group in engine.param_groups}
        expected = _exceptions(name)
        if not expected:
            assert reasons == {None}, (name, reasons)
            continue
        # each group on the plain path says why, with one of the name's exceptions
        assert all(r is None or any(e in r for e in expected) for r in reasons), (name, reasons)
        assert reasons != {None}, (name, reasons)
        if "Muon" not in expected:  # Muon's vectors (kept by its AdamW) compile
            assert None not in reasons, (name, reasons)
    assert set(COMPILED) <= set(DENSE_NAMES)


def _run(name: str, compile: str, dtype: torch.dtype, steps: int = 4):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(DEVICE)) for s in SHAPES]
    opt = hfoptim.create_optimizer(params, name, compile=compile, **_hp(name))
    for t in range(1, steps + 1):
        gen = torch.Generator().manual_seed(t)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=dtype) * 0.1).to(DEVICE)
        for group in opt.param_groups:  # a schedule: the learning rate changes every step
            group["lr"] = _hp(name)["lr"] / t
        opt.step()
    engine = getattr(opt, "optimizer", opt)
    return params, engine


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compiled_dense_step_agrees_with_the_plain_step(name):
    from torch._dynamo.utils import counters

    for dtype, tol in ((torch.float64, dict(rtol=1e-10, atol=1e-12)), (torch.float32, dict(rtol=1e-5, atol=1e-6))):
        compiled_step.reset()
        counters.clear()
        compiled, c_opt = _run(name, "on", dtype)
        kernels = len(compiled_step.calls)
        # one graph per compiled shape, whatever the learning rate and the step, each traced
        # whole by the kit
        assert kernels == (1 if name == "muon" else len(SHAPES)), compiled_step.calls
        assert compiled_step.traced == {"kit": kernels, "dynamo": 0}, compiled_step.traced
        assert sum(compiled_step.calls.values()) == 4 * kernels
        plain, p_opt = _run(name, "off", dtype)
        for p, q in zip(compiled, plain):
            torch.testing.assert_close(p, q, **tol)
            for key, value in p_opt.state[q].items():
                torch.testing.assert_close(c_opt.state[p][key], value, **tol)


def test_auto_leaves_small_tensors_plain():
    """``compile="auto"`` (the default) compiles tensors of AUTO_MIN_NUMEL elements or more only:
    the small tensors of tests and of tiny models never pay a compilation."""
    compiled_step.reset()
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = hfoptim.create_optimizer(params, "adamw", **HP)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert not compiled_step.calls


def _assert_smmf_same(compiled, c_opt, plain, p_opt) -> None:
    """The parameters and state of two SMMF runs agree: the sign bits exactly, the rest to fp64
    rounding (the kernel's arithmetic and the plain path's order differ)."""
    for p, q in zip(compiled, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        for key, value in p_opt.state[q].items():
            if key.endswith(".sign"):
                assert torch.equal(c_opt.state[p][key], value), key
            else:
                torch.testing.assert_close(c_opt.state[p][key], value, rtol=1e-10, atol=1e-12)


def test_auto_compiles_smmf_in_row_pieces_within_chunk_bytes():
    """SMMF's kernel decodes and steps a tensor seen as its square matrix and returns the new
    moments for the plain path's encode (``encodes_after_kernel``), so ``compile="auto"`` compiles
    a large SMMF tensor, in row pieces within ``chunk_bytes`` as the plain path steps it: every
    piece takes a kernel (the last one's write-back stores the column factor after it), and the
    numbers are the plain path's (the sign bits exactly). Not where the kernel would keep the
    parameter's shape (``auto_compiles_as_rows``)."""
    # a (512, 256) matrix; fp64, so 1 + (2 + 4) * 8 + 4 = 53 bytes of temporaries an element
    # (compiled_step.block_rows_bytes): at most 100 rows a call
    shape, budget = (512, 256), 53 * 256 * 100
    runs = {}
    for mode in ("auto", "off"):
        compiled_step.reset()
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
        opt = hfoptim.create_optimizer([p], "adamw_smmf", compile=mode, chunk_bytes=budget, **_hp("adamw"))
        for _ in range(3):
            p.grad = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1
            opt.step()
        runs[mode] = (p, opt)
        if mode == "auto":  # per step, every piece in a kernel of its row count
            (rows,) = {key[1][0] for key in compiled_step.calls}
            assert rows <= 100 and {key[1][1] for key in compiled_step.calls} == {256}
            assert sum(compiled_step.calls.values()) == 3 * -(-512 // rows)
    (compiled, c_opt), (plain, p_opt) = runs["auto"], runs["off"]
    _assert_smmf_same([compiled], c_opt, [plain], p_opt)
    # with a statistic of the rows (AGC) its kernel would step the parameter's shape, indexing
    # the square matrix by division: "auto" keeps such a tensor plain
    compiled_step.reset()
    p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    hfoptim.create_optimizer([p], "adamw_smmf", chunk_bytes=budget, agc=0.05, **_hp("adamw")).step()
    assert not compiled_step.calls


def test_compiled_smmf_writes_the_plain_paths_sign_bits_by_rows_of_bytes():
    """A traced SMMF step reads and writes the sign bits of a square matrix whose rows are whole
    bytes by rows (``smmf._by_matrix_bytes``), where the plain path packs them flat: the same
    bits and the same numbers. (16, 2048) is a (256, 128) matrix and (8, 48) a (24, 16) one;
    (24, 40)'s (32, 30) keeps the flat form. Each kernel steps its tensor seen as that matrix
    (``SMMF.row_block``), and the plain path's encode stores what it returns
    (``encodes_after_kernel``)."""
    shapes = [(16, 2048), (8, 48), (24, 40)]
    squares = [(256, 128), (24, 16), (32, 30)]
    runs = {}
    for mode in ("on", "off"):
        compiled_step.reset()
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        opt = hfoptim.create_optimizer(params, "adamw_smmf", compile=mode, state_min_numel=0, **_hp("adamw"))
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1
            opt.step()
        runs[mode] = (params, opt)
        if mode == "on":  # every tensor in its kernel at every step
            assert {tuple(key[1]): n for key, n in compiled_step.calls.items()} == dict.fromkeys(squares, 4)
    (compiled, c_opt), (plain, p_opt) = runs["on"], runs["off"]
    _assert_smmf_same(compiled, c_opt, plain, p_opt)


def test_kernels_skip_dynamos_guards_and_a_call_they_would_have_refused_gets_its_own_kernel():
    """The kernels run without dynamo's guard evaluation (``compiled_step.skip_guards``): the key
    must then tell apart every input dynamo would have: a gradient with other strides (a
    transposed buffer) and state restored in another dtype each get a kernel of their own, and the
    numbers stay the plain path's."""
    from torch._dynamo.utils import counters

    compiled_step.reset()
    counters.clear()
    torch.manual_seed(0)
    start = torch.randn(24, 40, dtype=torch.float64)
    grads = [torch.randn(24, 40, dtype=torch.float64) for _ in range(2)]
    grads += [torch.randn(40, 24, dtype=torch.float64).t() for _ in range(2)]  # strides (1, 24)
    out = {}
    for mode in ("on", "off"):
        p = torch.nn.Parameter(start.clone())
        opt = hfoptim.create_optimizer([p], "adamw", compile=mode, **RULE_HP["adamw"])
        for i, g in enumerate(grads):
            p.grad = g
            opt.step()
            if i == 2:  # the step counter restored as float64 (a checkpoint of another writer)
                opt.state[p]["step"] = opt.state[p]["step"].to(torch.float64)
        out[mode] = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    assert compiled_step._failed is None
    # contiguous: 2 calls; strided: 1; strided with an fp64 step counter: 1
    assert sorted(compiled_step.calls.values()) == [1, 1, 2], compiled_step.calls
    assert compiled_step.traced == {"kit": 3, "dynamo": 0}, compiled_step.traced
    torch.testing.assert_close(out["on"][0], out["off"][0], rtol=1e-10, atol=1e-12)
    for key, value in out["off"][1].items():
        torch.testing.assert_close(out["on"][1][key], value, rtol=1e-10, atol=1e-12)
