"""Sharded transposed weights (``Conv1D``) stepped over whole output units.

A ``Conv1D`` weight is stored ``(in, out)``; its canonical matrix (:mod:`hfoptim.core.param_layout`)
is the transpose ``W = (out, in)``. FSDP2 shards the stored tensor by rows, i.e. ``W`` by
COLUMNS (input features), and ZeRO cuts its flat storage anywhere: no process holds a whole output
unit ``W[i, :]``, yet centralization, AGC, soft clipping, the shared and factored second moments,
the 8-bit and 4-bit rows, SMMF's matricization and Muon's Newton-Schulz are all defined over the
rows of ``W``.

Before the step, :func:`regroup` moves the elements so that process ``t`` of the group holds the
whole rows ``W[c_t:c_{t+1}, :]`` (split like ``torch.chunk``, the placement FSDP2 would give ``W``;
:func:`hfoptim.core.layout.transposed_view`). From there the step is an ordinary row shard: row
statistics are local, column statistics and norms take the usual one all-reduce per call of
:class:`~hfoptim.distributed.stats.ShardedStats`, and the state is kept for those rows, so every
rule, storage form and modifier steps the weight exactly as the same ``Linear`` weight on one
process. After the step the updated rows are sent back to the processes that store them.

Per process group and step: one ``all_to_all_single`` carrying the parameter and gradient
elements of every such weight of the bucket list, and one carrying the updated parameters back
(the local sizes, never a whole tensor on one process). Processes learn each other's stored
ranges from the statistics backend's exchanged ownership spans (cached).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..core.layout import Unit, split_rows, transposed_view
from .stats import ShardedStats, _collective_device


class _Plan:
    """Who sends what for one unit: stored rows ``[r0[r], r0[r] + n[r])`` of every process ``r``
    (its run of whole stored rows, padded where ZeRO cuts a row), canonical rows
    ``[c0[t], c1[t])`` of every process ``t``."""

    def __init__(self, unit: Unit, spans: list, world: int, rank: int):
        shape = tuple(unit.view.global_shape)
        self.unit = unit
        self.rows_in, self.cols_out = shape[0], shape[1]
        self.kernel = shape[2:]
        self.k = math.prod(self.kernel)
        row_len = self.cols_out * self.k
        self.r0, self.n = [], []
        for s, e in spans:
            if e > s:
                first, last = s // row_len, -(-e // row_len)
            else:
                first = last = 0
            self.r0.append(first)
            self.n.append(last - first)
        mine = unit.view
        if self.n[rank] != mine.rows or (mine.rows and self.r0[rank] != mine.row_start):
            raise RuntimeError(
                f"hfoptim internal error: the stored rows of a shard of shape {shape} ([{mine.row_start}, "
                f"{mine.row_start + mine.rows})) disagree with its exchanged ownership span"
            )
        self.c = [split_rows(self.cols_out, world, t) for t in range(world)]
        self.view = transposed_view(unit.view)

    def size(self, source: int, target: int) -> int:
        """Elements of one tensor that ``source`` sends ``target``."""
        c0, c1 = self.c[target]
        return (c1 - c0) * self.n[source] * self.k


def _exchange(stats: ShardedStats, group, send: list[torch.Tensor], sizes: list[list[int]], rank: int):
    """One ``all_to_all_single``: ``send[t]`` to process ``t``; ``sizes[r][t]`` what ``r`` sends
    ``t`` (known everywhere). Returns what came, split by source. Skipped on every process alike
    when nothing moves between processes."""
    world = len(sizes)
    recv_sizes = [sizes[r][rank] for r in range(world)]
    if not any(sizes[r][t] for r in range(world) for t in range(world) if r != t):
        return [send[rank] if r == rank else send[rank][:0] for r in range(world)]
    buf = torch.cat(send)
    device = _collective_device(group, buf.device)
    wire = buf.to(device)
    out = wire.new_empty(sum(recv_sizes))
    dist.all_to_all_single(out, wire, recv_sizes, [x.numel() for x in send], group=group)
    stats.collectives += 1
    stats.bytes_sent += sum(x.numel() * x.element_size() for t, x in enumerate(send) if t != rank)
    return list(out.to(buf.device).split(recv_sizes))


def regroup(units: list[Unit], stats: ShardedStats, returns: list | None) -> list[Unit]:
    """The units of sharded transposed parameters over whole canonical rows (module docstring),
    in the order given. With ``returns``, a callable that sends the updated rows back (and runs the
    units' ``writeback``) is appended to it; call it after the step, on every process alike."""
    out: list = [None] * len(units)
    groups: dict[int, tuple] = {}
    for i, u in enumerate(units):
        groups.setdefault(id(u.view.group), (u.view.group, []))[1].append(i)
    for group, index in groups.values():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        views = [units[i].view for i in index]
        spans = stats._owned_spans(group, views).tolist()  # [r][k] = [start, stop)
        plans = [_Plan(units[i], [spans[r][k] for r in range(world)], world, rank) for k, i in enumerate(index)]
        dtype = units[index[0]].param.dtype
        for i in index:
            dtype = torch.promote_types(torch.promote_types(dtype, units[i].param.dtype), units[i].grad.dtype)
        send = []
        for t in range(world):
            parts = []
            for plan in plans:
                c0, c1 = plan.c[t]
                for x in (plan.unit.param, plan.unit.grad):
                    local = x.reshape(plan.n[rank], plan.cols_out, plan.k)[:, c0:c1]
                    parts.append(local.transpose(0, 1).reshape(-1).to(dtype))
            send.append(torch.cat(parts) if parts else units[index[0]].param.new_zeros(0, dtype=dtype))
        sizes = [[2 * sum(p.size(r, t) for p in plans) for t in range(world)] for r in range(world)]
        received = _exchange(stats, group, send, sizes, rank)
        tensors = [_assemble(plans, received, world, rank, which) for which in (0, 1)]
        for k, (i, plan) in enumerate(zip(index, plans)):
            u = plan.unit
            out[i] = Unit(tensors[0][k], tensors[1][k], u.state, plan.view, u.owner, source=u.source, canonical=True)
        if returns is not None:
            returns.append(_send_back(stats, group, plans, [out[i] for i in index], dtype, world, rank))
    return out


def _assemble(plans: list[_Plan], received: list, world: int, rank: int, which: int) -> list[torch.Tensor]:
    """The canonical rows of each unit (``which`` 0: parameter, 1: gradient), from the pieces each
    process sent (a stored row cut by ZeRO comes from two processes, each with zeros where the
    other owns: the pieces are added)."""
    out = []
    offsets = [0] * world
    for plan in plans:
        like = plan.unit.param if which == 0 else plan.unit.grad
        c0, c1 = plan.c[rank]
        whole = like.new_zeros((c1 - c0, plan.rows_in, plan.k))
        for r in range(world):
            size = plan.size(r, rank)
            start = offsets[r] + (size if which == 1 else 0)
            piece = received[r][start : start + size].view(c1 - c0, plan.n[r], plan.k)
            if size:
                whole[:, plan.r0[r] : plan.r0[r] + plan.n[r]] += piece.to(whole.dtype)
            offsets[r] += 2 * size
        out.append(whole.view(plan.view.local_shape))
    return out


def _send_back(stats, group, plans: list[_Plan], canonical: list[Unit], dtype, world: int, rank: int) -> Callable:
    def send_back() -> None:
        send = []
        for r in range(world):
            parts = []
            for plan, unit in zip(plans, canonical):
                rows = unit.param.reshape(unit.param.shape[0], plan.rows_in, plan.k)
                parts.append(rows[:, plan.r0[r] : plan.r0[r] + plan.n[r]].reshape(-1).to(dtype))
            send.append(torch.cat(parts))
        sizes = [[sum(p.size(t, r) for p in plans) for t in range(world)] for r in range(world)]
        received = _exchange(stats, group, send, sizes, rank)
        offsets = [0] * world
        for plan in plans:
            u = plan.unit
            stored = u.param.new_empty((plan.n[rank], plan.cols_out, plan.k))
            for t in range(world):
                c0, c1 = plan.c[t]
                size = plan.size(rank, t)
                piece = received[t][offsets[t] : offsets[t] + size].view(c1 - c0, plan.n[rank], plan.k)
                stored[:, c0:c1] = piece.transpose(0, 1).to(stored.dtype)
                offsets[t] += size
            a, b = u.view.valid_range
            if (a, b) == (0, u.param.numel()):
                u.param.copy_(stored.view(u.param.shape))
            else:
                u.param.view(-1)[a:b].copy_(stored.view(-1)[a:b])
            if u.writeback is not None:
                u.writeback()

    return send_back
