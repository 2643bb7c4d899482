"""Conversions of int32 vectors to bytes in inductor's x86 C++ kernels, for the kit's compilations.

The compiled 8-bit encode (:func:`~hfoptim.state.dynamic_code.encode_normalized`) ends with each
element's code as an int32 (0..255), which the kernel stores as a byte. Inductor's C++ backend
(torch 2.13) converts a vector of int32 to uint8 with ``at::vec::convert<uint8_t>``, for which
ATen has no x86 form: its generic ``VecConvert`` stores the vector, converts element by element
and loads the result back. The encode therefore used to convert through fp32 (a clamp, a
truncation and byte shuffles: nine instructions a vector with AVX2). :func:`vector_narrowing`
emits the conversion itself, as the low byte of each element: with AVX2 one byte shuffle per
128-bit lane and one unpack of the two lanes' four bytes, with AVX-512 one ``vpmovdb``
(``_mm512_cvtepi32_epi8``). A conversion of int32 to uint8 keeps the low byte (modulo 256), so
the bytes are the same for every input, in range or not.

Measured on a 2-core AMD EPYC with AVX-512 (one compiled step of a 4096x1024 tensor on one
thread, medians of 15 interleaved with torch AdamW's, two processes per tree each with an empty
inductor cache, against the encode through fp32 at c640569): with AVX2 kernels
(``ATEN_CPU_CAPABILITY=avx2``) ``adamw_8bit`` 16.5 -> 15.3 ms, ``ademamix_8bit`` 21.8-22.2 ->
20.0-20.2, ``adan_8bit`` 22.7-23.8 -> 20.7-22.2; with AVX-512 kernels 13.5 -> 12.9-13.0,
18.4-18.5 -> 17.4-17.5 and 20.2-20.4 -> 18.3-18.4 (torch AdamW foreach 8.7-9.6 ms). Parameters,
codes and scales were the same bit for bit.

It is entered around each of the kit's compilations only
(:func:`hfoptim.core.kernel_build.compiling_call`), so the process's other compilations keep
inductor's code; it changes only conversions of one int32 vector to one uint8 vector (not
rounding ones) in AVX2 and AVX-512 kernels. An inductor without the hooks it needs gets no
change.
"""

from __future__ import annotations

import contextlib

import torch

#: per x86 vector width: the low byte of each int32 lane of ``{src}`` in the first lanes of a
#: uint8 vector (the others zero)
_NARROW = {
    256: (
        "at::vec::Vectorized<uint8_t>([](__m256i v) {{"
        " const __m256i low = _mm256_shuffle_epi8(v, _mm256_setr_epi8("
        "0, 4, 8, 12, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, "
        "0, 4, 8, 12, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128));"
        " return _mm256_inserti128_si256(_mm256_setzero_si256(),"
        " _mm_unpacklo_epi32(_mm256_castsi256_si128(low), _mm256_extracti128_si256(low, 1)), 0); }}({src}))"
    ),
    512: "at::vec::Vectorized<uint8_t>(_mm512_inserti32x4(_mm512_setzero_si512(), _mm512_cvtepi32_epi8({src}), 0))",
}


def narrow_line(src: str, bit_width: int) -> str | None:
    """The C++ expression of the uint8 vector of the low bytes of the int32 vector ``src`` in an
    x86 kernel of ``bit_width`` bits, or None for another width."""
    form = _NARROW.get(bit_width)
    return None if form is None else form.format(src=src)


@contextlib.contextmanager
def vector_narrowing():
    """While inside, inductor's AVX2 and AVX-512 C++ kernels convert an int32 vector to uint8 by
    its low bytes in registers. Yields whether the conversion is installed (False for an
    inductor without the hooks)."""
    try:
        from torch._inductor import cpu_vec_isa
        from torch._inductor.codegen import cpp

        vec_kernel = cpp.CppVecKernel
        inductor_expr = vec_kernel.__dict__["get_to_dtype_expr"]
        x86 = (cpu_vec_isa.VecAVX2, cpu_vec_isa.VecAVX512)
    except (ImportError, AttributeError, KeyError):
        yield False
        return

    def to_dtype_expr(self, src, dtype, src_dtype, rounding=False):
        line = None
        if dtype == torch.uint8 and src_dtype == torch.int32 and not rounding and getattr(src, "is_vec", False):
            try:
                if isinstance(self.vec_isa, x86) and self._get_num_vectors(torch.int32) == 1:
                    line = narrow_line(str(src), self.vec_isa.bit_width())
            except AttributeError:  # a kernel of another inductor than the one this was written for
                line = None
        return inductor_expr(self, src, dtype, src_dtype, rounding) if line is None else line

    vec_kernel.get_to_dtype_expr = to_dtype_expr
    try:
        yield True
    finally:
        vec_kernel.get_to_dtype_expr = inductor_expr
