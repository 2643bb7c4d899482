"""Bounded step memory: which tensors the engine steps together, and large ones in row pieces.

A step's temporaries grow with what one call processes: the decoded state and the update of
every tensor of a ``foreach`` bucket, a few times over (the plain 8-bit path holds up to ~48 bytes
per element at its peak). The group option ``chunk_bytes`` (0: no bound; None, the default: 64 MiB
on a CPU, 1 GiB on a GPU, :data:`DEFAULT_GPU_CHUNK_BYTES`) caps that: a call processes at most
``chunk_bytes / TRANSIENT_BYTES_PER_ELEMENT`` elements. A tensor that the compiled kernel steps
in rows of one block (8-bit state on a CPU) counts for the bytes per element its kernel holds
instead (:func:`~hfoptim.core.compiled_step.block_rows_bytes`: one, plus fp32 copies of a bf16
parameter and gradient), so it is cut only past ``chunk_bytes`` of those: in pieces of a
million elements the 100M set's 8-bit step made 125 kernel calls instead of 71, each costing
0.2-0.45 ms besides the kernel, and ``ademamix_8bit`` stepped the 32000x768 tensor in 79.0 ms
against 64.5 whole (2-core AMD EPYC with AVX-512, interleaved in one process; BENCHMARKS.md,
AVX-512 layouts: over 2x torch AdamW in four rows of the 100M set before, none after).

* Tensors are grouped, in order, into chunks of at most that many elements (global sizes, so
  every process of a sharded run cuts the same chunks; the statistics' collectives match; a
  parameter that one of N processes holds whole counts N times its size: :func:`call_numel`).
* A larger tensor of 2+ dims held whole by this process is stepped in pieces of whole rows (an
  8-bit block never crosses a row, so blocks stay whole) when the result cannot tell: the rule is
  ``elementwise``, every enabled modifier ``row_local``, and every state slot's storage form can
  be cut into rows (:meth:`~hfoptim.state.codec.Codec.rows`: dense, 8-bit, bf16). A piece is a
  :class:`~hfoptim.core.layout.Unit` whose tensors are views of the parameter's rows, its
  gradient's and its state's (all writes reach the whole tensors), with the view of those rows
  (``row_start``, ``local_rows``) and :class:`~hfoptim.core.stats.PieceStats`, which refuses any
  statistic of the whole tensor. The numbers are exactly those of the unchunked step.
* A shard of a sharded run (FSDP2 rows, a ZeRO segment of whole rows) is cut the same way, in
  pieces of ``1/N`` of the call limit for a parameter ``N`` processes share (:func:`piece_numel`), when
  its step needs nothing of another process but sums (:func:`~hfoptim.core.compiled_step.shard_local`:
  the same gates, plus process boundaries on row boundaries and blocks no boundary cuts) and
  its storage forms can be cut at its rows: the decision reads only what every process shares
  (options, global shape, boundaries), so every process takes the same parameters out of the
  chunks below and the statistics' collectives of the others still match. Without it, the
  compiled kernel of a 16000x768 FSDP2 shard of adamw_8bit materialized its new fp32 moments
  whole (8 bytes per element; the plain path about 50). A shard that the kernel steps whole and
  whose forms are not ``offset_free`` (bf16 with ``compile`` on) keeps the kernel instead.
* A ZeRO segment that a process boundary cuts inside a row at one end (:func:`cut_row_parts`) is
  stepped as its partial row, on the plain path with the layout's statistics (the cut row and
  block completed over the processes), and its whole rows, a row piece for the compiled kernel
  (in pieces of :func:`piece_numel`): before, one partial row sent the whole segment to the plain path.
* SMMF state (a rank-1 factorization of the whole tensor seen as a square matrix) is cut where
  its matrix's rows and its sign bytes are cut too
  (:meth:`~hfoptim.state.codec.Codec.row_granularity`): each piece decodes with the stored
  factors, stores its own rows of ``r`` and sign bits, and adds its column sums to an
  accumulator the pieces share (:meth:`~hfoptim.state.codec.Codec.piece_sums`); ``c`` is stored
  from it after the last piece. The same numbers up to the order of the column sums' additions.
  A shard whose process boundaries end rows of the square matrix (every FSDP2 matrix of the
  100M set on 2 processes; a parameter one ZeRO process owns whole) is cut the same way; its
  pieces' column sums are this process's part, completed by one all-reduce per bucket after its
  calls (:class:`ShardSums`; an empty shard sends zeros), then ``c`` is stored. Such a shard
  within the budget is stepped as one piece of itself (:func:`_sums_by_pieces`), so its sums
  join the same all-reduce instead of two collectives per slot and call.
* 4-bit state is coded with the column maxima of the whole NEW second moment (its rank-1
  scales), which no piece has before every piece has stepped. A tensor or a shard of whole rows
  over the budget that the compiled kernel takes is cut all the same, and its pieces are stepped
  in stages (:func:`staged_pieces`, :class:`~hfoptim.core.stats.StagedPieceStats`): each
  piece's recording kernel returns its part of those maxima, the parts are combined over the
  pieces (and completed over the processes for a shard: one all-reduce per parameter, an empty
  shard sending zeros), then each piece's writing kernel codes its rows with them. The pieces
  decode with copies of the old maxima (:meth:`~hfoptim.state.codec.Codec.rows`), stored after
  the last piece (:meth:`~hfoptim.state.codec.Codec.finish_rows`). The numbers are those of the
  uncut kernel, bit for bit; the cost is a second pass (the recording kernel decodes and updates
  the second moment once more). On the plain path such a tensor stays whole.
* Not cut: tensors whose rule or modifiers need whole-tensor statistics (Adafactor's update
  clipping, LAMB's trust ratio, the cautious mask's mean, ...), factored/shared state, SMMF
  shards whose boundaries cut a row of the square matrix, 1-D tensors, other shards (their
  chunks are still bounded by grouping), and bf16 state on the compiled path (its rounding bits
  depend on the element's global index, which the compiled kernel of a piece does not take as
  an input; the fused kernel's temporaries are a fraction of the plain path's).
"""

from __future__ import annotations

import math

import torch

from ..modifiers import MODIFIERS
from ..state import resolve
from . import compiled_step
from .layout import Unit
from .stats import LocalStats, ParamView, PieceStats, StagedPieceStats

#: an upper bound of the step's temporary bytes per element processed (the plain 8-bit path,
#: the most, measured ~48)
TRANSIENT_BYTES_PER_ELEMENT = 64
#: units of at least ``1 / LARGE_SHARE`` of a call's elements are asked whether the compiled kernel
#: steps them with fewer temporaries (:func:`~hfoptim.core.compiled_step.block_rows_bytes`: one
#: call of a large tensor instead of pieces); smaller ones count as the plain path's, which
#: changes only how many of them share a call, and costs no question (about 10 us a unit: 2 ms
#: of a LoRA set's step of 224 adapters)
LARGE_SHARE = 8
#: ``chunk_bytes`` when the option is None (its default) and the parameters are on a CPU
DEFAULT_CHUNK_BYTES = 64 << 20
#: ``chunk_bytes`` when the option is None and the parameters are on a GPU (any device but the
#: CPU). Each call costs the host about 0.25-0.4 ms there (dynamo's and AOT's wrappers and the
#: engine's Python per unit) whatever its size, against about 2 ms for the whole compiled 8-bit
#: step of a 32000x4096 tensor; the compiled step's temporaries are 8-12 bytes per element, not
#: the 64 of the bound. Measured on an H200 (torch 2.11), adamw_8bit on one 32000x4096 tensor:
#: 64 MiB -> 125 calls and 48 ms a step, 512 MiB -> 16 calls and 6.1 ms, 4 GiB -> 2 calls and
#: 2.8 ms, unbounded 2.1 ms (8 bytes per element of temporaries); torch AdamW foreach 3.0 ms
DEFAULT_GPU_CHUNK_BYTES = 1 << 30


def chunk_numel(group: dict, device: torch.device | None = None) -> int | None:
    """Elements one call may process under ``group``'s ``chunk_bytes`` (None: no bound) for
    parameters on ``device`` (the default budget depends on it)."""
    budget = group.get("chunk_bytes")
    if budget is None:
        on_cpu = device is None or torch.device(device).type == "cpu"
        budget = DEFAULT_CHUNK_BYTES if on_cpu else DEFAULT_GPU_CHUNK_BYTES
    return max(1, budget // TRANSIENT_BYTES_PER_ELEMENT) if budget else None


def piece_numel(limit: int, view: ParamView) -> int:
    """Elements of this process in one row piece of the parameter of ``view`` under the call limit
    ``limit`` (:func:`chunk_numel`): ``limit`` for a tensor held whole, ``limit / N`` for a shard
    of a parameter that ``N`` processes share. The budget is that of the model's step, which the
    N processes share, as for the calls of whole shards (grouped by global sizes, so each holds
    about ``limit / N`` elements here): a process holds ``1/N`` of the state, and its step's
    temporaries shrink with it (FSDP2 and ZeRO-2 on 2 processes, 100M set, adamw_8bit: 0.7-1.1
    bytes per local parameter with ``limit``, 0.4-0.7 with ``limit / 2``, at the same step time)."""
    if not view.sharded:
        return limit
    import torch.distributed as dist

    return max(1, limit // dist.get_world_size(view.group))


def call_numel(view: ParamView) -> int:
    """What the parameter of ``view`` counts for against a call's limit: its global size, the
    same on every process, so all cut the same calls; N times it when one of the N processes
    holds it whole (a shard with no process boundary inside: a parameter of one ZeRO
    partition), so that such parameters fill a call of that process with at most ``limit / N``
    elements, as the shards of parameters the N processes share do (each holds about ``1/N`` of
    a call's global elements). Counted by global size alone, a ZeRO-2 process held calls of up
    to ``limit`` elements of its own parameters: 1.1 bytes of temporaries per parameter for
    adamw_smmf on the 100M set on 2 processes, over its share of the budget."""
    if not view.sharded or view.cuts:
        return view.global_numel
    import torch.distributed as dist

    return view.global_numel * dist.get_world_size(view.group)


def cuttable(engine, group: dict, unit: Unit) -> bool:
    """Whether ``unit`` may be stepped in row pieces (see the module docstring)."""
    p, view = unit.param, unit.view
    if unit.writeback is not None or view.sharded:
        return False
    if p.dim() < 2 or view.local_rows is not None:
        return False
    codecs = _row_codecs(engine, group, unit)
    if codecs is None:
        return False
    # the compiled path steps a piece as rows from 0: a form whose stored values depend on the
    # rows' place (bf16's rounding bits) keeps the tensor whole there rather than lose the kernel
    return all(codec.offset_free for codec in codecs) or not compiled_step.takes(
        engine, group, unit, engine.layout.stats
    )


def shard_cuttable(engine, group: dict, unit: Unit) -> bool:
    """Whether the shard ``unit`` may be stepped in row pieces (see the module docstring); the
    same answer on every process, an empty shard included: it reads the options, the global
    shape and the process boundaries only."""
    view = unit.view
    if not view.sharded or unit.canonical or len(view.global_shape) < 2:
        return False
    slots = engine.rule.active_slots(group)
    codecs = [resolve.codec_for(engine.rule, slot, group, view) for slot in slots]
    if not compiled_step.shard_local(engine, group, view, slots, codecs):
        return False
    step = granularity(engine, group, unit)
    first = min(step, view.rows)
    if not step or any(c.rows(s, unit.state, view, 0, first) is None for s, c in zip(slots, codecs)):
        return False
    # as for a tensor held whole: a form whose stored values depend on the rows' place keeps a
    # shard that the kernel takes whole (its pieces would lose it)
    return all(c.offset_free for c in codecs) or not compiled_step.takes(engine, group, unit, engine.layout.stats)


class ShardSums:
    """The sums over a whole tensor that the row pieces of a bucket's SHARDS leave as this
    process's parts (:meth:`~hfoptim.state.codec.Codec.piece_sums`: SMMF's column sums),
    completed by one all-reduce per process group after the bucket's calls and then stored
    (:meth:`~hfoptim.state.codec.Codec.finish_pieces`). Every process registers the same
    parameters in the same order (:func:`shard_cuttable` reads only what they share); an empty
    shard registers its zeros."""

    def __init__(self) -> None:
        self._pending: list[tuple] = []  # (codec, slot, stored, sums, view)

    def add(self, codec, slot, stored: dict, sums: dict, view: ParamView) -> None:
        self._pending.append((codec, slot, stored, sums, view))

    def complete(self, stats) -> None:
        """Sum every registered part over its processes, then store what the sums give."""
        compiled_step.complete_sums(
            stats, [(tensor, view) for _, _, _, sums, view in self._pending for tensor in sums.values()]
        )
        for codec, slot, stored, sums, _ in self._pending:
            codec.finish_pieces(slot, stored, sums)
        self._pending.clear()


def rows_per_piece(rows: int, row_len: int, limit: int, granularity: int = 1) -> int:
    """Rows of each piece of a ``rows x row_len`` tensor for pieces of at most ``limit``
    elements (``granularity`` rows at least, and a multiple of it: where the storage forms can
    be cut, :meth:`~hfoptim.state.codec.Codec.row_granularity`); equal pieces when a few more
    pieces make them equal (one compiled kernel per tensor shape instead of two)."""
    most = max(1, limit // row_len // granularity) * granularity
    count = -(-rows // most)
    for n in range(count, 2 * count + 1):
        if rows % n == 0 and (rows // n) % granularity == 0:
            return rows // n
    return -(-rows // count // granularity) * granularity


def _piece_rows(engine, group: dict, unit: Unit, limit: int) -> int:
    """Rows of each row piece of ``unit`` under the call limit ``limit``: this process's share
    (:func:`piece_numel`), a multiple of its forms' :func:`granularity` (1 for an empty shard)."""
    if not unit.view.rows:
        return 1
    most = piece_numel(limit, unit.view)
    return rows_per_piece(unit.view.rows, unit.view.row_len, most, granularity(engine, group, unit))


def granularity(engine, group: dict, unit: Unit) -> int:
    """The rows a piece of ``unit`` must be a multiple of: the least common multiple of its
    storage forms' :meth:`~hfoptim.state.codec.Codec.row_granularity` (0: it cannot be cut)."""
    step = 1
    for slot in engine.rule.active_slots(group):
        codec = resolve.codec_for(engine.rule, slot, group, unit.view)
        step = math.lcm(step, codec.row_granularity(slot, unit.view))
    return step


def pieces(engine, group: dict, unit: Unit, rows: int, shard_sums: ShardSums | None = None) -> list[Unit]:
    """``unit`` as pieces of ``rows`` rows (the last may be shorter; none for an empty shard).
    Sums over the whole tensor that the storage forms complete from the pieces
    (:meth:`~hfoptim.state.codec.Codec.piece_sums`, SMMF's column sums) are shared by the pieces'
    states and stored after the last piece (its write-back, run after its plain step); a shard's
    go to ``shard_sums``, which completes them over the processes after the bucket."""
    end = unit.view.rows
    out = [_rows_of(engine, group, unit, start, min(start + rows, end)) for start in range(0, end, rows)]
    finish = []
    for slot in engine.rule.active_slots(group):
        codec = resolve.codec_for(engine.rule, slot, group, unit.view)
        sums = codec.piece_sums(slot, unit.state, unit.view)
        if not sums:
            continue
        for piece in out:
            piece.state.update(sums)
        if unit.view.sharded:
            if shard_sums is None:
                raise RuntimeError("hfoptim internal error: a shard's row pieces need a ShardSums to complete")
            shard_sums.add(codec, slot, unit.state, sums, unit.view)
        else:
            finish.append((codec, slot, sums))
    if finish:
        out[-1].writeback = StoreSums(finish, unit.state)
    return out


class StoreSums:
    """The last row piece's write-back when the storage forms complete sums over the pieces
    (:meth:`~hfoptim.state.codec.Codec.finish_pieces`: SMMF's column factor). It reads and
    writes the state only, not the piece's parameter, so it runs after the piece's step on
    either path: the compiled kernel steps that piece too (:attr:`state_only`)."""

    #: a write-back of the state alone (see :func:`~hfoptim.core.compiled_step._eligible`)
    state_only = True

    def __init__(self, finish: list[tuple], state: dict):
        self.finish, self.state = finish, state

    def __call__(self) -> None:
        for codec, slot, sums in self.finish:
            codec.finish_pieces(slot, self.state, sums)


def _rows_of(engine, group: dict, unit: Unit, start: int, stop: int, sharding: dict | None = None) -> Unit:
    """Local rows ``start:stop`` of ``unit`` as a unit of their own: views of its parameter's,
    gradient's and state's rows, at their global rows; ``sharding`` (``valid``, ``cuts``,
    ``group``) for a piece that stays a shard, else a piece no process shares."""
    slots = engine.rule.active_slots(group)
    state = {"step": unit.state["step"]}
    for slot in slots:
        codec = resolve.codec_for(engine.rule, slot, group, unit.view)
        state.update(codec.rows(slot, unit.state, unit.view, start, stop))
    row_start = unit.view.row_start + start  # a shard's pieces keep their global rows
    view = ParamView(
        global_shape=unit.view.global_shape, row_start=row_start, local_rows=stop - start, **(sharding or {})
    )
    return Unit(unit.param[start:stop], unit.grad[start:stop], state, view, unit.owner)


def cut_row_parts(engine, group: dict, unit: Unit) -> tuple[Unit, Unit] | None:
    """A ZeRO segment that a process boundary cuts inside a row at ONE of its ends (the padded
    working copy of :mod:`hfoptim.distributed.zero`), as ``(partial row, whole rows)``:

    * the partial row, a shard as the segment was (same cuts and process group, the owned part of
      that row as ``valid``, the segment's write-back), which the plain path steps with the
      layout's statistics -- the cut row and its cut block completed over the processes exactly
      as for the whole segment (their pieces depend only on the cuts, so every process still
      sends one unit of this parameter);
    * the whole rows, a row piece no process shares, which the compiled kernel steps alone.

    None when the segment is not cut that way, has no whole row, its step is not row-local
    (:func:`_row_codecs`), a storage form is not ``offset_free`` or completes sums over its pieces
    (SMMF, cut only at its square matrix's rows), or the kernel would not take the whole rows:
    then the segment stays one unit on the plain path. A segment cut at both ends stays whole too
    (two partial rows would be two units of one parameter here and one elsewhere). The decision
    is this process's own: either way it sends one unit of the parameter to the plain path."""
    view = unit.view
    if unit.writeback is None or not view.sharded or view.valid is None or unit.canonical:
        return None
    if len(view.global_shape) < 2 or view.rows < 2:
        return None
    codecs = _row_codecs(engine, group, unit)
    if codecs is None or not all(c.offset_free for c in codecs):  # pieces are stepped as rows from 0
        return None
    slots = engine.rule.active_slots(group)
    if any(c.piece_sums(s, unit.state, view) for s, c in zip(slots, codecs)):
        return None
    a, b = view.valid
    row_len = view.row_len
    head, tail = a > 0, b < view.local_numel
    if head == tail:
        return None
    part, whole = ((0, 1), (1, view.rows)) if head else ((view.rows - 1, view.rows), (0, view.rows - 1))
    whole_rows = _rows_of(engine, group, unit, *whole)
    if not compiled_step.takes(engine, group, whole_rows, PieceStats(foreach=engine.layout.stats.foreach)):
        return None
    valid = (a, row_len) if head else (0, b - (view.rows - 1) * row_len)
    partial = _rows_of(engine, group, unit, *part, {"valid": valid, "cuts": view.cuts, "group": view.group})
    partial.writeback = unit.writeback  # the whole working copy, after its kernel-stepped rows
    return partial, whole_rows


def _row_codecs(engine, group: dict, unit: Unit, staged: bool = False) -> list | None:
    """The storage forms of ``unit``'s slots when its rows may be stepped apart (an elementwise
    rule, row-local modifiers, no decay with a statistic of the tensor (CPR) or of every tensor
    (stable), every form cut into rows and, unless ``staged``, needing no maxima or sums of the
    whole tensor: :meth:`~hfoptim.state.codec.Codec.shard_staged`), else None."""
    if not engine.rule.is_elementwise(group) or group["weight_decay_mode"] in ("stable", "cpr"):
        return None
    if any(m.enabled(group) and not m.rows_apart(unit.view.global_shape) for m in MODIFIERS):
        return None
    slots = engine.rule.active_slots(group)
    codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in slots]
    if not staged and any(c.shard_staged(slot, unit.view) for slot, c in zip(slots, codecs)):
        return None
    step = granularity(engine, group, unit)
    if not step or any(c.rows(slot, unit.state, unit.view, 0, step) is None for slot, c in zip(slots, codecs)):
        return None
    return codecs


def staged_cuttable(engine, group: dict, unit: Unit) -> bool:
    """Whether ``unit`` may be stepped as row pieces in stages
    (:class:`~hfoptim.core.stats.StagedPieceStats`): a 2+-D tensor held whole, or a shard whose
    process boundaries all end rows (an empty one too), whose rows may be stepped apart but for
    maxima or sums of the whole tensor that a storage form asks for (the 4-bit second moment's
    column maxima), with no form completing sums of its own (:meth:`~hfoptim.state.codec.
    Codec.piece_sums`, ``shard_sums``), and that the compiled kernel takes. The same answer on
    every process: it reads the options, the global shape and the process boundaries."""
    view = unit.view
    if unit.writeback is not None or unit.canonical or len(view.global_shape) < 2:
        return False
    if view.sharded and any(cut % view.row_len for cut in view.cuts):
        return False
    if not view.sharded and view.local_rows is not None:
        return False
    codecs = _row_codecs(engine, group, unit, staged=True)
    if codecs is None or not all(c.offset_free for c in codecs):
        return False
    slots = engine.rule.active_slots(group)
    if not any(c.shard_staged(s, view) for s, c in zip(slots, codecs)):
        return False  # nothing staged: cuttable / shard_cuttable decide
    if any(c.piece_sums(s, unit.state, view) or c.shard_sums(s, view) for s, c in zip(slots, codecs)):
        return False
    return compiled_step.takes(engine, group, unit, engine.layout.stats)


def staged_pieces(engine, group: dict, unit: Unit, rows: int) -> tuple[list[Unit], StagedPieceStats]:
    """``unit`` as row pieces of ``rows`` rows (an empty shard as one piece of itself) and the
    statistics backend of their call, which completes the parts of the whole tensor over the
    pieces and processes and then stores what the pieces kept in copies."""
    empty = unit.view.sharded and unit.param.numel() == 0
    cut = [unit] if empty else pieces(engine, group, unit, rows)
    slots = engine.rule.active_slots(group)
    codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in slots]

    def finish(last: Unit) -> None:  # (an empty shard's last piece is itself: copies onto itself)
        for slot, codec in zip(slots, codecs):
            codec.finish_rows(slot, unit.state, unit.view, last.state)

    stats = engine.layout.stats
    all_reduce = stats.all_reduce if unit.view.sharded else None
    return cut, StagedPieceStats(unit.view, all_reduce, finish, foreach=stats.foreach)


#: row pieces that :func:`plan` made, by what they were cut from ("whole": tensors held whole
#: by this process; "uncut": of those, parameters of a sharded run that no process boundary cuts,
#: stepped by the process holding them (:mod:`hfoptim.core.uncut`); "shard": shards of a sharded
#: run; "staged": any, stepped in stages by :func:`staged_pieces`), and shards it stepped as one
#: piece of themselves ("shard_whole": :func:`_sums_by_pieces`), over every step (the tests read it)
planned: dict[str, int] = {"whole": 0, "uncut": 0, "shard": 0, "shard_whole": 0, "staged": 0}


def collectives_first(engine, group: dict, calls: list) -> list[tuple[list[Unit], LocalStats]]:
    """``calls`` (of :func:`plan`) reordered for a sharded run: first, in their order, the units
    of each call that go to the plain path, whose statistics are collectives; then the rest,
    in their order (the kernels' units, row pieces). Every process thus runs the same plain
    calls with the same units as in ``calls`` (:func:`~hfoptim.core.compiled_step.kernel_split`
    mirrors the kernel's gates) and reaches their collectives before its own kernels: in the
    order of ``calls``, a ZeRO process that owns the first parameters did its kernels before the
    collective of the parameter its partition ends in, and the next process its kernels after
    it, one after the other (ZeRO-2 on 2 processes, 100M set: each waited 310-330 ms of a
    740 ms step). The callers defer the plain units' write-backs to after every call: a cut
    segment's whole rows (a kernel) must reach its working copy before the copy is written back."""
    first, later = [], []
    for units, stats in calls:
        if isinstance(stats, PieceStats):  # a row piece needs nothing of another process
            later.append((units, stats))
            continue
        kernel, plain = compiled_step.kernel_split(engine, group, units, stats)
        if plain:
            first.append((plain, stats))
        if kernel:
            later.append((kernel, stats))
    return first + later


def plan(
    engine, group: dict, bucket: list[Unit], shard_sums: ShardSums | None = None, share: int = 1
) -> list[tuple[list[Unit], LocalStats]]:
    """The calls that step ``bucket``: ``(units, statistics backend)`` each (see the module
    docstring). Every unit's state exists and its step counter is advanced already. Sums the row
    pieces of shards leave to complete go to ``shard_sums`` (the caller completes it after the
    calls: :meth:`ShardSums.complete`). ``share``: the number of processes whose steps share the
    budget, for uncut parameters held whole by one of them (:mod:`hfoptim.core.uncut`): each call
    and piece then holds at most ``1/share`` of it, as a shard of a parameter they all share does
    (:func:`piece_numel`), since each process holds ``1/share`` of the state."""
    limit = chunk_numel(group, bucket[0].param.device if bucket else None)
    if limit and share > 1:
        limit = max(1, limit // share)
    stats = engine.layout.stats
    calls: list = []
    split = [cut_row_parts(engine, group, u) for u in bucket]
    if any(split):
        # the kernel steps the whole rows of a cut segment first; its partial row stays in place
        # below, and its write-back (after the plain step) copies the whole working copy
        piece_stats = PieceStats(foreach=stats.foreach)
        for unit, parts in zip(bucket, split):
            if parts is None:
                continue
            whole = parts[1]
            most = None
            if limit:
                (per_element,) = compiled_step.block_rows_bytes(engine, group, [whole], piece_stats)
                most = piece_numel(_unit_limit(limit, per_element), unit.view)
            rows = rows_per_piece(whole.view.rows, whole.view.row_len, most) if most else whole.view.rows
            whole_pieces = [whole] if rows >= whole.view.rows else pieces(engine, group, whole, rows)
            calls.extend(([piece], piece_stats) for piece in whole_pieces)
        bucket = [u if parts is None else parts[0] for u, parts in zip(bucket, split)]
    if limit is None or len(bucket) == 0:
        return calls + ([(bucket, stats)] if bucket else [])
    current, size = [], 0
    whole_shards, whole_size = [], 0  # shards stepped as one piece (see _sums_by_pieces)
    # units held whole here beside sharded ones (the local experts of an FSDP2 shard) differ from
    # process to process: only the sharded units' global sizes decide the chunks, the same everywhere
    sharded = any(u.view.sharded for u in bucket)
    numels = [call_numel(u.view) if u.view.sharded or not sharded else 0 for u in bucket]
    large = [i for i, numel in enumerate(numels) if numel >= limit // LARGE_SHARE]
    kernel_bytes = dict(zip(large, compiled_step.block_rows_bytes(engine, group, [bucket[i] for i in large], stats)))
    for i, (unit, numel) in enumerate(zip(bucket, numels)):
        per_element = kernel_bytes.get(i)
        if per_element is not None:
            # the kernel in rows of one block: its elements count for what its temporaries hold
            numel = -(-numel * per_element // TRANSIENT_BYTES_PER_ELEMENT)
        if numel <= limit and _sums_by_pieces(engine, group, unit):
            if whole_shards and whole_size + numel > limit:
                calls.append((whole_shards, PieceStats(foreach=stats.foreach)))
                whole_shards, whole_size = [], 0
            whole_shards.extend(pieces(engine, group, unit, max(unit.view.rows, 1), shard_sums))
            whole_size += numel
            planned["shard_whole"] += 1
            continue
        if numel > limit and staged_cuttable(engine, group, unit):
            cut, piece_stats = staged_pieces(engine, group, unit, _piece_rows(engine, group, unit, limit))
            planned["staged"] += len(cut)
            calls.append((cut, piece_stats))
            continue
        if numel > limit and (shard_cuttable if unit.view.sharded else cuttable)(engine, group, unit):
            piece_stats = PieceStats(foreach=stats.foreach)
            rows = _piece_rows(engine, group, unit, _unit_limit(limit, per_element))
            cut = pieces(engine, group, unit, rows, shard_sums)
            planned["shard" if unit.view.sharded else "whole"] += len(cut)
            planned["uncut"] += len(cut) if share > 1 else 0
            calls.extend(([piece], piece_stats) for piece in cut)
            continue
        if current and size + numel > limit:
            calls.append((current, stats))
            current, size = [], 0
        current.append(unit)
        size += numel
    if current:
        calls.append((current, stats))
    if whole_shards:
        calls.append((whole_shards, PieceStats(foreach=stats.foreach)))
    return calls


def _unit_limit(limit: int, per_element: int | None) -> int:
    """The elements of a unit whose step holds ``per_element`` bytes of temporaries per element
    (None: :data:`TRANSIENT_BYTES_PER_ELEMENT`) that one call may process under the call limit
    ``limit`` (:func:`chunk_numel`)."""
    return limit if per_element is None else limit * TRANSIENT_BYTES_PER_ELEMENT // per_element


def _sums_by_pieces(engine, group: dict, unit: Unit) -> bool:
    """Whether the shard ``unit``, small enough for one call, is better stepped as one row piece
    of itself: a storage form completes sums over the whole tensor from its pieces (SMMF's column
    sums, :meth:`~hfoptim.state.codec.Codec.piece_sums`) and it may be cut
    (:func:`shard_cuttable`). Its row statistics are then its own and its sums are completed with
    the bucket's pieces' (:class:`ShardSums`: one all-reduce after the calls), where the sharded
    statistics backend would issue two collectives per slot and call (the 40 768x768 SMMF
    matrices of the 100M set under FSDP2 on 2 processes: 160 collectives a step)."""
    if not unit.view.sharded:
        return False
    slots = engine.rule.active_slots(group)
    codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in slots]
    if not any(codec.piece_sums(slot, unit.state, unit.view) for slot, codec in zip(slots, codecs)):
        return False  # (asked first: most forms have none, and shard_cuttable's gates cost more)
    return shard_cuttable(engine, group, unit)
