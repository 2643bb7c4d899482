r"""SMMF storage: square-matricized rank-1 factorization of a moment, sign kept as bits
(Park et al. 2024, "SMMF: Square-Matricized Momentum Factorization for Memory-Efficient
Optimization", arXiv 2412.08894; formulas checked against the authors' code, KwangryeolPark/SMMF).

Every tensor -- 1-D ones included; empty ones stay dense -- of ``n`` elements is seen as the
most square matrix ``(n/i, i)``, ``i`` the largest divisor of ``n`` with ``i <= sqrt(n)`` (so rows >= columns). A
non-negative matrix ``M`` is kept as its rank-1 non-negative factorization

.. math::
    r = M 1,\qquad c = \frac{1^\top M}{1^\top M 1},\qquad \mathrm{decode} = r\,c^\top

(the shorter side, the columns, is normalized by its total; a zero matrix stays zero). This is
the closed-form rank-1 NNMF of the paper (Algorithm 2, NNMF / UnNNMF). For a FIRST_MOMENT slot
the sign is stored separately, one bit per element (``1`` where ``m > 0``; ``m = 0`` decodes
as ``-|m_hat|``, as in the authors' code), and ``|m|`` is factored. Stored, for slot ``s``:

* ``"s.row"``: ``r``, shape ``(n/i,)``; ``"s.col"``: ``c``, shape ``(i,)`` (compute dtype);
* ``"s.sign"``: ``ceil(n/8)`` bytes (uint8, first moments only). The authors' code keeps a
  bool tensor (1 byte per element); the paper counts 1 bit, which is what is stored here.

Within a step the rule works on the full decoded and updated moments, and they are factored
again afterwards -- the order of the paper's Algorithm 1 and of the authors' code.

Sharding: the square matricization is of the flattened WHOLE tensor (``n`` its global size).
A process holds a contiguous flat range of it, i.e. some rows of the ``(n/i, i)`` matrix, the
first and last possibly in part (:func:`~hfoptim.core.stats.flat_matrix_view`); it keeps ``r``
for those rows and the whole ``c``, and the row sums of cut rows, the column sums and the total
are completed by the stats backend -- the same numbers as on one process. A shard whose
boundaries end rows of that matrix (:meth:`SMMF.shard_local`) may be stepped in row pieces
whose column sums are completed after the bucket (:class:`~hfoptim.core.chunking.ShardSums`);
no compiled kernel steps a shard (:meth:`SMMF.fusable_for`).
"""

from __future__ import annotations

import math
import sys

import torch

from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
from ..core.stats import flat_matrix_view, from_flat_matrix, to_flat_matrix
from ..core.tracing import is_traced, kept_constant
from .codec import Codec, Dense

_DENSE = Dense()

_BIT_WEIGHTS: dict = {}
_SIGN_TABLES: dict = {}

#: ``sum_k 2**(56 - 7k)`` for k = 0..7. A 64-bit word holding eight 0/1 bytes (byte ``k`` at bit
#: ``8k``) times this constant has byte ``k``'s bit at bit ``56 + k`` and every other partial
#: product on a bit of its own below 56 (``8k + 56 - 7j`` differ for all ``(k, j)``), so no carry
#: reaches the top byte: the top byte is the eight bits packed, element ``k`` in bit ``k``. One
#: multiply and one shift per eight elements instead of a multiply-and-sum over a dimension of 8
#: (measured 0.4 ms against 12 ms for a 2.4M-element mask, one AMD EPYC core).
_GATHER_BITS = 0x0102040810204080


_SQUARE_SHAPES: dict[int, tuple[int, int]] = {}


def square_shape(n: int) -> tuple[int, int]:
    """``(n // i, i)`` with ``i`` the largest divisor of ``n`` not above ``sqrt(n)``, remembered
    per ``n`` (:func:`~hfoptim.core.tracing.kept_constant`: a trace reads what an eager step
    remembered, and remembers nothing itself; kernels of several sizes compiled once each under
    ``TORCH_LOGS=recompiles``). The search took 12 us for the 24.6M elements of a 32000x768
    embedding, which a step asks for a few times per row piece: 71.9 against 73.4 ms a step,
    interleaved in one process on a 2-core AMD EPYC."""
    return kept_constant(_SQUARE_SHAPES, n, lambda: _square_search(n))


def _square_search(n: int) -> tuple[int, int]:
    if n <= 0:
        return (max(n, 0), 1)
    for i in range(math.isqrt(n), 0, -1):
        if n % i == 0:
            return (n // i, i)
    raise AssertionError(n)


def _weights(device) -> torch.Tensor:
    return kept_constant(
        _BIT_WEIGHTS, device, lambda: torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
    )


def _pack_by_sum(flat: torch.Tensor) -> torch.Tensor:
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _weights(flat.device)).sum(dim=1, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor, spent: bool = False) -> torch.Tensor:
    """A bool tensor as ``ceil(numel/8)`` bytes, element ``k`` in bit ``k % 8`` of byte ``k // 8``
    (numpy's ``packbits(..., bitorder="little")``). Whole groups of eight are packed as 64-bit
    words (:data:`_GATHER_BITS`; the bytes of a word are its elements in order on a
    little-endian machine), a last partial group by a weighted sum. A traced step (the compiled
    kernel) takes the weighted sum throughout: inductor fuses it, and the word view needs the
    storage offset, which dynamo cannot trace. With ``spent`` the words are computed in ``mask``'s
    own bytes (a mask its caller no longer reads)."""
    flat = mask.reshape(-1)
    whole = flat.numel() // 8 * 8
    if whole == 0 or sys.byteorder != "little" or is_traced():
        return _pack_by_sum(flat)
    head = flat[:whole]
    if not head.is_contiguous() or head.storage_offset() % 8:
        head, spent = head.clone(), True  # a 64-bit view needs 8-byte aligned, contiguous bytes
    words = head.view(torch.uint8).view(torch.int64)
    # the product wraps modulo 2**64 (only its top byte is kept); the shift is arithmetic for a
    # negative word and the cast to uint8 keeps the low byte, the packed bits
    words = words.mul_(_GATHER_BITS) if spent else words * _GATHER_BITS
    packed = words.bitwise_right_shift_(56).to(torch.uint8)
    if whole == flat.numel():
        return packed
    return torch.cat([packed, _pack_by_sum(flat[whole:])])


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool tensor (flat, ``numel`` elements) that :func:`pack_bits` stored."""
    bits = packed.unsqueeze(1).bitwise_and(_weights(packed.device)).ne(0)
    return bits.reshape(-1)[:numel]


def _sign_table(device, dtype) -> torch.Tensor:
    """``(256, 8)``: row ``b`` holds ``+1`` where bit ``k`` of ``b`` is set, ``-1`` elsewhere."""

    def make() -> torch.Tensor:
        bits = unpack_bits(torch.arange(256, dtype=torch.uint8), 256 * 8).view(256, 8)
        return torch.where(bits, 1.0, -1.0).to(device=device, dtype=dtype)

    return kept_constant(_SIGN_TABLES, (device, dtype), make)


def signs(packed: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``+1`` where :func:`pack_bits` stored a set bit, ``-1`` elsewhere: flat, ``numel`` elements
    of ``dtype``. A lookup of eight values per byte (one gather pass) instead of unpacking the
    bits and selecting between ``m`` and ``-m`` (two bool passes and a select: 2 ms against
    29 ms for 2.4M elements, one AMD EPYC core). A traced step computes ``2 * bit - 1`` from the
    unpacked bits, which inductor fuses into the decode, instead of a cached table."""
    if is_traced():
        return unpack_bits(packed, numel).to(dtype).mul(2).sub(1)
    table = _sign_table(packed.device, dtype)
    return table.index_select(0, packed.to(torch.int32)).reshape(-1)[:numel]


def _by_matrix_bytes(view, cols: int) -> bool:
    """Whether a traced step (a kernel of a tensor held whole, or of a row piece of one, which
    starts on a row of the square matrix: :meth:`SMMF.row_granularity`) reads and writes its
    sign bits as the square matrix's rows of bytes: when a row of ``cols`` elements is whole
    bytes. Flat, the bits of element ``e`` are bit ``e % 8`` of byte ``e // 8`` and the matrix
    element ``(e // cols, e % cols)``: inductor compiles that indexing to scalar loops (the
    packing one byte at a time, recomputing the moment's update for each of its eight
    elements); by rows, ``(i, 8k + j)`` is bit ``j`` of byte ``(i, k)``, and the loops are
    vectorized over the bytes of a row. The same bits either way."""
    return is_traced() and not view.sharded and cols % 8 == 0


def _matrix_bits(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The bits :func:`_pack_matrix_bits` stored, as a ``(rows, cols)`` tensor of 0 and 1: each
    byte shifted by ``0..7`` along a new last dimension (a broadcast, which inductor reads as
    ``byte[i, j // 8] >> (j % 8)`` in the element loop; a stack of the eight shifts was an extern
    ``cat`` in the compiled kernel, 5.5 ms a step of a 32000x768 tensor)."""
    shifts = torch.arange(8, dtype=packed.dtype, device=packed.device)
    return ((packed.view(rows, cols // 8, 1) >> shifts) & 1).view(rows, cols)


def _pack_matrix_bits(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` of a ``(rows, cols)`` bool matrix whose rows are whole bytes, byte
    ``(i, k)`` the OR of ``mask[i, 8k + j] << j`` (see :func:`_by_matrix_bytes`)."""
    rows, cols = mask.shape
    bits = mask.view(rows, cols // 8, 8).to(torch.uint8)
    packed = bits[:, :, 0]
    for j in range(1, 8):
        packed = packed | (bits[:, :, j] << j)
    return packed.reshape(-1)


class SMMF(Codec):
    """Square-matricized rank-1 factors, sign bits for first moments; see the module docstring."""

    name = "smmf"
    fusable = True
    #: the kernel decodes and steps the tensor seen as its square matrix (:meth:`row_block`) and
    #: writes the new moments into the step's workspace, which the plain path's encode factors
    #: (``encodes_after_kernel``, :meth:`encode_spent`: inductor compiled the factoring's sums to
    #: loops slower than the whole plain path), in row pieces within ``chunk_bytes`` like the
    #: plain path. Interleaved in one process against the
    #: plain path, ratio to torch AdamW foreach (2-core AMD EPYC with AVX-512, glibc keeping freed
    #: memory): 32000x768 1.92x against 2.99x, 4096x4096 1.46x against 1.66x, 2048x768 1.42x
    #: against 2.09x, 768x768 1.73x against 2.21x
    auto_compiles = True
    auto_compiles_as_rows = True
    #: the plain path codes it tensor by tensor (see Codec.coded_per_tensor): ``"auto"`` compiles
    #: the small tensors of a shape a group has many of (a LoRA set's 176 adapters under 65536
    #: elements: 138 -> 114 ms a step, torch AdamW foreach 53, interleaved in one process)
    coded_per_tensor = True
    encodes_after_kernel = True
    #: a row piece starts on a row of the square matrix (:meth:`row_granularity`), whose rows of
    #: ``r`` and sign bytes are its own: the kernel may step it as rows from 0
    offset_free = True
    any_rows = False
    kinds = frozenset({FIRST_MOMENT, SECOND_MOMENT})

    @staticmethod
    def _keys(slot: Slot) -> tuple[str, str, str]:
        return f"{slot.name}.row", f"{slot.name}.col", f"{slot.name}.sign"

    def fusable_for(self, view):
        """Not for a shard: ``c`` is the column sums normalized by their total, which a kernel of
        one process's rows cannot leave as a partial sum to complete (:meth:`shard_sums`); a
        shard's row pieces take the plain path, their column sums completed after the bucket
        (:class:`~hfoptim.core.chunking.ShardSums`)."""
        return self.fusable and not view.sharded

    def shard_local(self, slot, view):
        """A shard whose process boundaries all fall on rows of the square matrix: its rows of
        ``r`` and its sign bits are its own, and ``c`` needs only its column sums, completed over
        the processes (:class:`~hfoptim.core.chunking.ShardSums`)."""
        if view.global_numel == 0:
            return True
        _, cols = square_shape(view.global_numel)
        return all(cut % cols == 0 for cut in view.cuts)

    def row_block(self, view):
        """The square matrix's row length ``i``: a compiled kernel sees the parameter (and its
        gradient) as rows of ``i``, the square matrix itself, so that the decode and the update
        run in one loop over elements (in the parameter's shape the matrix's elements are
        indexed by division and remainder, which inductor compiles to scalar loops: a 32000x768
        tensor's step took 398 ms). A sharded view keeps its shape (SMMF is not fused there)."""
        if len(view.global_shape) < 2 or view.global_numel == 0 or view.sharded:
            return None
        return square_shape(view.global_numel)[1]

    def row_granularity(self, slot, view):
        """Row pieces of a 2+-D parameter held whole, or of a :meth:`shard_local` shard, start on
        a row of the square matrix and on a byte of the sign bits: at flat multiples of
        ``lcm(cols, 8)`` from the tensor's (the shard's) first element, i.e. at multiples of this
        many parameter rows (0: none but the whole tensor or shard)."""
        if len(view.global_shape) < 2 or view.global_numel == 0:
            return 0
        if view.sharded and not self.shard_local(slot, view):
            return 0
        _, cols = square_shape(view.global_numel)
        flat = math.lcm(cols, 8)
        rows = flat // math.gcd(flat, view.row_len)
        return rows if rows < view.global_rows else 0

    def rows(self, slot, stored, view, start, stop):
        """Local rows ``start:stop`` of the parameter (or shard): their rows of ``r`` and bytes of
        sign bits (views), and the whole ``c``, which the pieces only read; their parts of the
        column sums go to :meth:`piece_sums` and become ``c`` in :meth:`finish_pieces`."""
        step = self.row_granularity(slot, view)
        if not step or start % step or (stop % step and stop != view.rows):
            return None
        _, cols = square_shape(view.global_numel)
        row, col, sign = self._keys(slot)
        a, b = start * view.row_len, stop * view.row_len
        out = {row: stored[row][a // cols : -(-b // cols)], col: stored[col]}
        if slot.kind == FIRST_MOMENT:
            out[sign] = stored[sign][a // 8 : -(-b // 8)]
        return out

    def piece_sums(self, slot, stored, view):
        return {self._piece_key(slot): torch.zeros_like(stored[f"{slot.name}.col"])}

    def finish_pieces(self, slot, stored, sums):
        self._store_col(stored[f"{slot.name}.col"], sums[self._piece_key(slot)])

    @staticmethod
    def _piece_key(slot: Slot) -> str:
        return f"{slot.name}.col_sum"

    @staticmethod
    def _store_col(col: torch.Tensor, col_sums: torch.Tensor) -> None:
        """``c = col_sums / 1^T col_sums`` (a zero matrix keeps ``c = 0``)."""
        total = col_sums.sum()
        col.copy_(col_sums / torch.where(total > 0, total, torch.ones_like(total)))

    def shapes(self, slot, view, p):
        if view.global_numel == 0:  # empty: nothing to factor
            return _DENSE.shapes(slot, view, p)
        _, cols = square_shape(view.global_numel)
        row, col, sign = self._keys(slot)
        out = {row: (flat_matrix_view(view, cols).rows,), col: (cols,)}
        if slot.kind == FIRST_MOMENT:
            out[sign] = ((view.local_numel + 7) // 8,)
        return out

    def init(self, slot, value, view, *, stats=None):
        if view.global_numel == 0:  # empty: nothing to factor
            return _DENSE.init(slot, value, view)
        _, cols = square_shape(view.global_numel)
        row, col, sign = self._keys(slot)
        stored = {row: value.new_zeros(flat_matrix_view(view, cols).rows), col: value.new_zeros(cols)}
        if slot.kind == FIRST_MOMENT:
            stored[sign] = torch.zeros((view.local_numel + 7) // 8, dtype=torch.uint8, device=value.device)
        self.encode(slot, stored, value, view, stats=stats)
        return stored

    def decode(self, slot, stored, view, dtype, *, stats=None):
        if view.global_numel == 0:  # empty: nothing to factor
            return _DENSE.decode(slot, stored, view, dtype)
        row, col, sign = self._keys(slot)
        r, c = stored[row].to(dtype), stored[col].to(dtype)
        if slot.kind == FIRST_MOMENT and _by_matrix_bytes(view, c.numel()):
            bits = _matrix_bits(stored[sign], r.numel(), c.numel())
            return (torch.outer(r, c) * bits.to(dtype).mul(2).sub(1)).reshape(view.local_shape)
        m = from_flat_matrix(torch.outer(r, c), view, c.numel()).reshape(-1)  # this process's elements
        if slot.kind == FIRST_MOMENT:
            m = m.mul_(signs(stored[sign], m.numel(), m.dtype))  # m is a fresh tensor
        return m.reshape(view.local_shape)

    def encode(self, slot, stored, value, view, *, stats=None):
        self.encode_many(slot, [stored], [value], [view], stats=stats)

    def encode_spent(self, slot, stored, value, view, *, stats=None):
        """:meth:`encode`, taking the magnitudes in ``value``'s place and packing the sign bits
        in the mask's (a 1.5M-element piece: 8.9 MiB less; of the piece's size only the mask)."""
        self.encode_many(slot, [stored], [value], [view], stats=stats, spent=True)

    def encode_many(self, slot, stored, values, views, *, stats=None, spent: bool = False):
        row, col, sign = self._keys(slot)
        index, matrices, mviews = [], [], []
        for i, (s, value, view) in enumerate(zip(stored, values, views)):
            if view.global_numel == 0:  # empty: nothing to factor
                _DENSE.encode(slot, s, value, view)
                continue
            cols = s[col].numel()
            matrix = to_flat_matrix(value, view, cols)
            if slot.kind == FIRST_MOMENT:
                if _by_matrix_bytes(view, cols):
                    s[sign].copy_(_pack_matrix_bits(matrix > 0))
                else:
                    s[sign].copy_(pack_bits(value.reshape(-1) > 0, spent=True))
                matrix = matrix.abs_() if spent else matrix.abs()
            index.append(i)
            matrices.append(matrix)
            mviews.append(flat_matrix_view(view, cols))
        if not index:
            return
        # a row piece (one process; its rows of the matrix whole) adds its column sums to the
        # step's accumulator (:meth:`piece_sums`); the others' go through the statistics backend
        sums_of = [stored[i].get(self._piece_key(slot)) for i in index]
        whole = [k for k, acc in enumerate(sums_of) if acc is None]
        col_sums = iter(stats.col_sums([matrices[k] for k in whole], [mviews[k] for k in whole]) if whole else ())
        # one reduction for the row sums of all tensors, one for their column sums
        for i, r, acc, matrix in zip(index, stats.row_sums(matrices, mviews), sums_of, matrices):
            stored[i][row].copy_(r)
            if acc is not None:
                acc.add_(matrix.sum(dim=0))
            else:
                self._store_col(stored[i][col], next(col_sums))
