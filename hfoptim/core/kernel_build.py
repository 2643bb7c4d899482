"""How inductor builds the kit's kernels: its options, the mark that keys its disk cache by the
kit's code generation, the vector instruction set taken from the CPU's flags, and the
code-generation hooks that are in force while a kernel compiles.

:func:`compiling_call` is the one door: the call that compiles a kernel of the compiled path
(:mod:`hfoptim.core.compiled_step`) runs inside it, with the hooks of
:mod:`~hfoptim.core.vector_bitcast`, :mod:`~hfoptim.core.vector_gather`,
:mod:`~hfoptim.core.vector_bytes`, :mod:`~hfoptim.core.vector_narrow` and the fix of
:mod:`~hfoptim.core.local_buffers` installed, and the process's other compilations untouched. A
compilation that fails with the kit's choices is tried once more with inductor's own checks and
code, and from then on every kernel compiles that way (:data:`_kit_codegen`); a failure then is
the compilation's failure, which the caller reports. Which kernels to compile, and when, is the
compiled path's business, not this module's.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .local_buffers import unread_users_allow_local_buffers
from .vector_bitcast import vector_bitcasts
from .vector_bytes import vector_byte_loads
from .vector_gather import vector_gathers
from .vector_narrow import vector_narrowing

logger = logging.getLogger(__name__)

#: whether the kernels compile with the kit's code-generation choices: inductor's instruction
#: set taken from the CPU's flags (:func:`_isa_from_cpu_flags`), vector bit casts
#: (:mod:`hfoptim.core.vector_bitcast`), vector gathers (:mod:`hfoptim.core.vector_gather`), byte
#: loads (:mod:`hfoptim.core.vector_bytes`) and narrowing (:mod:`hfoptim.core.vector_narrow`);
#: False once such a compilation failed
_kit_codegen = True


#: inductor's options for the kernels. ``realize_reads_threshold`` (default 4): a value with
#: several consumers that reads more inputs than this is stored in a full-size buffer instead of
#: recomputed. A step's update direction reads the gradient, the moments, the parameter and
#: per-step scalars, so with the default LAMB's direction (needed by its norm, then by the
#: update) and Adafactor's went to a fresh tensor-sized buffer every step: one more write and
#: read, and on CPU a fresh allocation of that size (page faults: 14 ms for a 16384x512 fp32
#: buffer on the 2-core AMD EPYC, against 6 ms to write a reused one). Recomputing it in the
#: update loop costs a few arithmetic operations per element instead.
#:
#: ``loop_ordering_after_fusion`` off: inductor reorders no loop of CPU code anyway, and in
#: torch 2.11 its reordering of a fused node holding a reduction asserts (``AssertionError`` in
#: ``reorder_loops_by_dep_pair``; fixed later), which sent every 8-bit and 4-bit CUDA kernel to
#: the plain path (H200, 2026-12-04). The kernels read and write every tensor in its own layout:
#: no order to fix.
#:
#: ``assert_indirect_indexing`` off: the indices into the code tables are in range by
#: construction (uint8 codes, clamped intervals), so no bounds check in the loops.
INDUCTOR_OPTIONS = {"assert_indirect_indexing": False, "realize_reads_threshold": 64}


def _codegen_mark():
    """A post-grad pass that changes nothing and whose ``uuid`` names the kit's code generation:
    the sources of its hooks (:mod:`~hfoptim.core.vector_bitcast`,
    :mod:`~hfoptim.core.vector_gather`, :mod:`~hfoptim.core.vector_bytes`,
    :mod:`~hfoptim.core.vector_narrow`, :mod:`~hfoptim.core.local_buffers`), whether they are in
    use (:data:`_kit_codegen`) and the CPU's vector capability as ATen reports it
    (``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, ..., which
    ``ATEN_CPU_CAPABILITY`` lowers). Inductor's on-disk graph cache keys a kernel by the graph and
    the options, custom passes by their ``uuid``, not by what its code generator was patched
    with, nor by the instruction set it generated for: without the mark a kernel cached before a
    hook changed (or by a process without the hooks) would be loaded as it was, and a cache
    shared with a machine of another CPU kind (or written with another ``ATEN_CPU_CAPABILITY``)
    would hand this one kernels of that kind (seen: AVX-512 kernels served to an AVX2 run). None
    where this inductor has no custom passes."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    except ImportError:
        return None
    from . import local_buffers, vector_bitcast, vector_bytes, vector_gather, vector_narrow

    hooks = (
        vector_bitcast.__file__,
        vector_gather.__file__,
        vector_bytes.__file__,
        vector_narrow.__file__,
        local_buffers.__file__,
    )

    class KitCodegenMark(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self):
            return (get_hash_for_files(hooks), _kit_codegen, torch.backends.cpu.get_cpu_capability())

    return KitCodegenMark()


with contextlib.suppress(ImportError):
    from torch._inductor import config as _inductor_config

    if hasattr(_inductor_config, "loop_ordering_after_fusion"):  # (torch 2.5 and later)
        INDUCTOR_OPTIONS["loop_ordering_after_fusion"] = False
    if hasattr(_inductor_config, "post_grad_custom_pre_pass") and (_mark := _codegen_mark()) is not None:
        INDUCTOR_OPTIONS["post_grad_custom_pre_pass"] = _mark


def compiling_call(fn, args: tuple, retry: bool = True):
    """The call of ``fn`` that compiles it: with inductor's vector instruction set taken from the
    CPU's flags (:func:`_isa_from_cpu_flags`), 32-bit bit casts as vector operations
    (:func:`~hfoptim.core.vector_bitcast.vector_bitcasts`), table reads as vector gathers
    (:func:`~hfoptim.core.vector_gather.vector_gathers`), AVX2 loads of eight bytes without a
    stack buffer (:func:`~hfoptim.core.vector_bytes.vector_byte_loads`) and int32 vectors
    narrowed to bytes in registers (:func:`~hfoptim.core.vector_narrow.vector_narrowing`); if that compilation
    fails (a compiler without an instruction set the CPU lists, a header without
    ``at::vec::cast``), once more with inductor's own checks and code before the failure counts,
    and so from then on (``retry`` False: raised at once, for the caller to try another route
    first). Both calls keep inductor's local-buffer check from failing on users that do not read
    a buffer (:func:`~hfoptim.core.local_buffers.unread_users_allow_local_buffers`): a fix, not a
    choice of code, and the kernels of :func:`hfoptim.core.compiled_step.block_rows` need it."""
    global _kit_codegen
    with unread_users_allow_local_buffers():
        if not _kit_codegen:
            return fn(*args)
        trusted = casts = gathers = byte_loads = narrowing = False
        try:
            with (
                _isa_from_cpu_flags() as trusted,
                vector_bitcasts() as casts,
                vector_gathers() as gathers,
                vector_byte_loads() as byte_loads,
                vector_narrowing() as narrowing,
            ):
                return fn(*args)
        except Exception as error:
            if not retry or not (trusted or casts or gathers or byte_loads or narrowing):  # inductor's own
                raise
            _kit_codegen = False
            _forget_isa()
            logger.info(
                "hfoptim: compiling with the CPU's instruction sets, vector bit casts, gathers, byte loads and "
                "narrowing failed (%s); again with inductor's own checks and code",
                error,
            )
            return fn(*args)


@contextlib.contextmanager
def _isa_from_cpu_flags():
    """Inductor's choice of vector instruction set for CPU code (AVX-512, AVX2, ...) taken from
    the CPU's flags, without its checks: before its first CPU compilation of a process inductor
    builds a test program per instruction set and loads each in a new Python process (about 10 s
    of the first step from an empty inductor cache and 1-2 s from a warm one on a 2-core AMD EPYC,
    out of 20 s and 5-7 s; ``torch._inductor.config.cpp.vec_isa_ok``), and one more per extension
    the CPU lists (:func:`_extensions_from_cpu_flags`). Only for the kit's kernels: the list of
    instruction sets it leaves and the extensions' results are cleared afterwards, so the
    process's other compilations check as before; nothing changes when inductor has decided
    already or the user set ``vec_isa_ok``. Yields whether the CPU's flags decide."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import cpu_vec_isa

        isa_list = cpu_vec_isa.valid_vec_isa_list
        decided = isa_list.cache_info().currsize > 0 or inductor_config.cpp.vec_isa_ok is not None
    except Exception:  # an inductor without these: its own checks
        isa_list, decided = None, True
    if decided:
        yield False
        return
    try:
        with inductor_config.patch({"cpp.vec_isa_ok": True}), _extensions_from_cpu_flags(cpu_vec_isa):
            yield True
    finally:
        isa_list.cache_clear()
        _forget_extensions(cpu_vec_isa)


@contextlib.contextmanager
def _extensions_from_cpu_flags(cpu_vec_isa):
    """Inductor's AVX-512 extensions (bf16 conversions, VNNI, AMX tiles) taken from the CPU's
    flags: ``cpp.vec_isa_ok`` skips the test build of each instruction set but not those of its
    extensions, which inductor asks only where ``torch.cpu`` says the CPU has them. Each is a
    compiler run and a new process loading its result: 6 on an Intel Xeon with AMX, 1.6 s of
    the first step from an empty inductor cache (0.27 s a build, 6.1 s in all with them; torch
    2.13, measured). Inductor's AMX check also asks the kernel for the tiles
    (``torch.cpu._init_amx``), which still runs. The AMX-FP16 test keeps its build: it checks
    the compiler (GCC 13 or later), not the CPU. A compiler without an extension the CPU has
    fails the kernel's build, which :func:`compiling_call` tries again with inductor's checks."""
    check_build = getattr(cpu_vec_isa.VecISA, "check_build", None)
    if check_build is None:
        yield
        return
    compiler_checks = {getattr(getattr(cpu_vec_isa, "VecAMX", None), "_amx_fp16_code", None)}

    def from_cpu_flags(isa, code):
        return check_build(isa, code) if code in compiler_checks else True

    cpu_vec_isa.VecISA.check_build = from_cpu_flags
    try:
        yield
    finally:
        cpu_vec_isa.VecISA.check_build = check_build


def _forget_extensions(cpu_vec_isa) -> None:
    """Forget which extensions inductor found: the cached truth of each instruction set and the
    flags its check sets on it (asked again, with the test builds, at the next compilation
    outside the kit's; the kit's own ask the CPU's flags again)."""
    with contextlib.suppress(Exception):
        for isa in cpu_vec_isa.supported_vec_isa_list:
            for klass in type(isa).__mro__:
                cache_clear = getattr(klass.__dict__.get("__bool__"), "cache_clear", None)
                if cache_clear is not None:
                    cache_clear()
            for found in ("_is_avx512_bf16_supported", "_is_amx_fp16_supported"):
                isa.__dict__.pop(found, None)


def _forget_isa() -> None:
    """Forget the instruction sets chosen from the CPU's flags (inductor's list), after a
    compilation with them failed. The extensions' results are forgotten already:
    :func:`_isa_from_cpu_flags` forgets them when the failed compilation leaves it."""
    with contextlib.suppress(Exception):
        from torch._inductor import cpu_vec_isa

        cpu_vec_isa.valid_vec_isa_list.cache_clear()


def reset() -> None:
    """Compile with the kit's code-generation choices again (tests)."""
    global _kit_codegen
    _kit_codegen = True
