"""Exact per-tensor statistics for parameters split across processes.

:class:`ShardedStats` implements every method of :class:`~hfoptim.core.stats.LocalStats` over
the WHOLE parameter although each process holds a part of it (its
:class:`~hfoptim.core.stats.ParamView`): each process reduces what it owns, and the partial
results are combined with one all-reduce per call (per distinct process group) for the whole list
of tensors -- small statistics are concatenated into one buffer, never one collective per
tensor in a Python loop.

A statistic is asked of either

* an *element tensor*: the unit's local tensor or a reshape of it (``view.local_numel``
  elements, rows along dim 0); only the owned flat range ``view.valid_range`` counts, so the
  padding of rows cut by a ZeRO partition boundary never enters a statistic; or
* a *per-row vector* (``view.rows`` elements, e.g. the row sums kept by a factored codec): a row
  cut by a partition boundary is held by two processes and counts once, on the process that
  owns its first element.

Row statistics of rows held whole are local (FSDP2 shards whole rows: no communication); rows
cut by a boundary (ZeRO) are completed by adding the partial sums of every process in one
all-reduce of one number per cut row. Column statistics and totals are always all-reduced.
Block maxima (8-bit blocks of the flattened global tensor) are local except for the blocks a
boundary cuts, which are completed with one MAX all-reduce.

``collectives`` and ``bytes_reduced`` count what was communicated (tests, benchmarks).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist

from ..core.stats import LocalStats, ParamView


class ShardingError(RuntimeError):
    """A statistic that cannot be computed exactly for a sharded tensor in the form asked."""


@lru_cache(maxsize=65536)
def cut_rows(view: ParamView) -> tuple[int, ...]:
    """Global rows that a process boundary cuts (held partly by two or more processes)."""
    length = view.row_len
    return tuple(sorted({c // length for c in view.cuts if c % length}))


@lru_cache(maxsize=65536)
def cut_blocks(view: ParamView, block: int) -> tuple[int, ...]:
    """Global blocks (of ``block`` elements of the flattened tensor) that a boundary cuts."""
    return tuple(sorted({c // block for c in view.cuts if c % block}))


def owned_rows(view: ParamView) -> tuple[int, int]:
    """Local rows ``[i, j)`` whose first element this process owns."""
    a, b = view.valid_range
    length = view.row_len
    return -(-a // length), -(-b // length)


def owned(t: torch.Tensor, view: ParamView) -> torch.Tensor:
    """The elements of ``t`` (element tensor or per-row vector) this process owns, flat."""
    flat = t.reshape(-1)
    n = flat.numel()
    if n == view.local_numel:
        a, b = view.valid_range
        return flat if (a, b) == (0, n) else flat[a:b]
    if n == view.rows:
        i, j = owned_rows(view)
        return flat if (i, j) == (0, n) else flat[i:j]
    raise ShardingError(
        f"a statistic was asked of a tensor of shape {tuple(t.shape)} for a shard of rows "
        f"[{view.row_start}, {view.row_start + view.rows}) of a parameter of shape {tuple(view.global_shape)}: "
        f"only the shard itself (or a reshape of it) and per-row vectors can be reduced exactly"
    )


def masked_rows(t: torch.Tensor, view: ParamView, square: bool = False) -> torch.Tensor:
    """``t`` as ``(rows, row_len)`` with the elements this process does not own set to zero."""
    if t.numel() != view.local_numel or (t.dim() > 0 and t.shape[0] != view.rows):
        raise ShardingError(
            f"row/column statistics of a sharded parameter of shape {tuple(view.global_shape)} need its local "
            f"rows as the first dimension ({view.rows} rows of {view.row_len}); got shape {tuple(t.shape)}"
        )
    x = t.reshape(view.rows, view.row_len)
    a, b = view.valid_range
    if (a, b) != (0, view.local_numel):
        flat = x.reshape(-1)
        kept = torch.zeros_like(flat)
        kept[a:b] = flat[a:b]
        x = kept.view(view.rows, view.row_len)
    return x.square() if square else x


class ShardedStats(LocalStats):
    """Statistics of whole parameters from shards; see the module docstring."""

    def __init__(self, foreach: bool = True):
        super().__init__(foreach=foreach)
        self.collectives = 0
        self.bytes_reduced = 0

    # ------------------------------------------------------------------ communication
    def all_reduce(self, pieces: list[torch.Tensor], views: list[ParamView], op=dist.ReduceOp.SUM) -> list:
        """Combine each piece over its view's process group, one collective per distinct group.

        Pieces of views held whole (``group is None``) and empty pieces are returned unchanged.
        Every process must call with pieces of the same sizes in the same order (the sizes only
        depend on global shapes and cut points, which all processes share)."""
        out = list(pieces)
        groups: dict[int, tuple] = {}
        for i, (x, v) in enumerate(zip(pieces, views)):
            if v.group is not None and x.numel():
                groups.setdefault(id(v.group), (v.group, []))[1].append(i)
        for group, index in groups.values():
            dtype = pieces[index[0]].dtype
            for i in index[1:]:
                dtype = torch.promote_types(dtype, pieces[i].dtype)
            buf = torch.cat([pieces[i].reshape(-1).to(dtype) for i in index])
            dist.all_reduce(buf, op=op, group=group)
            self.collectives += 1
            self.bytes_reduced += buf.numel() * buf.element_size()
            for i, part in zip(index, buf.split([pieces[i].numel() for i in index])):
                out[i] = part.view(pieces[i].shape).to(pieces[i].dtype)
        return out

    # ------------------------------------------------------------------ whole-tensor reductions
    def _partials(self, tensors, views, fn) -> list[torch.Tensor]:
        return [fn(owned(t, v)) if v.sharded else None for t, v in zip(tensors, views)]

    def sum_sq(self, tensors, views):
        if not any(v.sharded for v in views):
            return super().sum_sq(tensors, views)
        parts = [owned(t, v) if v.sharded else t for t, v in zip(tensors, views)]
        if self.foreach and parts:
            partial = [n * n for n in torch._foreach_norm(parts)]
        else:
            partial = [x.square().sum() for x in parts]
        return self.all_reduce(partial, views)

    def norm(self, tensors, views):
        if not any(v.sharded for v in views):
            return super().norm(tensors, views)
        return [s.sqrt() for s in self.sum_sq(tensors, views)]

    def sum(self, tensors, views):
        if not any(v.sharded for v in views):
            return super().sum(tensors, views)
        return self.all_reduce([(owned(t, v) if v.sharded else t).sum() for t, v in zip(tensors, views)], views)

    # ------------------------------------------------------------------ rows and columns
    def row_sums(self, tensors, views, square: bool = False) -> list[torch.Tensor]:
        """:meth:`row_sum` (or ``row_sum_sq``) of many tensors with one collective."""
        out, pieces, where = [], [], []
        for t, v in zip(tensors, views):
            if not v.sharded:
                out.append(LocalStats.row_sum_sq(self, t, v) if square else LocalStats.row_sum(self, t, v))
                pieces.append(t.new_zeros(0))
                where.append(None)
                continue
            sums = masked_rows(t, v, square).sum(dim=1)
            rows = cut_rows(v)
            index = torch.tensor([r - v.row_start for r in rows], dtype=torch.long, device=sums.device)
            held = (index >= 0) & (index < v.rows)
            piece = torch.zeros(len(rows), dtype=sums.dtype, device=sums.device)
            piece[held] = sums[index[held]]
            out.append(sums)
            pieces.append(piece)
            where.append((index, held))
        for sums, piece, w in zip(out, self.all_reduce(pieces, views), where):
            if w is not None and piece.numel():
                index, held = w
                sums[index[held]] = piece[held]
        return out

    def row_sum(self, tensor, view):
        return self.row_sums([tensor], [view])[0]

    def row_sum_sq(self, tensor, view):
        return self.row_sums([tensor], [view], square=True)[0]

    def col_sums(self, matrices, views) -> list[torch.Tensor]:
        """:meth:`col_sum` of many matrices with one collective."""
        partial = [
            masked_rows(m, v).sum(dim=0) if v.sharded else LocalStats.col_sum(self, m, v)
            for m, v in zip(matrices, views)
        ]
        return self.all_reduce(partial, views)

    def col_sum(self, matrix, view):
        return self.col_sums([matrix], [view])[0]

    # ------------------------------------------------------------------ blocks of the flat tensor
    def block_absmax(self, tensors, views, block: int) -> list[torch.Tensor]:
        """Max of ``|x|`` over each block of ``block`` consecutive elements of the flattened
        GLOBAL tensor that this process's owned range touches: blocks
        ``[first, last)`` with ``first = (offset + valid[0]) // block`` (see :func:`block_range`).
        Blocks cut by a process boundary are completed with one MAX all-reduce."""
        out, pieces, where = [], [], []
        for t, v in zip(tensors, views):
            start, stop = global_owned_range(v)
            first, last = block_range(v, block)
            x = owned(t, v).abs() if v.sharded else t.reshape(-1).abs()
            lead, tail = start - first * block, last * block - stop
            if lead or tail:
                x = torch.nn.functional.pad(x, (lead, tail))
            maxima = x.view(-1, block).amax(dim=1) if x.numel() else x.new_zeros(0)
            blocks = cut_blocks(v, block) if v.sharded else ()
            index = torch.tensor([b - first for b in blocks], dtype=torch.long, device=x.device)
            held = (index >= 0) & (index < maxima.numel())
            piece = torch.zeros(len(blocks), dtype=maxima.dtype, device=maxima.device)
            piece[held] = maxima[index[held]]
            out.append(maxima)
            pieces.append(piece)
            where.append((index, held))
        for maxima, piece, (index, held) in zip(out, self.all_reduce(pieces, views, op=dist.ReduceOp.MAX), where):
            if piece.numel():
                maxima[index[held]] = piece[held]
        return out


def global_owned_range(view: ParamView) -> tuple[int, int]:
    """Global flat range ``[start, stop)`` of the elements this process owns."""
    a, b = view.valid_range
    return view.offset + a, view.offset + b


def block_range(view: ParamView, block: int) -> tuple[int, int]:
    """Global blocks ``[first, last)`` that this process's owned elements touch."""
    start, stop = global_owned_range(view)
    if stop <= start:
        return start // block, start // block
    return start // block, -(-stop // block)
