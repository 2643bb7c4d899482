"""Vector gathers from 32-bit tables in inductor's C++ kernels, for the kit's compilations.

The compiled 8-bit encode (:func:`~hfoptim.state.dynamic_code.encode_normalized`) reads one entry
of a 32768-entry int32 table per element, at an index computed in the kernel. Inductor's C++
backend (torch 2.13) emits such an indirect load as a scalar loop: it stores the vector of 64-bit
indices to a stack buffer, loads the sixteen table entries one by one into another stack buffer
and loads that back as a vector, which then waits for the sixteen scalar stores. ATen's vectors
have a gather (``at::vec::gather``: ``vpgatherdd``'s float form, ``_mm512_i32gather_ps`` with
AVX-512 and ``_mm256_i32gather_ps`` with AVX2; a scalar loop on other instruction sets), which
this module emits instead: the indices narrowed to int32, the table read as floats and the
result reinterpreted as the table's type. A gather is exact: the same entries either way.

:func:`vector_gathers` installs it for the loads it can prove safe and leaves every other load to
inductor's own code: a load from a 32-bit buffer whose index is one in-kernel index vector plus a
constant, with no load mask, in a kernel whose vectors hold one 32-bit vector per iteration, from
a buffer small enough that any index into it fits an int32. It is entered around each of the
kit's compilations only (:func:`hfoptim.core.kernel_build.compiling_call`), so the process's
other compilations keep inductor's code. An inductor without the hooks it needs gets no change.
"""

from __future__ import annotations

import contextlib
import re

import torch

#: the table types a gather reads (as floats: ATen's gather has a float form on x86)
_TABLE_DTYPES = (torch.float32, torch.int32)


def _gather_line(kernel, name: str, index, cpp, V, sympy_utils) -> tuple[str, torch.dtype] | None:
    """The C++ expression of the vector gather of ``name[index]`` in ``kernel``, with the
    loaded dtype, or None where inductor's own load is kept."""
    dtype = V.graph.get_dtype(name)
    if dtype not in _TABLE_DTYPES or kernel._load_mask is not None:
        return None
    if kernel.num_elems != kernel.tiling_factor or kernel._get_num_vectors(torch.float32) != 1:
        return None
    index = kernel.rename_indexing(index)
    stride = kernel._try_get_const_stride(index, kernel.itervars[kernel.tiling_idx])
    if stride in (0, 1):
        return None  # a broadcast or a contiguous load: inductor's own is right
    symbols = [s for s in index.free_symbols if sympy_utils.symbol_is_type(s, sympy_utils.SymT.TMP)]
    if len(symbols) != 1 or len(index.free_symbols) != 1:
        return None
    offset = index - symbols[0]
    if not offset.is_Integer:
        return None
    indices = kernel.cse.varname_map.get(symbols[0].name)
    if not isinstance(indices, cpp.CppCSEVariable) or not indices.is_vec:
        return None
    numel = V.graph.get_numel(name)
    if not getattr(numel, "is_Integer", isinstance(numel, int)) or int(numel) + abs(int(offset)) >= 2**31:
        return None  # an in-range index must fit an int32
    if indices.dtype == torch.int64:
        narrow = _widened_from(kernel, indices, cpp)
        if narrow is None:
            narrow = f"at::vec::convert<int32_t,1,int64_t,{kernel._get_num_vectors(torch.int64)}>({indices})"
    elif indices.dtype == torch.int32:
        narrow = str(indices)
    else:
        return None
    base = f"reinterpret_cast<const float*>({kernel.args.input(name)} + {cpp.cexpr_index(offset)})"
    line = f"at::vec::gather<4>({base}, {narrow})"
    if dtype == torch.int32:
        line = f"at::vec::cast<int32_t>({line})"
    return line, dtype


#: the C++ of an int32 vector widened to int64 in inductor's CPU kernels (torch 2.13)
_WIDENED = re.compile(r"at::vec::convert<int64_t,\d+,int32_t,1>\((\w+)\)")


def _widened_from(kernel, indices, cpp) -> str | None:
    """The int32 vector that the int64 index vector ``indices`` was widened from in ``kernel``,
    or None. The encode computes its table index in int32 and torch's gather takes int64, so
    inductor widens it (two conversions on AVX-512, four on AVX2) for the gather to narrow it
    back: the gather reads the int32 vector instead, and the C++ compiler drops the unused
    widening (both the same indices, which fit an int32)."""
    for key, value in kernel.cse._cache.items():
        if value is not indices:
            continue
        line = key if isinstance(key, str) else next((k for k in key if isinstance(k, str)), "")
        found = _WIDENED.fullmatch(line.strip())
        source = kernel.cse.varname_map.get(found.group(1)) if found else None
        if isinstance(source, cpp.CppCSEVariable) and source.is_vec and source.dtype == torch.int32:
            return str(source)
        return None
    return None


@contextlib.contextmanager
def vector_gathers():
    """While inside, inductor's C++ vector kernels read 32-bit tables at in-kernel indices with
    ``at::vec::gather``. Yields whether the vector form is installed (False for an inductor
    without the hooks)."""
    try:
        from torch._inductor.codegen import cpp
        from torch._inductor.virtualized import V
        from torch.utils._sympy import symbol as sympy_utils

        vec_kernel = cpp.CppVecKernel
        inductor_load = vec_kernel.__dict__["load"]
        for needed in ("_try_get_const_stride", "_get_num_vectors", "rename_indexing"):
            getattr(vec_kernel, needed)
        sympy_utils.SymT.TMP  # noqa: B018
    except (ImportError, AttributeError, KeyError):
        yield False
        return

    def load(self, name, index):
        try:
            found = _gather_line(self, name, index, cpp, V, sympy_utils)
        except AttributeError:  # a kernel of another inductor than the one this was written for
            found = None
        if found is None:
            return inductor_load(self, name, index)
        line, dtype = found
        loaded = self.cse.generate(self.loads, line, dtype=dtype)
        loaded.update_on_args("load", (self, name, index), {})
        loaded.is_vec = True
        return loaded

    vec_kernel.load = load
    try:
        yield True
    finally:
        vec_kernel.load = inductor_load
