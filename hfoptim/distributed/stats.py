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
Block maxima (8-bit and 4-bit blocks, laid on rows) are local except for the blocks a boundary
cuts, which are completed with one MAX all-reduce; so are the per-dimension maxima of the 4-bit
second moment (rank-1 normalization): rows cut by a boundary, and every other dimension.

``collectives`` and ``bytes_reduced`` count what was communicated (tests, benchmarks).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist

from ..core.stats import LocalStats, ParamView, block_layout, blocked, local_dim_absmax


class ShardingError(RuntimeError):
    """A statistic that cannot be computed exactly for a sharded tensor in the form asked."""


class UnsupportedSharding(RuntimeError):
    """A sharding setup hfoptim cannot step exactly; the message names the alternative."""


@lru_cache(maxsize=65536)
def cut_rows(view: ParamView) -> tuple[int, ...]:
    """Global rows that a process boundary cuts (held partly by two or more processes)."""
    length = view.row_len
    return tuple(sorted({c // length for c in view.cuts if c % length}))


@lru_cache(maxsize=64)
def _backend(group) -> str:
    return str(dist.get_backend(group))


def _collective_device(group, device: torch.device) -> torch.device:
    """Where a buffer on ``device`` can be reduced over ``group``: NCCL only reduces GPU tensors."""
    if device.type == "cpu" and _backend(group) == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


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
        #: bytes this process sent to others in whole-matrix exchanges (:meth:`matrix_map`)
        self.bytes_sent = 0
        #: matrices held whole by this process that :meth:`matrix_map` ran ``fn`` on (not in
        #: ``matrix_runs``, whose entries are the shards' matrices, aligned over the processes)
        self.held_matrix_runs = 0
        self._spans: dict[tuple, torch.Tensor] = {}

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
            device = _collective_device(group, buf.device)
            if device != buf.device:  # CPU state (ZeRO-Offload) over an NCCL group: reduce on the GPU
                buf = buf.to(device).contiguous()
                dist.all_reduce(buf, op=op, group=group)
                buf = buf.to(pieces[index[0]].device)
            else:
                dist.all_reduce(buf, op=op, group=group)
            self.collectives += 1
            self.bytes_reduced += buf.numel() * buf.element_size()
            for i, part in zip(index, buf.split([pieces[i].numel() for i in index])):
                out[i] = part.view(pieces[i].shape).to(pieces[i].dtype)
        return out

    # ------------------------------------------------------------------ whole matrices
    def matrix_map(self, fn, tensors, views) -> list[torch.Tensor]:
        """``fn`` once per WHOLE matrix, on one owner process (see :class:`LocalStats.matrix_map`).

        Per process group, for the whole list: each matrix gets an owner (the process that holds
        all of it, else the least loaded one, the same choice everywhere); one all-to-all sends
        every process's owned elements of each matrix to its owner, which assembles the matrix
        and runs ``fn``; a second all-to-all sends each process its elements of the result. The
        flat ranges each process owns are exchanged once per list of views (cached). A matrix held
        whole here (no process group) is mapped here, counted in ``held_matrix_runs``; an entry of
        ``matrix_runs`` lists a call's shards only, the same list on every process."""
        out: list = [None] * len(tensors)
        runs = [0] * len(tensors)
        groups: dict[int, tuple] = {}
        for i, (t, v) in enumerate(zip(tensors, views)):
            if v.group is None:
                out[i] = fn(t.reshape(v.global_rows, v.row_len)).reshape(t.shape)
                self.held_matrix_runs += 1
            else:
                groups.setdefault(id(v.group), (v.group, []))[1].append(i)
        for group, index in groups.values():
            self._matrix_map_group(fn, group, index, tensors, views, out, runs)
        if groups:  # the matrices of shards: the same list on every process
            self.matrix_runs.append([runs[i] for i, v in enumerate(views) if v.group is not None])
        return out

    def _matrix_map_group(self, fn, group, index, tensors, views, out, runs) -> None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = [views[i] for i in index]
        spans = self._owned_spans(group, mine)  # (world, n, 2): flat [start, stop) of each process
        owners = matrix_owners(spans, [v.global_numel for v in mine])
        sizes = (spans[:, :, 1] - spans[:, :, 0]).tolist()  # sizes[r][k]
        # the same answer on every process: does any element live away from its matrix's owner?
        crossing = any(sizes[r][k] and owners[k] != r for r in range(world) for k in range(len(mine)))
        spans = spans.tolist()
        dtype = tensors[index[0]].dtype
        local = [tensors[i].reshape(-1)[slice(*views[i].valid_range)].to(dtype) for i in index]
        # first exchange: my owned elements of each matrix to its owner
        send = [torch.cat([x for x, o in zip(local, owners) if o == r] or [local[0][:0]]) for r in range(world)]
        owned_by_me = [k for k, o in enumerate(owners) if o == rank]
        recv_sizes = [sum(sizes[r][k] for k in owned_by_me) for r in range(world)]
        received = self._all_to_all(send, recv_sizes, group, rank, crossing).split(recv_sizes)
        results = {}
        for r, chunk in enumerate(received):
            for k, part in zip(owned_by_me, chunk.split([sizes[r][k] for k in owned_by_me])):
                results.setdefault(k, [None] * world)[r] = part
        for k in owned_by_me:
            v = mine[k]
            whole = torch.empty(v.global_numel, dtype=dtype, device=local[k].device)
            for r, part in enumerate(results[k]):
                whole[spans[r][k][0] : spans[r][k][1]] = part
            results[k] = fn(whole.view(v.global_rows, v.row_len)).reshape(-1).to(dtype)
            runs[index[k]] = 1
        # second exchange: each process's elements of the results back from the owners
        back = [
            torch.cat([results[k][spans[r][k][0] : spans[r][k][1]] for k in owned_by_me] or [local[0][:0]])
            for r in range(world)
        ]
        back_sizes = [sum(sizes[rank][k] for k, o in enumerate(owners) if o == r) for r in range(world)]
        pieces = self._all_to_all(back, back_sizes, group, rank, crossing).split(back_sizes)
        per_owner = [
            iter(p.split([sizes[rank][k] for k, o in enumerate(owners) if o == r])) for r, p in enumerate(pieces)
        ]
        for k, i in enumerate(index):
            part = next(per_owner[owners[k]])
            t, v = tensors[i], views[i]
            a, b = v.valid_range
            if (a, b) == (0, t.numel()):
                out[i] = part.reshape(t.shape)
            else:
                full = t.new_zeros(t.numel(), dtype=dtype)
                full[a:b] = part
                out[i] = full.view(t.shape)

    def _all_to_all(self, send: list, recv_sizes: list[int], group, rank: int, crossing: bool) -> torch.Tensor:
        """One ``all_to_all_single``: ``send[r]`` to process ``r``; returns what came, in process
        order. Skipped on every process alike when nothing crosses processes (``crossing``
        False: each matrix is held whole by its owner)."""
        if not crossing:
            return send[rank]
        buf = torch.cat(send)
        device = _collective_device(group, buf.device)  # CPU state over NCCL: exchange on the GPU
        wire = buf.to(device)
        out = wire.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, wire, recv_sizes, [x.numel() for x in send], group=group)
        self.collectives += 1
        self.bytes_sent += sum(x.numel() * x.element_size() for r, x in enumerate(send) if r != rank)
        return out.to(buf.device)

    def _owned_spans(self, group, views: list[ParamView]) -> torch.Tensor:
        """``(world, n, 2)``: the global flat range ``[start, stop)`` each process owns of each
        view's parameter (one all-gather per distinct list of views, then cached)."""
        key = (id(group), tuple(views))
        spans = self._spans.get(key)
        if spans is None:
            mine = torch.tensor(
                [[v.offset + v.valid_range[0], v.offset + v.valid_range[1]] for v in views], dtype=torch.long
            )
            world = dist.get_world_size(group)
            device = _collective_device(group, mine.device)
            gathered = [torch.empty_like(mine, device=device) for _ in range(world)]
            dist.all_gather(gathered, mine.to(device), group=group)
            self.collectives += 1
            spans = torch.stack([x.cpu() for x in gathered])
            for k, v in enumerate(views):
                lengths = spans[:, k, 1] - spans[:, k, 0]
                if int(lengths.sum()) != v.global_numel:
                    raise ShardingError(
                        f"the processes own {int(lengths.sum())} elements of a parameter of shape "
                        f"{tuple(v.global_shape)} ({v.global_numel}): its matrix cannot be assembled"
                    )
            self._spans[key] = spans
        return spans

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

    def any_nonfinite(self, tensors, views) -> torch.Tensor:
        """True on every process when some process owns a NaN or an infinity in a tensor it
        shares: the local flag of each process group's tensors, combined with one MAX
        all-reduce per distinct group (every process holds a unit, possibly empty, for every
        parameter, so all take part)."""
        if not any(v.sharded for v in views):
            return super().any_nonfinite(tensors, views)
        local = [owned(t, v) if v.sharded else t for t, v in zip(tensors, views)]
        flags, flag_views = [], []
        by_group: dict = {}
        for x, v in zip(local, views):
            by_group.setdefault(id(v.group), (v, []))[1].append(x)
        for v, xs in by_group.values():
            xs = [x for x in xs if x.numel()]
            flag = LocalStats.any_nonfinite(self, xs, [v] * len(xs)) if xs else torch.tensor(False)
            flags.append(flag.to(torch.float32).reshape(1))
            flag_views.append(v)
        combined = self.all_reduce(flags, flag_views, op=dist.ReduceOp.MAX)
        return torch.stack([f.reshape(()) for f in combined]).gt(0).any()

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

    # ------------------------------------------------------------------ 8-bit blocks
    def block_absmax(self, tensors, views, block: int) -> list[torch.Tensor]:
        """Max of ``|x|`` per block of the 8-bit layout (:func:`hfoptim.core.stats.block_layout`:
        blocks within the rows of 2+-D tensors, along the vector for 0-/1-D ones), for the blocks
        the local tensor holds, over the elements this process owns; blocks cut by a process
        boundary (a 1-D shard starting inside a block, a ZeRO cut inside a row) are completed
        with one MAX all-reduce for the whole list."""
        out, pieces, where = [], [], []
        for t, v in zip(tensors, views):
            if not v.sharded:
                out.append(LocalStats.block_absmax(self, [t], [v], block)[0])
                pieces.append(t.new_zeros(0))
                where.append(None)
                continue
            x = masked_rows(t, v).reshape(v.local_shape) if v.valid is not None else t
            maxima = blocked(x, v, block).abs().amax(dim=1)
            shared = cut_blocks_local(v, block)
            index = torch.tensor([i for i, _ in shared], dtype=torch.long, device=maxima.device)
            held = torch.tensor([h for _, h in shared], dtype=torch.bool, device=maxima.device)
            piece = torch.zeros(len(shared), dtype=maxima.dtype, device=maxima.device)
            piece[held] = maxima[index[held]]
            out.append(maxima)
            pieces.append(piece)
            where.append((index, held))
        for maxima, piece, w in zip(out, self.all_reduce(pieces, views, op=dist.ReduceOp.MAX), where):
            if w is not None and piece.numel():
                index, held = w
                maxima[index[held]] = piece[held]
        return out

    # ------------------------------------------------------------------ per-dimension maxima (4-bit, SM3)
    def dim_absmax(self, tensors, views) -> list[list[torch.Tensor]]:
        """Per-dimension maxima of ``|x|`` (:meth:`LocalStats.dim_absmax`) over the WHOLE
        tensors: each process reduces the elements it owns; the maxima along dimension 0 of rows
        cut by a process boundary and the maxima along every other dimension (each process holds
        a part of every column) are completed with one MAX all-reduce for the whole list."""
        out, pieces, where = [], [], []
        for t, v in zip(tensors, views):
            if not v.sharded:
                out.append(local_dim_absmax(t, v))
                pieces.append(t.new_zeros(0))
                where.append(None)
                continue
            x = masked_rows(t, v).reshape(v.local_shape) if v.valid is not None else t
            maxima = local_dim_absmax(x, v)
            rows = cut_rows(v)
            index = torch.tensor([r - v.row_start for r in rows], dtype=torch.long, device=x.device)
            held = (index >= 0) & (index < v.rows)
            cut = torch.zeros(len(rows), dtype=x.dtype, device=x.device)
            cut[held] = maxima[0][index[held]]
            out.append(maxima)
            pieces.append(torch.cat([cut, *maxima[1:]]))
            where.append((index, held, len(rows)))
        for maxima, piece, w in zip(out, self.all_reduce(pieces, views, op=dist.ReduceOp.MAX), where):
            if w is None or not piece.numel():
                continue
            index, held, n = w
            maxima[0][index[held]] = piece[:n][held]
            for k, part in enumerate(piece[n:].split([m.numel() for m in maxima[1:]]), start=1):
                maxima[k] = part
        return out


def matrix_owners(spans: torch.Tensor, numels: list[int]) -> list[int]:
    """The process that orthogonalizes each matrix: the one holding all of it when there is one
    (no communication), else the least loaded so far (by elements, largest matrices first). The
    same on every process (computed from the exchanged spans)."""
    world = spans.shape[0]
    lengths = (spans[:, :, 1] - spans[:, :, 0]).tolist()
    load = [0] * world
    owners = [0] * len(numels)
    order = sorted(range(len(numels)), key=lambda k: -numels[k])
    for k in order:
        whole = [r for r in range(world) if lengths[r][k] == numels[k]]
        r = whole[0] if whole else min(range(world), key=lambda q: (load[q], q))
        owners[k] = r
        load[r] += numels[k]
    return owners


@lru_cache(maxsize=65536)
def cut_blocks_local(view: ParamView, block: int) -> tuple[tuple[int, bool], ...]:
    """The 8-bit blocks a process boundary cuts, the same list on every process, each as
    ``(local block index, held here)`` (index 0 where not held)."""
    lines, length, lead = block_layout(view, block)
    per_line = -(-(lead + length) // block)
    if len(view.global_shape) >= 2:
        row_len = view.row_len
        keys = sorted({(c // row_len, (c % row_len) // block) for c in view.cuts if (c % row_len) % block})
        out = []
        for row, k in keys:
            local = row - view.row_start
            held = 0 <= local < view.rows
            out.append((local * per_line + k if held else 0, held))
        return tuple(out)
    first = view.row_start // block
    keys = sorted({c // block for c in view.cuts if c % block})
    return tuple((b - first, True) if 0 <= b - first < per_line and view.rows else (0, False) for b in keys)
