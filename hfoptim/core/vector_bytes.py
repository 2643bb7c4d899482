"""Loads of eight bytes in inductor's AVX2 C++ kernels, for the kit's compilations.

A compiled step of 8-bit state reads its codes as bytes, one byte per fp32 lane: eight bytes per
AVX2 vector of the fused loop. Inductor's C++ backend (torch 2.13) loads them with
``Vectorized<uint8_t>::loadu(ptr, 8)``, which on AVX2 (``vec256_int.h``) fills a 32-byte stack
buffer with ones, copies the eight bytes into it and loads it back: the load waits for the
stores (a failed store-to-load forwarding). :func:`vector_byte_loads` emits the same vector
without the stack buffer instead: the eight bytes by one 64-bit load (``_mm_loadl_epi64``) and
the other 24 lanes set to 1 in registers, as ``loadu`` leaves them (so any later use, integer
division included, sees the same lanes).

It is entered around each of the kit's compilations only
(:func:`hfoptim.core.kernel_build.compiling_call`), so the process's other compilations keep
inductor's code; it changes only unmasked loads of ``uint8``/``int8`` buffers into 256-bit
vectors of eight elements. An inductor without the hooks it needs gets no change.
"""

from __future__ import annotations

import contextlib

import torch

#: the one-byte types whose eight-element loads are rewritten, with their C++ names
_BYTE_TYPES = {torch.uint8: "uint8_t", torch.int8: "int8_t"}


def byte_load_line(cpp_type: str, address: str) -> str:
    """The C++ expression of ``Vectorized<cpp_type>::loadu(address, 8)`` on AVX2 without its
    stack buffer: bytes 0-7 from ``address``, bytes 8-31 equal to 1."""
    low = f"_mm_loadl_epi64(reinterpret_cast<const __m128i*>({address}))"
    lane = f"_mm_unpacklo_epi64({low}, _mm_set1_epi8(1))"
    return f"at::vec::Vectorized<{cpp_type}>(_mm256_inserti128_si256(_mm256_set1_epi8(1), {lane}, 0))"


@contextlib.contextmanager
def vector_byte_loads():
    """While inside, inductor's AVX2 C++ vector kernels load eight bytes without a stack buffer.
    Yields whether the rewrite is installed (False for an inductor without the hooks)."""
    try:
        from torch._inductor.codegen import cpp

        vec_kernel = cpp.CppVecKernel
        inductor_line = vec_kernel.__dict__["_get_vec_load_line"]
        index_text = cpp.cexpr_index
    except (ImportError, AttributeError, KeyError):
        yield False
        return

    def load_line(self, var, index, dtype, load_mask=None):
        cpp_type = _BYTE_TYPES.get(dtype)
        try:
            eligible = (
                cpp_type is not None and load_mask is None and self.num_elems == 8 and self.vec_isa.bit_width() == 256
            )
        except AttributeError:  # a kernel of another inductor than the one this was written for
            eligible = False
        if not eligible:
            return inductor_line(self, var, index, dtype, load_mask)
        address = f"{var} + {index_text(index)}" if index != 0 else var
        return byte_load_line(cpp_type, address)

    vec_kernel._get_vec_load_line = load_line
    try:
        yield True
    finally:
        vec_kernel._get_vec_load_line = inductor_line
