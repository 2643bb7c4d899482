r"""4-bit state (Li, Chen, Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023,
arXiv 2309.01507), for any rule's first- and second-moment slots.

Each encode rounds every element, divided by its scale, to the NEAREST of 16 levels (ties to the
lower level), and stores the level's index in 4 bits, two per byte (a line's first half in the low
four bits, its second half in the high four: see "Stored" below); each decode multiplies the
level back by the scale:

.. math::
    c_i = \arg\min_k |x_i / s_i - q_k|,\qquad \mathrm{decode}(c, s)_i = q_{c_i}\, s_i

**First moments** (``FIRST_MOMENT`` slots): ``s_i`` the absolute maximum of ``x`` over the block
of 128 elements holding ``i``, and the signed dynamic-exponent levels (:data:`SIGNED4`): a sign,
then a decade ``10^{-e}`` for ``e = 0, 1, 2`` holding ``2^{2-e}`` levels placed at the middles of
equal parts of ``(0.1, 1]`` (the paper's DE mapping, after Dettmers, arXiv 1511.04561, as the
authors' code builds it), plus 0 and +1:

.. math::
    q \in \{0, 1\} \cup \Big\{\pm 10^{-e}\big(0.1 + 0.9\,\tfrac{j + 1/2}{2^{2-e}}\big):
    e = 0, 1, 2;\ j = 0 .. 2^{2-e} - 1\Big\}

Blocks follow the parameter's rows exactly as in the 8-bit form
(:mod:`hfoptim.state.blockwise8bit`, whose helpers run here with blocks of 128): a tensor of two
or more dimensions is the matrix ``(shape[0], prod(shape[1:]))`` and each row is cut into blocks
of 128 (the last one shorter), a 0-/1-D tensor is cut along the vector.

**Second moments** (``SECOND_MOMENT`` slots, never negative): the linear levels WITHOUT zero,
:math:`q_k = k/16,\ k = 1..16` (:data:`LINEAR4`): with a zero level, every small entry of ``v``
would decode to 0 and ``1/\sqrt{v}`` would blow up (the paper's "zero-point problem"), and the
rank-1 normalization of a tensor of ``d >= 2`` dimensions: with :math:`M_k` the maximum of
``|v|`` over every dimension but ``k``,

.. math::
    s_{i_1 \dots i_d} = \min_k M_k[i_k]\qquad(\text{2-D: } \min(\max_j |v_{ij}|, \max_i |v_{ij}|))

which bounds every element (so ``|v / s| <= 1``) and follows row AND column outliers. Vectors are
normalized in blocks of 128, like first moments.

Stored, per slot: ``"<slot>.packed"`` (uint8, two codes per byte: ``(rows, ceil(row_len / 2))``
for 2+-D tensors, ``(ceil(n / 2),)`` for 0-/1-D ones, so a row never shares a byte with the next
one and a shard of whole rows packs on its own; byte ``k`` of a line of ``n`` codes holds code
``k`` in its low four bits and code ``k + ceil(n / 2)`` in its high four, zero past the line's
end), and the scales in fp32: ``"<slot>.scale"``
(block maxima, the 8-bit form's shapes) or, for rank-1 second moments, ``"<slot>.max<k>"`` (the
vector :math:`M_k`; ``max0`` has the local rows). AdamW: ``1/2 + 4/128`` bytes per element for
the first moment, ``1/2 + 4 (rows + cols) / numel`` for the second: about 1.03 bytes per
parameter on a large matrix.

Tensors with fewer than ``state_min_numel`` elements (4096 by default, counted on the WHOLE
parameter) keep fp32 state (:func:`hfoptim.state.resolve.codec_for`). Every maximum is a
statistic of the whole tensor through ``stats`` (``block_absmax``, ``dim_absmax``), which a
sharding backend completes with one MAX all-reduce per call for all the tensors of a bucket: a
process holding a shard computes the same scales, hence the same codes, as one process.

**Compiled path.** Like the 8-bit form, the 4-bit form is ``fusable``
(:mod:`hfoptim.core.compiled_step`): decode, the rule's update and encode (maxima, nearest level,
packing) trace into one kernel per parameter held whole; tests/test_state_compiled.py checks the
compiled encode and decode equal to the eager ones bit for bit, and a compiled AdamW run against
the plain one. Shards of whole rows take it too (FSDP2 rows, ZeRO segments of whole rows, every
process holding rows): first moments and vectors' blocks alone when no boundary cuts a block,
the rank-1 second moment in stages (:meth:`FourBit.shard_staged`; its column maxima completed
over the processes between a recording kernel and the writing one: see
:mod:`hfoptim.core.compiled_step`). A tensor or shard larger than the step's chunk budget is
stepped the same way in row pieces (:mod:`hfoptim.core.chunking`): :meth:`FourBit.rows` gives
each piece views of its rows and a copy of the column maxima to decode with, and
:meth:`FourBit.finish_rows` stores the new ones after the last piece.

**A slow EMA stalls.** Nearest rounding returns an entry to its level unless the step moves it
by half a level spacing (up to 11% of the block maximum for first moments). An EMA that adds
0.5% of the gradient per step or less -- AdEMAMix's slow EMA (``b3 = 0.9999`` by default) -- then
keeps its first values instead of following the gradients: tests/test_state_4bit.py measures
the stored slow EMA uncorrelated with the exact one after 150 steps. Adam's moments keep
moving (``b1 = 0.9`` adds 10% of the gradient per step; the second moment follows a heavy-tailed
``g^2``): 20-30% from their fp32 twin after 150 steps there. ``ademamix_8bit`` keeps the slow
EMA within 10%.

**Differences from the authors' code** (thu-ml/low-bit-optimizers, ``lpmm``, commit
e3e2854728e498c2a606e3fdb88daa27ae94f9a6; tests/test_state_4bit.py transcribes its quantizer):
the levels and the nearest rounding with its tie rule are theirs; the nibble order is not (theirs
holds elements ``2k`` and ``2k + 1`` in byte ``k``, low four bits first: under torch.compile an
element's byte ``j // 2`` and shift ``4 (j mod 2)`` are indices inductor cannot vectorize, three
scalar loops per step, where the two halves of a line are two contiguous slices; checkpoints of
format 1, which held theirs, are converted on load, :func:`planar_from_interleaved`); first-moment
blocks follow rows (theirs cut the flattened tensor: the same blocks when the row length is a
multiple of 128, as in transformers); fp32 is kept for tensors below ``state_min_numel`` elements
(theirs: up to 4096 elements included); the rule's update runs on the decoded fp32 state and
the state is quantized after it (theirs too). torchao's ``AdamW4bit`` quantizes both moments in
flat blocks of 128 (no rank-1 normalization).
"""

from __future__ import annotations

import math

import torch

from ..core.rule import FIRST_MOMENT, SECOND_MOMENT, Slot
from ..core.stats import LocalStats, ParamView, block_layout
from ..core.tracing import is_traced, kept_constant, table_lookup
from .blockwise8bit import blocks_whole, dequantize, fusable_blocks, normalized, quantize, scale_shape
from .codec import Codec

#: elements per block of 4-bit first moments (and of 0-/1-D second moments)
BLOCK4 = 128

_TINY = torch.finfo(torch.float32).tiny


class Code4:
    """A 4-bit code: 16 increasing fp32 levels; nearest encoding, table decoding.

    ``spacing``: levels ``spacing * (k + 1)`` (``k = 0 .. 15``) exactly, with ``spacing`` a power
    of two; under torch.compile such a code decodes by that arithmetic instead of a table read
    (inductor reads a table through int64 index vectors and a gather: the rank-1 second moment's
    three decodes per step made a compiled 1024x768 ``adamw_4bit`` step 1.7x slower, 16 against
    9 ms on one Intel Xeon core) and encodes by counting the midpoints ``(k + 3/2) spacing``
    below ``y`` in closed form, ``clamp(ceil(y / spacing - 3/2), 0, 15)`` (7.7 against 9.5 ms):
    exact, since ``y / spacing`` is (a power of two) and so is its difference with 3/2 wherever
    it can reach a midpoint (``y / spacing >= 3/4``), a value on a midpoint counting it as not
    below, as the comparisons do."""

    #: a traced step scales its blocks per element (blockwise8bit._scaled: measured faster)
    traced_by_block_rows = False

    def __init__(self, name: str, levels: torch.Tensor, spacing: float | None = None):
        self.name = name
        self.table = levels.to(torch.float32)
        if self.table.numel() != 16 or not bool((self.table.diff() > 0).all()):
            raise AssertionError(f"{name}: a 4-bit code has 16 increasing levels")
        if spacing is not None and (
            math.frexp(spacing)[0] != 0.5
            or not torch.equal(self.table, torch.arange(1, 17, dtype=torch.float32) * spacing)
        ):
            raise AssertionError(f"{name}: the levels are not {spacing} (k + 1) with a power-of-two spacing")
        self.spacing = spacing
        # the midpoints as the authors' kernel forms them, (a + b) * 0.5 in fp32
        self.midpoints = (self.table[1:] + self.table[:-1]) * 0.5
        self._cache: dict = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, midpoints)`` on ``device``."""
        return kept_constant(self._cache, str(device), lambda: (self.table.to(device), self.midpoints.to(device)))

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Index (uint8, 0..15) of the nearest level of each element of ``y``: the number of
        midpoints strictly below it, so a value on a midpoint takes the lower level."""
        _, midpoints = self.tables(y.device)
        if is_traced():
            # bucketize has no inductor lowering on CPU (a library call and a full-size buffer per
            # step); fifteen comparisons count the same midpoints and fuse into the kernel's loop.
            # They are counted in fp32 and converted once: torch 2.13's CPU vectors turn a mask
            # into uint8 element by element (a store and a scalar loop per comparison; 110 against
            # 16 ms for a compiled 1024x768 adamw_4bit step on one Intel Xeon core)
            if self.spacing is not None:
                return torch.ceil(y * (1.0 / self.spacing) - 1.5).clamp(0.0, 15.0).to(torch.uint8)
            codes = (y > midpoints[0]).to(torch.float32)
            for k in range(1, midpoints.numel()):
                codes = codes + (y > midpoints[k]).to(torch.float32)
            return codes.to(torch.uint8)
        return torch.bucketize(y, midpoints).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The levels (fp32) of ``codes`` (uint8, 0..15, any shape)."""
        table, _ = self.tables(codes.device)
        if is_traced():
            if self.spacing is not None:
                return (codes.to(torch.float32) + 1.0) * self.spacing
        return table_lookup(table, codes)


def dynamic_exponent_levels() -> torch.Tensor:
    """The signed dynamic-exponent levels over 4 bits (module docstring), increasing, evaluated
    in fp32 the way the authors' code evaluates them (``0.1 + 0.9 (j + 1/2) / 2^k`` as the mean of
    two fp32 ends of ``linspace(0.1, 1, 2^k + 1)``, then times ``10^-e``), so every level is
    theirs to the bit (in exact arithmetic two of them would round one unit lower)."""
    positive = []
    for e in range(3):
        ends = torch.linspace(0.1, 1.0, 2 ** (2 - e) + 1, dtype=torch.float32)
        positive.append(10.0**-e * ((ends[:-1] + ends[1:]) / 2.0))
    positive = torch.cat(positive)
    levels = torch.cat([positive, -positive, torch.tensor([0.0, 1.0])])
    return levels.sort().values


#: first moments: signed dynamic exponent (0 and +1 included, no -1)
SIGNED4 = Code4("dynamic exponent (signed, 4-bit)", dynamic_exponent_levels())
#: second moments: linear without zero, k/16 for k = 1..16
LINEAR4 = Code4("linear without zero (4-bit)", torch.arange(1, 17, dtype=torch.float32) / 16, spacing=1 / 16)


#: SIGNED4 with its lowest level read as -1: what a checkpoint carries (:meth:`FourBit.export_value`)
SIGNED4_EXPORT = Code4(
    "dynamic exponent, lowest level at -1 (export)", torch.cat([torch.tensor([-1.0]), SIGNED4.table[1:]])
)


def code_of(slot: Slot) -> Code4:
    return SIGNED4 if slot.kind == FIRST_MOMENT else LINEAR4


# ----------------------------------------------------------------------------------- packing
def packed_shape(view: ParamView) -> tuple[int, ...]:
    """Shape of the packed codes of the local tensor: ``(rows, ceil(row_len / 2))`` for 2+-D
    tensors, ``(ceil(n / 2),)`` otherwise."""
    lines, length, _ = block_layout(view, 1)
    if len(view.global_shape) >= 2:
        return (lines, -(-length // 2))
    return (-(-length // 2),)


def pack(codes: torch.Tensor, view: ParamView) -> torch.Tensor:
    """Two codes (uint8, 0..15, the local shape) per byte, along each line of ``n`` codes: code
    ``k`` in the low four bits of byte ``k``, code ``k + ceil(n / 2)`` in its high four; an odd
    line's last byte has a zero high half. Two contiguous halves, so inductor vectorizes the
    packing and :func:`unpack` inside a fused step."""
    return _pack_halves(codes, view, lambda half: half)


def _pack_halves(x: torch.Tensor, view: ParamView, codes_of) -> torch.Tensor:
    """The bytes of :func:`pack` from ``codes_of`` applied to each half of every line of ``x``
    (the local tensor)."""
    lines, length, _ = block_layout(view, 1)
    x = x.reshape(lines, length)
    half = -(-length // 2)
    low, high = codes_of(x[:, :half]), codes_of(x[:, half:])
    if length % 2:
        high = torch.cat([high, torch.zeros_like(low[:, :1])], dim=1)
    return (low | (high << 4)).reshape(packed_shape(view))


def unpack(packed: torch.Tensor, view: ParamView) -> torch.Tensor:
    """Inverse of :func:`pack`: the codes (uint8) in the local shape."""
    lines, length, _ = block_layout(view, 1)
    x = packed.reshape(lines, -(-length // 2))
    if is_traced():
        # each byte read once per half through a (lines, 2, half) view: inductor fuses it into
        # the step's loops (a concatenation of the halves is a library call writing a full-size
        # buffer, 1 byte per element and slot)
        shift = torch.tensor([0, 4], dtype=torch.uint8, device=x.device).view(1, 2, 1)
        both = ((x.unsqueeze(1) >> shift) & 15).reshape(lines, 2 * x.shape[1])
    else:
        both = torch.cat([x & 15, x >> 4], dim=1)
    if both.shape[1] != length:
        both = both[:, :length]
    return both.reshape(view.local_shape)


def encode_packed(code: Code4, y: torch.Tensor, view: ParamView) -> torch.Tensor:
    """``pack(code.encode(y), view)``. Inside a fused step each half of a line is encoded apart,
    so the codes go straight into their bytes (encoding the whole tensor first made inductor keep
    the comparisons' fp32 count in a full-size buffer, 4 bytes per element, between the loop
    that computes it and the packing loop); eagerly the whole tensor is encoded at once (one
    ``bucketize``, which would copy each strided half)."""
    if not is_traced():
        return pack(code.encode(y), view)
    return _pack_halves(y, view, code.encode)


def planar_from_interleaved(packed: torch.Tensor, view: ParamView) -> torch.Tensor:
    """Codes packed in the order of checkpoint format 1 (and of the authors' code: elements
    ``2k`` and ``2k + 1`` of a line in byte ``k``, low four bits first) packed again as
    :func:`pack` does: a lossless reordering of the same codes."""
    lines, length, _ = block_layout(view, 1)
    x = packed.reshape(lines, -(-length // 2))
    codes = torch.stack([x & 15, x >> 4], dim=2).reshape(lines, 2 * x.shape[1])[:, :length]
    return pack(codes.reshape(view.local_shape), view)


# ----------------------------------------------------------------------------------- rank-1
def rank1(view: ParamView) -> bool:
    """Whether a second moment of this parameter takes the rank-1 normalization (2+-D)."""
    return len(view.global_shape) >= 2


def rank1_scale(maxima: list[torch.Tensor], view: ParamView) -> torch.Tensor:
    """``min_k M_k[i_k]`` in the local shape, from the per-dimension maxima (broadcast)."""
    dims = len(view.local_shape)
    scale = None
    for k, m in enumerate(maxima):
        shape = [1] * dims
        shape[k] = m.numel()
        m = m.reshape(shape)
        scale = m if scale is None else torch.minimum(scale, m)
    return scale.expand(view.local_shape)


class FourBit(Codec):
    """Two 4-bit codes per byte and fp32 scales; see the module docstring."""

    name = "4bit"
    kinds = frozenset({FIRST_MOMENT, SECOND_MOMENT})
    #: blocks follow rows and a row's rank-1 scale is its own maximum against the column maxima
    #: of the whole tensor (an input of a piece's step, not a property of its place): a run of
    #: whole rows is coded the same wherever it starts
    offset_free = True
    #: the compiled path (hfoptim.core.compiled_step) fuses its decode and encode with the update
    fusable = True
    #: the plain path codes it tensor by tensor (see Codec.coded_per_tensor)
    coded_per_tensor = True

    @staticmethod
    def fusable_for(view: ParamView) -> bool:
        """Rows of whole 128-blocks, or ending in one short block (as the 8-bit form: see
        :func:`hfoptim.state.blockwise8bit.fusable_blocks`); the rank-1 scales fuse always."""
        return fusable_blocks(view, BLOCK4)

    def shard_local(self, slot, view):
        """Blockwise scales of blocks no process boundary cuts come from the shard alone; the
        rank-1 scales of a second moment span every row (a statistic of other processes)."""
        if self._blockwise(slot, view):
            return blocks_whole(view, BLOCK4)
        return not view.sharded

    def shard_staged(self, slot, view):
        """The rank-1 scales of a second moment: the maxima along the rows are the shard's own
        (whole rows), those along the other dimensions a MAX over the processes
        (``dim_absmax``), completed between the kernels of a staged step."""
        return not self._blockwise(slot, view)

    @staticmethod
    def packed_key(slot: Slot) -> str:
        return f"{slot.name}.packed"

    @staticmethod
    def _blockwise(slot: Slot, view: ParamView) -> bool:
        return slot.kind == FIRST_MOMENT or not rank1(view)

    def scale_keys(self, slot: Slot, view: ParamView) -> dict[str, tuple]:
        """The scale tensors of ``slot`` and their shapes."""
        if self._blockwise(slot, view):
            return {f"{slot.name}.scale": scale_shape(view, BLOCK4)}
        shape = view.local_shape
        return {f"{slot.name}.max{k}": (size,) for k, size in enumerate(shape)}

    def shapes(self, slot, view, p):
        return {self.packed_key(slot): packed_shape(view), **self.scale_keys(slot, view)}

    def rows(self, slot, stored, view, start, stop):
        """Rows ``start:stop`` of a 2+-D parameter: views of their packed codes and of their
        block scales or row maxima (``max0``); the maxima along the other dimensions of a rank-1
        second moment are statistics of every row, so each piece gets a COPY of them: it decodes
        with the old maxima while its writing step stores the new ones, which
        :meth:`finish_rows` copies into the stored tensors once every piece is written (the
        pieces' step runs in stages, :mod:`hfoptim.core.chunking`)."""
        packed = self.packed_key(slot)
        out = {packed: stored[packed][start:stop]}
        keys = list(self.scale_keys(slot, view))
        out[keys[0]] = stored[keys[0]][start:stop]
        for key in keys[1:]:
            out[key] = stored[key].clone()
        return out

    def finish_rows(self, slot, stored, view, piece):
        """Store the maxima of the whole tensor that the last written row piece ``piece`` (of
        :meth:`rows`) holds: every piece stored the same completed values in its copy."""
        for key in list(self.scale_keys(slot, view))[1:]:
            stored[key].copy_(piece[key])

    def init(self, slot, value, view, *, stats=None):
        device = value.device
        stored = {self.packed_key(slot): torch.zeros(packed_shape(view), dtype=torch.uint8, device=device)}
        for key, shape in self.scale_keys(slot, view).items():
            stored[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        if device.type != "meta":  # memory estimates: shapes only
            self.encode(slot, stored, value, view, stats=stats)
        return stored

    def decode(self, slot, stored, view, dtype, *, stats=None):
        codes = unpack(stored[self.packed_key(slot)], view)
        code = code_of(slot)
        if self._blockwise(slot, view):
            value = dequantize(codes, stored[f"{slot.name}.scale"], view, code, BLOCK4)
        else:
            maxima = [stored[key] for key in self.scale_keys(slot, view)]
            value = code.decode(codes) * rank1_scale(maxima, view)
        return value.to(dtype)

    def upgrade(self, slot, stored, view, saved_format):
        """Format 1 packed a line's elements ``2k`` and ``2k + 1`` in byte ``k``: reordered
        (:func:`planar_from_interleaved`); the scales are unchanged."""
        key = self.packed_key(slot)
        if saved_format >= 2 or key not in stored:
            return stored
        return {**stored, key: planar_from_interleaved(stored[key], view)}

    def export_value(self, slot, stored, view, dtype, *, stats=None):
        """:meth:`decode`, except that a first moment's lowest level is read as -1 instead of
        -0.8875: a block whose largest magnitude is negative then gives back its scale, and
        :meth:`init` the same scales and codes (a block's maximum is always coded as +1 or as
        the lowest level; every other level ``q`` comes back as ``q s / s``, far from a
        midpoint). With the plain decode, such a block's scale would shrink to 0.8875 of
        itself at every resharded checkpoint."""
        if slot.kind != FIRST_MOMENT:
            return self.decode(slot, stored, view, dtype, stats=stats)
        codes = unpack(stored[self.packed_key(slot)], view)
        return dequantize(codes, stored[f"{slot.name}.scale"], view, SIGNED4_EXPORT, BLOCK4).to(dtype)

    def encode(self, slot, stored, value, view, *, stats=None):
        self.encode_many(slot, [stored], [value], [view], stats=stats)

    def encode_many(self, slot, stored, values, views, *, stats=None):
        """All the tensors' maxima with one ``stats`` call per kind of scale (one collective each
        under sharding), then each tensor quantized and packed."""
        stats = stats or LocalStats()
        values = [x.to(torch.float32) for x in values]
        blockwise = [i for i, v in enumerate(views) if self._blockwise(slot, v)]
        ranked = [i for i, v in enumerate(views) if not self._blockwise(slot, v)]
        code = code_of(slot)
        if blockwise:
            maxima = stats.block_absmax([values[i] for i in blockwise], [views[i] for i in blockwise], BLOCK4)
            for i, m in zip(blockwise, maxima):
                y = normalized(values[i], m, views[i], code, BLOCK4)
                if y is None:  # a vector's shard starting inside a block: zero-padded blocks
                    packed = pack(quantize(values[i], m, views[i], code, BLOCK4), views[i])
                else:
                    packed = encode_packed(code, y, views[i])
                stored[i][self.packed_key(slot)].copy_(packed)
                scale = stored[i][f"{slot.name}.scale"]
                scale.copy_(m.reshape(scale.shape))
        if ranked:
            per_dim = stats.dim_absmax([values[i] for i in ranked], [views[i] for i in ranked])
            for i, maxima in zip(ranked, per_dim):
                view = views[i]
                y = values[i] / rank1_scale(maxima, view).clamp_min(_TINY)
                stored[i][self.packed_key(slot)].copy_(encode_packed(code, y, view))
                for key, m in zip(self.scale_keys(slot, view), maxima):
                    stored[i][key].copy_(m)
