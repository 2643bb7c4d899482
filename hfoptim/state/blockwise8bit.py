r"""Blockwise 8-bit state (Dettmers et al. 2022, arXiv 2110.02861), for any rule's first- and
second-moment slots.

A slot is stored as one byte per element plus one fp32 scale per block of 256 elements:

.. math::
    s_b = \max_{i \in b} |x_i|,\qquad c_i = \mathrm{nearest}(x_i / s_b),\qquad
    \mathrm{decode}(c, s)_i = \mathrm{table}[c_i]\; s_b

with the signed dynamic tree code for ``FIRST_MOMENT`` slots and the unsigned dynamic code for
``SECOND_MOMENT`` slots (:mod:`hfoptim.state.dynamic_code`). ``BUFFER`` slots stay dense.

**Blocks follow the parameter's rows.** A tensor of two or more dimensions is seen as the matrix
``(shape[0], prod(shape[1:]))`` and each row is cut into blocks of 256; a block never crosses a
row and a row's last block is shorter when the row length is not a multiple of 256 (it is padded
with zeros to 256 inside the computation only: the codes keep the parameter's shape). So a
shard of whole rows (FSDP2's ``Shard(0)``) holds whole blocks and computes its scales alone. A
0-/1-D tensor is cut into blocks of 256 along the vector.

Stored, per slot: ``"<slot>.codes"`` (uint8, the parameter's local shape) and
``"<slot>.scale"`` (fp32; ``(rows, blocks per row)`` for 2+-D tensors, ``(blocks,)`` otherwise):
1 + 4/256 = 1.016 bytes per element.

Tensors with fewer than ``state_min_numel`` elements (default 4096, counted on the WHOLE
parameter, so precision never depends on the world size) keep fp32 state
(:func:`hfoptim.state.resolve.codec_for`). The block maxima go through ``stats.block_absmax``,
which a sharding backend completes for blocks cut by a process boundary.

Differences from bitsandbytes' 8-bit optimizers: the codes are built here from the paper's
description (bitsandbytes' dynamic map places the levels of each decade differently and its
largest level is just below 1); blocks follow rows instead of the flat tensor; the threshold
is the global size (bitsandbytes: ``min_8bit_size`` on the local tensor, 4096 by default);
bitsandbytes updates ``p`` from the fp32 state before quantizing it, as does this codec (the
engine encodes after the rule's update).
"""

from __future__ import annotations

import math

import torch

from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
from ..core.stats import LocalStats, ParamView, block_layout, blocked, ends_in_short_block, split_lines, unblocked
from ..core.tracing import is_traced
from .codec import Codec
from .dynamic_code import BLOCK, SIGNED, UNSIGNED, DynamicCode

_TINY = torch.finfo(torch.float32).tiny


def code_of(slot: Slot) -> DynamicCode:
    """The signed code for first-moment slots, the unsigned one for second moments."""
    return SIGNED if slot.kind == FIRST_MOMENT else UNSIGNED


def scale_shape(view: ParamView, block: int = BLOCK) -> tuple[int, ...]:
    """Shape of the scales of the local tensor: ``(rows, blocks per row)`` or ``(blocks,)``."""
    lines, length, lead = block_layout(view, block)
    per_line = math.ceil((lead + length) / block)
    if len(view.global_shape) >= 2:
        return (lines, per_line)
    return (per_line,)


def aligned(view: ParamView, block: int = BLOCK) -> bool:
    """Every line is a whole number of blocks (no short last block, no lead)."""
    _, length, lead = block_layout(view, block)
    return lead == 0 and length % block == 0


def split(view: ParamView, block: int = BLOCK) -> bool:
    """Lines that start on a block boundary and end in a short block (rows of 300 elements, a
    vector of 3000): coded as two parts, the whole blocks and the short ones, each with its
    scales broadcast -- no zero padding and no per-element index arithmetic, the two forms that
    inductor 2.13 miscompiles when the producer is fused (tests/test_state_compiled.py)."""
    return ends_in_short_block(view, block)


def scale_per_element(scale: torch.Tensor, view: ParamView, block: int = BLOCK) -> torch.Tensor:
    """Each element's block scale, in the local tensor's shape, for lines that are whole blocks:
    element ``j`` of line ``i`` belongs to block ``(i, j // block)``."""
    lines, length, _ = block_layout(view, block)
    column = torch.arange(length, device=scale.device) // block
    return scale.reshape(lines, length // block).index_select(1, column).reshape(view.local_shape)


def _scaled(x: torch.Tensor, scale: torch.Tensor, view: ParamView, op, code, block: int) -> torch.Tensor:
    """``op(x, s)`` with ``s`` each element's block scale, for :func:`aligned` views: through the
    ``(blocks, block)`` view (:func:`_over_blocks`), or, in a traced step of a code whose
    ``traced_by_block_rows`` is false (the 4-bit codes), with :func:`scale_per_element`: a compiled
    ``adamw_4bit`` step of 4096x1024 took 29.6-29.8 ms with per-element scales against 30.8-32.9
    through the view (AVX-512 kernels; 33.6-35.8 against 38.3-38.9 with AVX2 kernels; two threads
    of a 2-core Intel Xeon, interleaved, a fresh inductor cache per form)."""
    if is_traced() and not code.traced_by_block_rows:
        return op(x, scale_per_element(scale, view, block))
    return _over_blocks(x, scale, view, op, block)


def _over_blocks(x: torch.Tensor, scale: torch.Tensor, view: ParamView, op, block: int) -> torch.Tensor:
    """``op(x, s)`` with ``s`` each element's block scale, for :func:`aligned` views: the local
    tensor as a ``(blocks, block)`` matrix against ``(blocks, 1)`` scales.

    Eagerly this is three operations fewer than per-element scales (an index into the scales per
    element, which on small tensors is most of the cost). In a traced step the loop of a decode
    then has the shape of the block maxima's reduction, and inductor fuses the two: in a compiled
    ``adamw_8bit`` step the first moment is decoded in its maxima's loop instead of a pass of its
    own (40 bytes of memory traffic per element instead of 44, read from inductor's output code).
    A ``(lines, blocks, block)`` view does not do that: inductor read the values back for the
    maxima through a modulo index, in a scalar loop. One compiled step, 4096x1024, a 2-core Intel
    Xeon with AVX-512, two threads, interleaved, a fresh inductor cache per form, against
    per-element scales: ``adamw_8bit`` 1.27-1.31x torch AdamW foreach -> 1.15-1.29x,
    ``ademamix_8bit`` 1.55-1.78x -> 1.43-1.57x, ``adan_8bit`` 1.61-1.88x -> 1.52-1.65x (not the
    4-bit codes: :func:`_scaled`)."""
    return op(x.reshape(-1, block), scale.reshape(-1, 1)).reshape(view.local_shape)


def _by_parts(x: torch.Tensor, scale: torch.Tensor, view: ParamView, op, block: int) -> torch.Tensor:
    """``op(x, s)`` with ``s`` each element's block scale, for :func:`split` views: the whole
    blocks of each line as a ``(lines, blocks, block)`` tensor against ``(lines, blocks, 1)``
    scales, the short last blocks as ``(lines, rest)`` against ``(lines, 1)``."""
    head, tail = split_lines(x, view, block)
    lines, whole = tail.shape[0], 0 if head is None else head.shape[1]
    s = scale.reshape(lines, whole + 1)
    tail = op(tail, s[:, whole:])
    if head is None:
        return tail.reshape(view.local_shape)
    head = op(head, s[:, :whole, None])
    return torch.cat([head.reshape(lines, whole * block), tail], dim=1).reshape(view.local_shape)


def quantize(value: torch.Tensor, scale: torch.Tensor, view: ParamView, code, block: int = BLOCK) -> torch.Tensor:
    """Codes (uint8, the local shape) of the fp32 local tensor ``value`` given its block maxima,
    with ``code`` (an object with ``encode(y)`` for ``|y| <= 1``: a :class:`DynamicCode`, or a
    4-bit code of :mod:`hfoptim.state.fourbit`) and blocks of ``block`` elements.

    Lines of whole blocks are coded through the ``(blocks, block)`` view; lines ending in a short
    block by parts (:func:`split`); a 0-/1-D shard starting inside a block through the
    zero-padded ``(blocks, block)`` matrix. All three divide each element by its block's scale."""
    y = normalized(value, scale, view, code, block)
    if y is not None:
        return code.encode(y)
    blocks = blocked(value, view, block) / scale.reshape(-1, 1).clamp_min(_TINY)
    return unblocked(code.encode(blocks), view, block)


def normalized(
    value: torch.Tensor, scale: torch.Tensor, view: ParamView, code, block: int = BLOCK
) -> torch.Tensor | None:
    """Each element of ``value`` divided by its block's scale, in the local shape, for lines
    whose first block starts with them (whole blocks, or by parts: :func:`split`); None for a
    0-/1-D shard starting inside a block (:func:`quantize` pads that one). ``code``: the code the
    values are for (:func:`_scaled`)."""
    if aligned(view, block):
        return _scaled(value, scale, view, lambda x, s: x / s.clamp_min(_TINY), code, block)
    if split(view, block):
        return _by_parts(value, scale, view, lambda x, s: x / s.clamp_min(_TINY), block)
    return None


def dequantize(codes: torch.Tensor, scale: torch.Tensor, view: ParamView, code, block: int = BLOCK) -> torch.Tensor:
    """The fp32 values (the local shape) of ``codes`` with their block scales (``code.decode``)."""
    if aligned(view, block):
        return _scaled(code.decode(codes), scale, view, lambda x, s: x * s, code, block)
    if split(view, block):
        return _by_parts(code.decode(codes), scale, view, lambda x, s: x * s, block)
    values = code.decode(blocked(codes, view, block)) * scale.reshape(-1, 1)
    return unblocked(values, view, block)


def fusable_blocks(view: ParamView, block: int = BLOCK) -> bool:
    """Only lines of whole blocks take the compiled path: inductor 2.13 miscompiles the padded
    form of a short last block when its producer is fused into it (tested in
    tests/test_state_compiled.py): tensors coded whole or by parts take the compiled path, a
    shard starting inside a block (held by a sharding backend, never compiled) does not."""
    return aligned(view, block) or split(view, block)


def blocks_whole(view: ParamView, block: int = BLOCK) -> bool:
    """No process boundary of ``view`` (``view.cuts``) falls inside a block: each process holds
    whole blocks and computes their scales alone (rows of 2+-D tensors cut at row boundaries, a
    vector cut at multiples of ``block``)."""
    if len(view.global_shape) >= 2:
        return all((cut % view.row_len) % block == 0 for cut in view.cuts)
    return all(cut % block == 0 for cut in view.cuts)


class Blockwise8bit(Codec):
    """One byte per element and one fp32 scale per 256; see the module docstring."""

    name = "8bit"
    #: the compiled path (hfoptim.core.compiled_step) fuses its decode and encode with the update
    fusable = True
    #: the plain path codes it tensor by tensor (see Codec.coded_per_tensor)
    coded_per_tensor = True

    @staticmethod
    def fusable_for(view: ParamView) -> bool:
        """See :func:`fusable_blocks`."""
        return fusable_blocks(view)

    def row_block(self, view: ParamView) -> int | None:
        """Rows of whole blocks (:func:`aligned`) hold the same blocks seen as rows of one block
        each, and a compiled step then computes their maxima in the loop of its update. Rows of a
        2+-D parameter shorter than a block are one (short) block each already: the block length
        is theirs (a model of hidden size 128, LoRA's B matrices), and their kernel serves every
        parameter of that row length (:func:`~hfoptim.core.compiled_step._rows_free`)."""
        if aligned(view):
            return BLOCK
        if len(view.global_shape) >= 2 and 0 < view.row_len < BLOCK:
            return view.row_len
        return None

    kinds = frozenset({FIRST_MOMENT, SECOND_MOMENT})
    #: a block never crosses a row of a 2+-D tensor: rows are coded on their own
    offset_free = True

    def shard_local(self, slot, view):
        """Blocks no process boundary cuts (:func:`blocks_whole`) are scaled from the shard alone."""
        return blocks_whole(view)

    @staticmethod
    def keys(slot: Slot) -> tuple[str, str]:
        return f"{slot.name}.codes", f"{slot.name}.scale"

    def rows(self, slot, stored, view, start, stop):
        codes, scale = self.keys(slot)
        return {codes: stored[codes][start:stop], scale: stored[scale][start:stop]}

    def shapes(self, slot, view, p):
        codes, scale = self.keys(slot)
        return {codes: tuple(view.local_shape), scale: scale_shape(view)}

    def _zeros(self, slot, view, device) -> dict:
        """Zero codes and scales of the local tensor (0 in both codes, see :meth:`init_zeros`)."""
        codes, scale = self.keys(slot)
        return {
            codes: torch.zeros(view.local_shape, dtype=torch.uint8, device=device),
            scale: torch.zeros(scale_shape(view), dtype=torch.float32, device=device),
        }

    def init(self, slot, value, view, *, stats=None):
        stored = self._zeros(slot, view, value.device)
        self.encode(slot, stored, value, view, stats=stats)
        return stored

    def init_zeros(self, slot, p, dtype, view, *, stats=None):
        """Zero codes and zero scales: both codes store 0 as code 0 (``tests/test_state_8bit.py``),
        so the first step of a 100M-parameter model skips an encode pass over its state (1.5-2.5
        s on a 2-core CPU, most of what the first step spends outside compiling)."""
        # the code tables on this device are made here, outside any traced step: made inside the
        # compiled kernel's first trace, their cache would change under dynamo's guard on it and
        # the kernel recompile at the next call (the encode of the old init made them here too)
        code_of(slot).tables(p.device)
        return self._zeros(slot, view, p.device)

    def decode(self, slot, stored, view, dtype, *, stats=None):
        codes, scale = self.keys(slot)
        return dequantize(stored[codes], stored[scale], view, code_of(slot)).to(dtype)

    def encode(self, slot, stored, value, view, *, stats=None):
        self.encode_many(slot, [stored], [value], [view], stats=stats)

    def encode_many(self, slot, stored, values, views, *, stats=None):
        """The block maxima of all the tensors with one ``stats`` call (one collective under
        sharding), then each tensor quantized."""
        codes, scale = self.keys(slot)
        values = [x.to(torch.float32) for x in values]
        maxima = (stats or LocalStats()).block_absmax(values, views, BLOCK)
        code = code_of(slot)
        for s, x, m, v in zip(stored, values, maxima, views):
            s[codes].copy_(quantize(x, m, v, code))
            s[scale].copy_(m.reshape(s[scale].shape))
