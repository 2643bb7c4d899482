r"""The 8-bit dynamic codes of blockwise 8-bit state (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861, sections 2.2-2.3), built here from the paper's
description.

**Dynamic tree code** (signed, for first-moment-like state). A byte is a sign bit followed by a
7-bit *tree*: the number ``e`` of leading zero bits is a decimal exponent, the first one bit is
an indicator, and the ``k = 6 - e`` bits after it are a linear fraction ``j``:

.. math::
    |x| = 10^{-e}\,\Big(0.1 + 0.9\,\frac{j + 1}{2^k}\Big),\qquad e = 0..6,\; j = 0..2^k - 1

and the all-zero tree is 0. Decade ``e`` thus holds ``2^(6-e)`` evenly spaced values in
``(10^{-e-1}, 10^{-e}]``: 64 values between 0.1 and 1 (spacing 0.014), one value (``1e-6``) in
the last decade; the decades tile ``[1e-6, 1]`` (seven orders of magnitude) and the largest
magnitude is exactly 1, so the element that sets a block's scale is stored exactly.

**Dynamic code** (unsigned, for second-moment-like state, which is never negative): the sign bit
is re-purposed as a fixed fraction bit (paper, section 2.3), i.e. the same tree over all 8 bits:
``e = 0..7``, ``k = 7 - e`` fraction bits, 128 values between 0.1 and 1, range ``[1e-7, 1]``.

With the tree read as an integer ``i = 2^k + j`` (indicator bit at position ``k``) the values are
increasing in ``i``, so a code is simply the index into the sorted magnitude table; a signed
byte is ``i + 128`` for negative numbers.

**Encoding** is round-to-nearest: the index of the nearest table value, with ties going to the
smaller magnitude -- exactly ``torch.bucketize(|y|, midpoints)`` for the fp32 midpoints of
consecutive magnitudes. It is computed without a search: the upper 16 bits of ``|y|`` (its bf16
interval) index a table over the 32768 bf16 intervals of all non-negative floats, each entry
packing the number of midpoints below the interval and how far the low 16 bits of the one
midpoint inside it, if any, are from 0xFFFF (checked when the table is built: no interval holds
two); adding the low half of ``|y|`` to the entry carries into the count exactly when ``|y|`` is
past that midpoint (eagerly the two facts come from two tables, which
takes fewer operations: the fixed cost of each is most of an eager step of small tensors). Decoding is
a table lookup, or, under ``torch.compile``, the arithmetic that defines the table. Both fuse into
one loop with the optimizer's update (``tests/test_state_8bit.py`` checks the encode against
``bucketize``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.tracing import is_traced, kept_constant, table_lookup

#: elements per block of blockwise 8-bit state (one fp32 scale each)
BLOCK = 256


def _pow10(k: torch.Tensor) -> torch.Tensor:
    """``10**k`` (fp32, exact) for integer ``k`` in ``[0, 8)``, without a lookup or ``pow``. Each
    bit is tested for equality with zero, not inequality: AVX2 has no integer "not equal" (nor
    "greater or equal"), and ATen's AVX2 vectors invert an equality for it, one instruction more
    per select. One 4096x1024 step on one thread with AVX2 kernels built for Zen 3
    (``ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CPP_MARCH=znver3`` on the AVX-512 EPYC; three
    alternating processes of each tree): ``adamw_8bit`` 15.8-17.1 -> 15.0-15.5 ms,
    ``ademamix_8bit`` 21.3-22.0 -> 20.6-20.9, ``adan_8bit`` 21.9-23.1 -> 21.9-23.0; with AVX-512
    kernels (mask registers) no change. The same bits."""
    return (
        torch.where((k & 1) == 0, 1.0, 10.0)
        * torch.where((k & 2) == 0, 1.0, 100.0)
        * torch.where((k & 4) == 0, 1.0, 10000.0)
    )


def tree_values(index: torch.Tensor, bits: int) -> torch.Tensor:
    """The magnitude (fp32) of each tree index (int32, ``0 <= index < 2**bits``): 0 for index 0;
    for ``index = 2^k + j``, ``10^-(bits-1-k) (0.1 + 0.9 (j+1)/2^k)`` evaluated in fp32 with
    the operations below. This arithmetic IS the code's definition: the decode tables are built
    by running it, and the compiled path runs it instead of a table lookup (same fp32 operations
    in the same order, so the same numbers)."""
    as_float = index.to(torch.float32)
    exponent = as_float.view(torch.int32) & 0x7F800000
    two_k = exponent.view(torch.float32)  # 2^k: the float with index's exponent and no mantissa
    inv_two_k = ((254 << 23) - exponent).view(torch.float32)  # 1/2^k, exact
    k = (exponent >> 23) - 127
    frac = (as_float + 1.0 - two_k) * inv_two_k  # (j + 1) / 2^k
    value = _pow10(k) * (10.0 ** -(bits - 1)) * (0.1 + 0.9 * frac)
    return torch.where(index == 0, 0.0, value)


def tree_magnitudes(bits: int) -> torch.Tensor:
    """The ``2**bits`` magnitudes of the dynamic tree code over ``bits`` bits, increasing (fp32)."""
    return tree_values(torch.arange(2**bits, dtype=torch.int32), bits)


#: the bf16 interval of +inf (NaNs after it): every magnitude from 1 up takes the top code
_INFINITY_BUCKET = 255 << 7
#: bf16 intervals of all non-negative floats (the upper 16 bits of ``|y|``'s bit pattern)
_BUCKETS = 1 << 15
#: the low 16 bits of a bit pattern (of ``|y|``, of a midpoint)
_LOW = 0xFFFF


@dataclass
class DynamicCode:
    """One code: its decode table and its encode table (built once, cached per device)."""

    name: str
    signed: bool
    magnitudes: torch.Tensor  # fp32, increasing, magnitudes[0] == 0, magnitudes[-1] == 1
    bits: int  # bits of the tree (7 for the signed code, whose byte adds a sign bit; 8 unsigned)
    _cache: dict = field(default_factory=dict, repr=False)
    _eager_cache: dict = field(default_factory=dict, repr=False)
    #: a traced step scales its blocks through the (blocks, block) view (blockwise8bit._over_blocks)
    traced_by_block_rows = True

    def __post_init__(self):
        mags = self.magnitudes
        self.midpoints = ((mags[1:].double() + mags[:-1].double()) / 2).float()
        # per bf16 interval of every finite non-negative float: the midpoints below it and the
        # midpoints in [start, end) (checked: none holds two)
        intervals = torch.arange(_INFINITY_BUCKET, dtype=torch.int32)
        below = torch.bucketize((intervals << 16).view(torch.float32), self.midpoints)
        holds = torch.bucketize(((intervals + 1) << 16).view(torch.float32), self.midpoints) - below
        if int(holds.max()) > 1:
            raise AssertionError(f"{self.name}: the encode table cannot be exact")
        top = self.midpoints.numel()
        inner = self.midpoints[below.clamp_max(top - 1)]  # the midpoint in the interval, if any
        # 0xFFFF less the midpoint's low half: a low half past the midpoint's carries out of it
        # (into bit 16); 0 where the interval holds no midpoint, out of which no low half carries
        to_carry = torch.where(holds > 0, _LOW - (inner.view(torch.int32) & _LOW), 0)
        #: per bf16 interval of every non-negative float: the number of midpoints below it (bits
        #: 16-23) and ``to_carry`` (bits 0-15); +inf and NaN take the top code
        self.encode_table = torch.full((_BUCKETS,), top << 16, dtype=torch.int32)
        self.encode_table[:_INFINITY_BUCKET] = (below << 16) | to_carry
        # the eager encode's tables: the same two facts, one table each, so that no integer
        # arithmetic takes them apart (a dozen operations fewer per tensor: most of an eager step
        # of small tensors)
        #: per bf16 interval (the upper 16 bits of a non-negative float): midpoints below it
        self.counts = torch.full((_BUCKETS,), top, dtype=torch.uint8)
        self.counts[:_INFINITY_BUCKET] = below.to(torch.uint8)
        #: per bf16 interval: the midpoint inside it, +inf where there is none
        self.inner_midpoints = torch.full((_BUCKETS,), float("inf"))
        self.inner_midpoints[:_INFINITY_BUCKET] = torch.where(holds > 0, inner, float("inf"))
        if self.signed:
            self.table = torch.cat([mags, -mags])
        else:
            self.table = mags.clone()

    @property
    def levels(self) -> int:
        return self.table.numel()

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """:func:`encode_normalized` (the interface the blockwise helpers call)."""
        return encode_normalized(y, self)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """:func:`decode_codes`."""
        return decode_codes(codes, self)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decode table, encode table)`` on ``device``."""
        return self._on(device, self._cache, "table", "encode_table")

    def eager_encode_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts, inner_midpoints)`` on ``device``: the eager encode's tables (in a cache of
        their own: a traced step reads :meth:`tables`, whose cache dynamo may guard)."""
        return self._on(device, self._eager_cache, "counts", "inner_midpoints")

    def _on(self, device: torch.device, cache: dict, *names: str) -> tuple[torch.Tensor, ...]:
        return kept_constant(cache, str(device), lambda: tuple(getattr(self, name).to(device) for name in names))


SIGNED = DynamicCode("dynamic tree (signed)", True, tree_magnitudes(7), 7)
UNSIGNED = DynamicCode("dynamic (unsigned)", False, tree_magnitudes(8), 8)


def encode_normalized(y: torch.Tensor, code: DynamicCode) -> torch.Tensor:
    """Nearest code (uint8) of each element of ``y`` (fp32, ``|y| <= 1``; larger magnitudes give
    the top code). The unsigned code stores ``|y|``.

    One lookup per element, integers only: the bf16 interval of ``|y|`` (the upper half of its bit
    pattern) gives the number of midpoints below the interval (bits 16-23 of the entry) and
    ``0xFFFF`` less the lower half of the midpoint inside it, if any (bits 0-15). ``|y|`` is past
    that midpoint when its own lower half is larger (bit patterns of non-negative floats are
    ordered as the floats, and the upper halves are equal), which is when adding that lower half
    to the entry carries one into the count: the code is ``(entry + low) >> 16``. An interval
    without a midpoint stores 0, out of which no lower half carries. The table covers every
    non-negative bit pattern (128 KiB), so the index needs no clamp: +inf and NaN (a block holding
    one) take the top code.

    Measured, one compiled step of 4096x1024:

    * against the earlier table of the 3329 intervals from 2^-26 to 1, whose index was clamped and
      whose entry held the midpoint's presence in a bit of its own (seven integer operations more
      per element), ratio to torch AdamW foreach on a 2-core AMD EPYC with AVX-512 (two threads,
      alternating processes, a fresh inductor cache each): ``ademamix_8bit`` 1.51-1.76x ->
      1.49-1.53x, ``adan_8bit`` 1.58-1.81x -> 1.52-1.57x; with AVX2 kernels
      (``ATEN_CPU_CAPABILITY=avx2``) 1.86-1.94x -> 1.75-1.84x and 1.96-1.98x -> 1.79-1.93x;
    * the carry against a comparison of the two lower halves (each masked, the comparison's mask
      made a 0 or 1 and added: eight AVX2 instructions, three now), one thread, medians of five
      alternating processes per tree: with AVX2 kernels built for Zen 3
      (``ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CPP_MARCH=znver3`` on the AVX-512 EPYC)
      ``adamw_8bit`` 15.7 -> 14.8 ms, ``ademamix_8bit`` 20.7 -> 20.3, ``adan_8bit`` 22.3 -> 20.9;
      with AVX-512 kernels 13.3 -> 12.7, 18.1 -> 17.9, 18.9 -> 18.0. The same codes.

    Under torch.compile on CPU (torch 2.13) inductor's own code reads the table in a scalar loop
    of 8 or 16 loads per vector, the kit's compilations with a vector gather
    (:mod:`hfoptim.core.vector_gather`). An arithmetic encode without the table (the decade by
    comparisons, the position in it by interpolation, then the one midpoint next to it from two
    :func:`tree_values`) was measured exact against ``bucketize`` but 1.5-1.7x slower per 8-bit
    step (AMD EPYC, one core): the two evaluations of the code cost more than the lookup.

    The int32 code is stored as a byte: on x86 CPUs the kit's compilations convert a vector in
    registers (:mod:`hfoptim.core.vector_narrow`, which has the measurements), where inductor's own
    conversion goes element by element through a stack buffer; the encode used to go through fp32
    for that reason (7077c1e), the same bytes.

    Eagerly (:func:`_encode_eager`) the same facts come from two tables, one lookup each."""
    if not is_traced():
        return _encode_eager(y, code)
    _, table = code.tables(y.device)
    bits = y.view(torch.int32) & 0x7FFFFFFF
    index = (table_lookup(table, bits >> 16) + (bits & _LOW)) >> 16
    if code.signed:
        index = torch.where(y < 0, index + 128, index)
    return index.to(torch.uint8)


def _encode_eager(y: torch.Tensor, code: DynamicCode) -> torch.Tensor:
    """:func:`encode_normalized` with eager operations, in six (unsigned code) or eight (signed):
    the bf16 interval of ``|y|`` reads the number of midpoints below it and the midpoint inside
    it (+inf where there is none) from two tables; ``|y|`` past that midpoint adds one. The codes
    are those of the traced form (``tests/test_state_8bit.py`` compares them on every bf16
    interval). On small tensors an eager step is mostly its operations' fixed costs, and the
    traced form's integer arithmetic on the packed table took twenty: with this encode an
    ``adamw_8bit`` step of the demo's model (28 matrices under 65536 elements, stepped eagerly)
    took 16-18 ms instead of 21-23, ``ademamix_8bit`` 25-28 instead of 32-35 (2-core Intel Xeon,
    alternating processes)."""
    counts, inner_midpoints = code.eager_encode_tables(y.device)
    magnitude = y.abs()
    bucket = (magnitude.view(torch.int32) >> 16).reshape(-1)
    index = counts.index_select(0, bucket).view(y.shape)
    index += magnitude > inner_midpoints.index_select(0, bucket).view(y.shape)
    if code.signed:
        index.add_(y < 0, alpha=128)
    return index


def decode_codes(codes: torch.Tensor, code: DynamicCode) -> torch.Tensor:
    """The table values (fp32) of ``codes`` (uint8, any shape): a table lookup eagerly; under
    torch.compile the arithmetic of :func:`tree_values` (a gather costs more there than the
    dozen vector operations that recompute the same number: a 256-entry lookup made the fused
    8-bit AdamW step 1.8x slower on one AMD EPYC core, torch 2.13, where inductor's C++
    backend emits it as a scalar loop; replacing the float bit casts by comparisons made it
    1.1x slower: those casts cost little there, measured).

    Under torch.compile the codes are read as bytes on every instruction set. Torch 2.13's AVX2
    kernels load eight bytes through a stack buffer (``vec256_int.h``), so AVX2 kernels used to
    read four codes a 32-bit word, taken apart by shifts and stacked. The kit's compilations now
    load eight bytes with one instruction (:mod:`hfoptim.core.vector_bytes`), and bytes let the
    decode fuse into the block maxima's loop (:func:`hfoptim.state.blockwise8bit._over_blocks`),
    which the words' stacked parts did not. One compiled step of 4096x1024 with AVX2 kernels
    (``ATEN_CPU_CAPABILITY=avx2`` on a 2-core Intel Xeon, two threads, a fresh inductor cache
    per form, interleaved medians), ratio to torch AdamW foreach: ``adamw_8bit`` 1.73-1.80x from
    words, 1.59-1.64x from bytes; ``adan_8bit`` 2.19-2.26x against 1.90-1.98x. The values are
    the same either way."""
    if is_traced():
        return _decode_index(codes.to(torch.int32), code)
    table, _ = code.tables(codes.device)
    return table_lookup(table, codes)


def _decode_index(index: torch.Tensor, code: DynamicCode) -> torch.Tensor:
    """The values of the codes ``index`` (int32, ``0 <= index < 256``) by :func:`tree_values`."""
    if not code.signed:
        return tree_values(index, code.bits)
    value = tree_values(index & 127, code.bits)
    return torch.where(index > 127, -value, value)  # ">": AVX2 has no integer ">=" of one instruction
