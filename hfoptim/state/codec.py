"""How one slot of optimizer state is stored.

A codec turns the fp32 value a rule works on into what is kept between steps and back. The rule
never sees the stored form: the engine calls :meth:`Codec.decode` before the update and
:meth:`Codec.encode` after it. So a storage form changes what is kept BETWEEN steps; within a
step the rule computes its direction from the full updated tensor (bitsandbytes' 8-bit and SMMF's
order). A rule whose paper divides by the stored form of the current step (Adafactor) asks for
it with ``ctx.stored``. Stored tensors live in ``optimizer.state[p]`` under
``"<slot>"`` (dense) or ``"<slot>.<part>"`` (other forms), so torch's ``state_dict`` and
distributed checkpoints carry them like any other state.

Every reduction a codec makes over the tensor (row and column sums of a factored form, the
total of a shared value) goes through ``stats`` (:class:`~hfoptim.core.stats.LocalStats` or the
sharding layer's backend), which the engine passes to :meth:`Codec.init`, :meth:`Codec.decode`
and :meth:`Codec.encode`; a codec that reduces nothing ignores it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..core.rule import SCALAR, STATISTIC, Slot
from ..core.stats import ParamView


class Codec(ABC):
    """Base class of storage forms: the attributes every form declares (the engine, the compiled
    path and the chunking read them, never guess them) and the four methods it implements
    (:meth:`shapes`, :meth:`init`, :meth:`decode`, :meth:`encode`).

    ``elementwise`` and ``offset_free`` are two properties, not one: ``elementwise`` (each element
    stored on its own, independent of its place) implies ``offset_free``, not the reverse. The
    8-bit and 4-bit forms are ``offset_free`` but not ``elementwise`` (one scale per block of a
    row, and 4-bit's rank-1 scales from a row's own maximum and the column maxima of the whole
    tensor: a run of whole rows is coded the same wherever it starts, but a transpose regroups
    the blocks, so the parameter's layout matters); bf16 (rounding noise drawn by flat position)
    and the forms with per-tensor statistics (factored, SMMF, shared) are neither; fp32 is
    both. ``elementwise`` decides whether a parameter's layout can change
    what is stored (:meth:`hfoptim.core.optimizer.RuleOptimizer.layout_free`), ``offset_free`` whether a
    row piece may be coded as a tensor of its own (:mod:`hfoptim.core.chunking`,
    :mod:`hfoptim.core.compiled_step`).
    """

    #: name used in ``state=...`` and in registry names (e.g. "8bit")
    name: ClassVar[str] = ""
    #: slot kinds this form can hold
    kinds: ClassVar[frozenset] = frozenset()
    #: True when ``decode`` returns the stored tensor itself and ``encode`` does nothing
    identity: ClassVar[bool] = False
    #: True when each element is stored on its own (no block, row or tensor statistic): the
    #: parameter's layout then cannot change what is stored
    elementwise: ClassVar[bool] = False
    #: True when what is stored for a run of whole rows of a 2+-D parameter does not depend on
    #: where the run starts (the compiled path may then step a row piece as a tensor of its own)
    offset_free: ClassVar[bool] = False
    #: True when :meth:`decode` and :meth:`encode` trace into the compiled per-parameter kernel
    #: (:mod:`hfoptim.core.compiled_step`) without graph breaks: tensor operations only, no Python
    #: branch on a tensor's value
    fusable: ClassVar[bool] = False
    #: whether ``compile="auto"`` gives this form the compiled kernel for tensors of
    #: :data:`~hfoptim.core.compiled_step.AUTO_MIN_NUMEL` elements or more (``"on"`` does whenever
    #: it is :attr:`fusable`): False for a form whose kernel is slower than its plain path on such
    #: tensors or cannot step them in row pieces within ``chunk_bytes`` (none today; SMMF's was,
    #: until its encode moved after the kernel); smaller tensors follow :attr:`coded_per_tensor`
    auto_compiles: ClassVar[bool] = True
    #: True when ``compile="auto"`` gives this form the kernel for such tensors only where the
    #: kernel steps them as rows of :meth:`row_block` (SMMF: in the parameter's own shape its
    #: kernel indexes the square matrix by division and remainder, scalar loops slower than its
    #: plain path; a rule with a statistic of the rows or the tensor keeps that shape)
    auto_compiles_as_rows: ClassVar[bool] = False
    #: True when the plain path codes this form one tensor at a time with a dozen operations or more
    #: (8-bit, 4-bit, bf16, SMMF), where dense state is stepped by ``foreach`` operations over the
    #: whole bucket: on small tensors such a step is mostly those operations' fixed costs, several
    #: times the call of a compiled kernel, so ``compile="auto"`` gives the kernel to small tensors
    #: of this form when a group holds many of one shape (one compilation serves them all:
    #: :data:`hfoptim.core.compiled_step.AUTO_MIN_SHAPE_COUNT`), or when they share the kernel of
    #: a larger tensor of the group (:func:`hfoptim.core.compiled_step.auto_takes`)
    coded_per_tensor: ClassVar[bool] = False
    #: True when the compiled kernel decodes this form and steps the slot, but leaves the encode
    #: to the plain path's code (:meth:`encode_spent`), run after the kernel on the new value it
    #: leaves in the step's workspace (``compiled_step.Workspace``): an encode made of reductions
    #: over the whole tensor, which inductor's C++ backend compiles into loops far slower than
    #: torch's own (SMMF's row and column sums and sign bits)
    encodes_after_kernel: ClassVar[bool] = False
    #: False when a kernel stepping a tensor as rows of :meth:`row_block` must know its row count
    #: (SMMF: its square matrix is that of the whole tensor's element count), so no kernel traced
    #: for any number of rows (:func:`hfoptim.core.compiled_step._rows_free`) steps it
    any_rows: ClassVar[bool] = True

    def fusable_for(self, view: ParamView) -> bool:
        """Whether the compiled path may fuse this form for a tensor of ``view`` (8-/4-bit state
        needs rows of whole blocks); :attr:`fusable` by default."""
        return self.fusable

    def row_block(self, view: ParamView) -> int | None:
        """The block length ``b`` when what this form stores for a tensor of ``view`` is what it
        stores for the same elements seen as rows of ``b`` (one block per row), and a compiled
        kernel gains from that view (:func:`hfoptim.core.compiled_step.block_rows`); 0 when any
        such view stores the same and gains nothing (an :attr:`elementwise` form); None when
        the view would change what is stored."""
        return 0 if self.elementwise else None

    def rows(self, slot: Slot, stored: dict, view: ParamView, start: int, stop: int) -> dict | None:
        """The stored tensors of rows ``start:stop`` of a 2+-D parameter held whole, as views
        that :meth:`decode` and :meth:`encode` can use for a ``ParamView`` of those rows (writes
        reach the whole tensors); None when this form cannot be cut there (its state mixes rows:
        factored, shared, per-tensor scalars; SMMF only at its :meth:`row_granularity`)."""
        return None

    def finish_rows(self, slot: Slot, stored: dict, view: ParamView, piece: dict) -> None:
        """Copy into ``stored`` (the parameter ``view``'s) what the last written row piece of a
        staged step holds in copies of its own (:meth:`rows`: the 4-bit column maxima). Nothing
        by default: a form's :meth:`rows` are views, their writes reach the whole tensors."""
        return None

    def row_granularity(self, slot: Slot, view: ParamView) -> int:
        """Rows of the 2+-D parameter ``view`` (held whole) that a row piece's start must be a
        multiple of for :meth:`rows` to cut there; 0 when no such cut exists. 1 by default."""
        return 1

    def piece_sums(self, slot: Slot, stored: dict, view: ParamView) -> dict[str, torch.Tensor]:
        """Accumulators that the row pieces of one step of the parameter ``view`` share (added
        to every piece's state): sums over the whole tensor that each piece adds its part to, and
        that :meth:`finish_pieces` turns into stored values after the last piece. None by default
        (an empty dict): each piece's stored values are complete."""
        return {}

    def finish_pieces(self, slot: Slot, stored: dict, sums: dict[str, torch.Tensor]) -> None:
        """Store what the completed :meth:`piece_sums` ``sums`` give, after the last piece (a
        form with piece sums implements it)."""
        if sums:
            raise NotImplementedError(f"{type(self).__name__} has piece sums but does not store them")

    def shard_local(self, slot: Slot, view: ParamView) -> bool:
        """True when what is stored for the shard ``view`` of a parameter (whole rows; process
        boundaries ``view.cuts`` on row boundaries) is computed from the shard alone, with no
        statistic of another process (the compiled path may then step the shard by itself:
        :func:`hfoptim.core.compiled_step.shard_local`), or from the shard alone and then
        summed over the processes (:meth:`shard_sums`). Elementwise forms: always."""
        return self.elementwise

    def shard_staged(self, slot: Slot, view: ParamView) -> bool:
        """True when a shard ``view`` that is not :meth:`shard_local` needs of the other processes
        only sums or maxima of the whole tensor that its encode asks of the statistics backend
        (``sum``, ``norm``, ``dim_absmax``): the compiled path then steps it in stages, the
        statistics completed between kernels (:class:`~hfoptim.core.stats.StagedStats`). False
        by default."""
        return False

    def shard_sums(self, slot: Slot, view: ParamView) -> tuple[str, ...]:
        """The stored tensors of a :meth:`shard_local` shard that its step alone leaves as this
        process's partial sums, complete once summed over the processes of ``view.group`` (one
        all-reduce for all the kernels of a bucket: :mod:`hfoptim.core.compiled_step`). The step
        itself must not read them after writing them. None by default (an empty tuple)."""
        return ()

    @abstractmethod
    def shapes(self, slot: Slot, view: ParamView, p: torch.Tensor) -> dict[str, tuple]:
        """The shape of each stored tensor for ``slot`` of parameter ``p`` (to validate loads)."""
        raise NotImplementedError

    @abstractmethod
    def init(self, slot: Slot, value: torch.Tensor, view: ParamView, *, stats=None) -> dict[str, torch.Tensor]:
        """Stored tensors holding the initial ``value`` (fp32, the parameter's local shape)."""
        raise NotImplementedError

    def init_zeros(self, slot: Slot, p: torch.Tensor, dtype: torch.dtype, view: ParamView, *, stats=None) -> dict:
        """Stored tensors holding zeros, the initial value of a slot without ``init``, for the
        (local) parameter ``p``: :meth:`init` of a zero tensor unless the form knows its zeros
        without computing them (every process of a sharded run takes the same branch)."""
        return self.init(slot, torch.zeros(slot.shape_for(p.shape), dtype=dtype, device=p.device), view, stats=stats)

    @abstractmethod
    def decode(self, slot: Slot, stored: dict, view: ParamView, dtype: torch.dtype, *, stats=None) -> torch.Tensor:
        """The slot's value as a tensor of ``dtype`` in the parameter's local shape."""
        raise NotImplementedError

    @abstractmethod
    def encode(self, slot: Slot, stored: dict, value: torch.Tensor, view: ParamView, *, stats=None) -> None:
        """Store ``value`` (the slot after the update) into ``stored`` in place."""
        raise NotImplementedError

    def encode_spent(self, slot: Slot, stored: dict, value: torch.Tensor, view: ParamView, *, stats=None) -> None:
        """:meth:`encode` of a ``value`` its caller no longer reads, which the form may overwrite
        on the way (the new value a kernel left in a workspace: :attr:`encodes_after_kernel`);
        :meth:`encode` by default."""
        self.encode(slot, stored, value, view, stats=stats)

    def upgrade(self, slot: Slot, stored: dict, view: ParamView, saved_format: int) -> dict:
        """``stored`` (the slot's tensors as a checkpoint of state-dict format ``saved_format``
        held them) as this version stores them (:data:`hfoptim.state.convert.STATE_FORMAT`): a
        new dict, ``stored`` unchanged. The same tensors by default: only a codec whose stored
        layout changed between formats overrides it."""
        return stored

    def export_value(self, slot: Slot, stored: dict, view: ParamView, dtype: torch.dtype, *, stats=None):
        """The slot as a checkpoint carries it when its stored tensors cannot be resharded
        (:mod:`hfoptim.distributed.checkpoint` saves it and calls :meth:`init` with it on load): a
        tensor from which :meth:`init` rebuilds the same stored tensors. :meth:`decode` by default
        (exact for codes whose decode-encode is the identity)."""
        return self.decode(slot, stored, view, dtype, stats=stats)

    # The engine decodes and encodes all the tensors of a bucket that share a codec at once. A
    # codec that reduces over its tensors overrides these to ask ``stats`` once for all of them
    # (the list forms ``stats.sum``, ``row_sums``, ``col_sums``, ...): under sharding that is one
    # collective per call instead of one per tensor.
    def decode_many(self, slot: Slot, stored: list, views: list, dtype: torch.dtype, *, stats=None) -> list:
        """:meth:`decode` of each tensor."""
        return [self.decode(slot, s, v, dtype, stats=stats) for s, v in zip(stored, views)]

    def encode_many(self, slot: Slot, stored: list, values: list, views: list, *, stats=None) -> None:
        """:meth:`encode` of each tensor."""
        for s, x, v in zip(stored, values, views):
            self.encode(slot, s, x, v, stats=stats)


def _by_codec(codecs: list) -> list[tuple]:
    """``(codec, indices)`` for each distinct codec, in order of first appearance (the same
    order on every process of a sharded run: codecs are chosen from global sizes)."""
    groups: list[tuple] = []
    for i, c in enumerate(codecs):
        for codec, index in groups:
            if codec is c:
                index.append(i)
                break
        else:
            groups.append((c, [i]))
    return groups


def decode_all(slot: Slot, codecs: list, stored: list, views: list, dtype: torch.dtype, stats) -> list:
    """Decode each tensor with its codec; each codec once, for all its tensors."""
    out: list = [None] * len(views)
    for codec, index in _by_codec(codecs):
        values = codec.decode_many(slot, [stored[i] for i in index], [views[i] for i in index], dtype, stats=stats)
        for i, value in zip(index, values):
            out[i] = value
    return out


def encode_all(slot: Slot, codecs: list, stored: list, values: list, views: list, stats) -> None:
    """Encode each tensor with its codec; each codec once, for all its tensors."""
    for codec, index in _by_codec(codecs):
        if not codec.identity:
            codec.encode_many(
                slot, [stored[i] for i in index], [values[i] for i in index], [views[i] for i in index], stats=stats
            )


class Dense(Codec):
    """The slot kept as an ordinary tensor of the compute dtype (fp32, or fp64 for fp64 params)."""

    name = "fp32"
    kinds = frozenset({"first_moment", "second_moment", "buffer", SCALAR, STATISTIC})
    identity = True
    elementwise = True
    offset_free = True
    fusable = True

    def rows(self, slot, stored, view, start, stop):
        return None if slot.kind == SCALAR else {slot.name: stored[slot.name][start:stop]}

    def shapes(self, slot, view, p):
        return {slot.name: slot.shape_for(p.shape)}

    def init(self, slot, value, view, *, stats=None):
        return {slot.name: value}

    def decode(self, slot, stored, view, dtype, *, stats=None):
        return stored[slot.name]

    def encode(self, slot, stored, value, view, *, stats=None):
        tensor = stored[slot.name]
        if value is not tensor:
            tensor.copy_(value)


#: storage forms by name; the state issue adds 8-bit, bf16, factored, SMMF and shared forms
CODECS: dict[str, Codec] = {"fp32": Dense()}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown state form {name!r}; available: {', '.join(sorted(CODECS))}") from None
