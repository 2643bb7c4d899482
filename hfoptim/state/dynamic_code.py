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
consecutive magnitudes. It is computed without a binary search: the upper 15 magnitude bits of
the fp32 number (its bf16 truncation) index a 32768-entry table giving the number of midpoints
below the start of that bf16 interval; every such interval holds at most one midpoint (checked
when the tables are built), so one comparison with that midpoint finishes the search. This is a
handful of elementwise operations and two lookups in small tables, which ``torch.compile`` fuses
into one loop (``tests/test_state_8bit.py`` checks it against ``bucketize``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: elements per block of blockwise 8-bit state (one fp32 scale each)
BLOCK = 256


def _pow10(k: torch.Tensor) -> torch.Tensor:
    """``10**k`` (fp32, exact) for integer ``k`` in ``[0, 8)``, without a lookup or ``pow``."""
    return (
        torch.where((k & 1) != 0, 10.0, 1.0)
        * torch.where((k & 2) != 0, 100.0, 1.0)
        * torch.where((k & 4) != 0, 10000.0, 1.0)
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


def _bucket_starts() -> torch.Tensor:
    """The fp32 value at the start of each of the 32768 non-negative bf16 intervals."""
    return (torch.arange(1 << 15, dtype=torch.int32) << 16).view(torch.float32)


@dataclass
class DynamicCode:
    """One code: its decode table and the encode lookup tables (built once, cached per device)."""

    name: str
    signed: bool
    magnitudes: torch.Tensor  # fp32, increasing, magnitudes[0] == 0, magnitudes[-1] == 1
    bits: int  # bits of the tree (7 for the signed code, whose byte adds a sign bit; 8 unsigned)
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        mags = self.magnitudes
        self.midpoints = ((mags[1:].double() + mags[:-1].double()) / 2).float()
        starts = _bucket_starts()
        #: number of midpoints below each bf16 interval's start
        self.first = torch.bucketize(starts, self.midpoints).to(torch.int32)
        ends = torch.cat([starts[1:], torch.tensor([float("inf")])])
        within = torch.bucketize(ends, self.midpoints) - self.first
        if int(within.max()) > 1:
            raise AssertionError(f"{self.name}: a bf16 interval holds two midpoints; the encode lookup is not exact")
        #: midpoints followed by +inf (the comparison for the top magnitude never succeeds)
        self.above = torch.cat([self.midpoints, torch.tensor([float("inf")])])
        if self.signed:
            self.table = torch.cat([mags, -mags])
        else:
            self.table = mags.clone()

    @property
    def levels(self) -> int:
        return self.table.numel()

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(decode table, first, above)`` on ``device``."""
        key = str(device)
        found = self._cache.get(key)
        if found is None:
            found = tuple(t.to(device) for t in (self.table, self.first, self.above))
            self._cache[key] = found
        return found


SIGNED = DynamicCode("dynamic tree (signed)", True, tree_magnitudes(7), 7)
UNSIGNED = DynamicCode("dynamic (unsigned)", False, tree_magnitudes(8), 8)


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` keeping ``index``'s shape: one flat ``index_select`` eagerly (3x faster
    on CPU than advanced indexing), plain indexing under torch.compile (which fuses it)."""
    if torch.compiler.is_compiling():
        return table[index.long()]
    return table.index_select(0, index.reshape(-1).to(torch.int32)).view(index.shape)


def encode_normalized(y: torch.Tensor, code: DynamicCode) -> torch.Tensor:
    """Nearest code (uint8) of each element of ``y`` (fp32, ``|y| <= 1``; larger magnitudes give
    the top code). The unsigned code stores ``|y|``."""
    _, first, above = code.tables(y.device)
    bits = (y.view(torch.int32) >> 16) & 0x7FFF  # bf16 interval of |y|
    index = _lookup(first, bits)
    index = index + (y.abs() > _lookup(above, index)).to(torch.int32)
    if code.signed:
        index = index + (y < 0).to(torch.int32) * 128
    return index.to(torch.uint8)


def decode_codes(codes: torch.Tensor, code: DynamicCode) -> torch.Tensor:
    """The table values (fp32) of ``codes`` (uint8, any shape): a table lookup eagerly; under
    torch.compile the arithmetic of :func:`tree_values` (a gather costs more there than the
    dozen vector operations that recompute the same number)."""
    if torch.compiler.is_compiling():
        index = codes.to(torch.int32)
        if not code.signed:
            return tree_values(index, code.bits)
        value = tree_values(index & 127, code.bits)
        return torch.where(index >= 128, -value, value)
    table, _, _ = code.tables(codes.device)
    return _lookup(table, codes)
