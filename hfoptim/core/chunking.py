"""Bounded step memory: which tensors the engine steps together, and large ones in row pieces.

A step's temporaries grow with what one call processes: the decoded state and the update of
every tensor of a ``foreach`` bucket, a few times over (the plain 8-bit path holds up to ~48 bytes
per element at its peak). The group option ``chunk_bytes`` (default 64 MiB; 0: no bound) caps
that: a call processes at most ``chunk_bytes / TRANSIENT_BYTES_PER_ELEMENT`` elements.

* Tensors are grouped, in order, into chunks of at most that many elements (global sizes, so
  every process of a sharded run cuts the same chunks; the statistics' collectives match).
* A larger tensor of 2+ dims held whole by this process is stepped in pieces of whole rows (an
  8-bit block never crosses a row, so blocks stay whole) when the result cannot tell: the rule is
  ``elementwise``, every enabled modifier ``row_local``, and every state slot's storage form can
  be cut into rows (:meth:`~hfoptim.state.codec.Codec.rows`: dense, 8-bit, bf16). A piece is a
  :class:`~hfoptim.core.layout.Unit` whose tensors are views of the parameter's rows, its
  gradient's and its state's (all writes reach the whole tensors), with the view of those rows
  (``row_start``, ``local_rows``) and :class:`~hfoptim.core.stats.PieceStats`, which refuses any
  statistic of the whole tensor. The numbers are exactly those of the unchunked step.
* A shard of a sharded run (FSDP2 rows, a ZeRO segment of whole rows) is cut the same way when
  its step needs nothing of another process (:func:`~hfoptim.core.compiled_step.shard_local`:
  the same gates, plus process boundaries on row boundaries and blocks no boundary cuts) and
  its storage forms do not depend on the rows' place (``offset_free``): the decision reads only
  what every process shares (options, global shape, boundaries), so every process takes the same
  parameters out of the chunks below and the statistics' collectives of the others still match.
  Without it, the compiled kernel of a 16000x768 FSDP2 shard of adamw_8bit materialized its new
  fp32 moments whole (8 bytes per element; the plain path about 50).
* Not cut: tensors whose rule or modifiers need whole-tensor statistics (Adafactor's update
  clipping, LAMB's trust ratio, the cautious mask's mean, ...), factored/SMMF/shared state, 1-D
  tensors, other shards (their chunks are still bounded by grouping), and bf16 state
  on the compiled path (its rounding bits depend on the element's global index, which the
  compiled kernel of a piece does not take as an input; the fused kernel's temporaries are a
  fraction of the plain path's).
"""

from __future__ import annotations

from ..modifiers import MODIFIERS
from ..state import resolve
from . import compiled_step
from .layout import Unit
from .stats import LocalStats, ParamView, PieceStats

#: an upper bound of the step's temporary bytes per element processed (the plain 8-bit path,
#: the most, measured ~48)
TRANSIENT_BYTES_PER_ELEMENT = 64
#: default of the ``chunk_bytes`` option
DEFAULT_CHUNK_BYTES = 64 << 20


def chunk_numel(group: dict) -> int | None:
    """Elements one call may process under ``group``'s ``chunk_bytes`` (None: no bound)."""
    budget = group.get("chunk_bytes", DEFAULT_CHUNK_BYTES)
    return max(1, budget // TRANSIENT_BYTES_PER_ELEMENT) if budget else None


def cuttable(engine, group: dict, unit: Unit) -> bool:
    """Whether ``unit`` may be stepped in row pieces (see the module docstring)."""
    p, view = unit.param, unit.view
    if type(engine.layout.stats) is not LocalStats or unit.writeback is not None or view.sharded:
        return False
    if p.dim() < 2 or view.local_rows is not None or not engine.rule.is_elementwise(group):
        return False
    if group["weight_decay_mode"] in ("stable", "cpr"):  # a statistic of every tensor / of the whole tensor
        return False
    if any(m.enabled(group) and not m.row_local for m in MODIFIERS):
        return False
    codecs = [(slot, resolve.codec_for(engine.rule, slot, group, view)) for slot in engine.rule.active_slots(group)]
    if any(codec.rows(slot, unit.state, view, 0, 1) is None for slot, codec in codecs):
        return False
    # the compiled path steps a piece as rows from 0: a form whose stored values depend on the
    # rows' place (bf16's rounding bits) keeps the tensor whole there rather than lose the kernel
    return all(codec.offset_free for _, codec in codecs) or not compiled_step.takes(
        engine, group, unit, engine.layout.stats
    )


def shard_cuttable(engine, group: dict, unit: Unit) -> bool:
    """Whether the shard ``unit`` may be stepped in row pieces (see the module docstring); the
    same answer on every process, an empty shard included."""
    view = unit.view
    if not view.sharded or unit.canonical or len(view.global_shape) < 2:
        return False
    slots = engine.rule.active_slots(group)
    codecs = [resolve.codec_for(engine.rule, slot, group, view) for slot in slots]
    if not compiled_step.shard_local(engine, group, view, slots, codecs):
        return False
    first = min(1, view.rows)
    return all(c.offset_free and c.rows(s, unit.state, view, 0, first) is not None for s, c in zip(slots, codecs))


def rows_per_piece(rows: int, row_len: int, limit: int) -> int:
    """Rows of each piece of a ``rows x row_len`` tensor for pieces of at most ``limit``
    elements (one row at least); equal pieces when a few more pieces make them equal (one
    compiled kernel per tensor shape instead of two)."""
    most = max(1, limit // row_len)
    count = -(-rows // most)
    for n in range(count, 2 * count + 1):
        if rows % n == 0:
            return rows // n
    return -(-rows // count)


def pieces(engine, group: dict, unit: Unit, rows: int) -> list[Unit]:
    """``unit`` as pieces of ``rows`` rows (the last may be shorter)."""
    slots = engine.rule.active_slots(group)
    codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in slots]
    out = []
    for start in range(0, unit.view.rows, rows):
        stop = min(start + rows, unit.view.rows)
        state = {"step": unit.state["step"]}
        for slot, codec in zip(slots, codecs):
            state.update(codec.rows(slot, unit.state, unit.view, start, stop))
        row_start = unit.view.row_start + start  # a shard's pieces keep their global rows
        view = ParamView(global_shape=unit.view.global_shape, row_start=row_start, local_rows=stop - start)
        out.append(Unit(unit.param[start:stop], unit.grad[start:stop], state, view, unit.owner))
    return out


def plan(engine, group: dict, bucket: list[Unit]) -> list[tuple[list[Unit], LocalStats]]:
    """The calls that step ``bucket``: ``(units, statistics backend)`` each (see the module
    docstring). Every unit's state exists and its step counter is advanced already."""
    limit = chunk_numel(group)
    stats = engine.layout.stats
    if limit is None or len(bucket) == 0:
        return [(bucket, stats)] if bucket else []
    calls: list = []
    current, size = [], 0
    # units held whole here beside sharded ones (the local experts of an FSDP2 shard) differ from
    # process to process: only the sharded units' global sizes decide the chunks, the same everywhere
    sharded = any(u.view.sharded for u in bucket)
    for unit in bucket:
        numel = unit.view.global_numel if unit.view.sharded or not sharded else 0
        if numel > limit and (shard_cuttable if unit.view.sharded else cuttable)(engine, group, unit):
            if unit.view.rows == 0:
                continue  # an empty shard: nothing to step, and its step needs nothing of the others
            piece_stats = PieceStats(foreach=stats.foreach)
            rows = rows_per_piece(unit.view.rows, unit.view.row_len, limit)
            calls.extend(([piece], piece_stats) for piece in pieces(engine, group, unit, rows))
            continue
        if current and size + numel > limit:
            calls.append((current, stats))
            current, size = [], 0
        current.append(unit)
        size += numel
    if current:
        calls.append((current, stats))
    return calls
