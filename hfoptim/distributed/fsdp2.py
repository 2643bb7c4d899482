"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded by rows.

Each process updates its local shard (``DTensor._local_tensor``, in place) with the gradient's
local shard. ``Shard(0)`` splits dim 0 like ``torch.chunk`` (uneven sizes; a process may hold no
row), so a unit is always a run of whole rows: row statistics are local, column statistics,
norms and totals take one all-reduce over the shard group per call (:class:`ShardedStats`).
Meshes with replicated dimensions (HSDP) reduce over the sharding dimension only.

Optimizer state is kept as local tensors of the shard's shape in ``optimizer.state[p]`` (``p``
the DTensor parameter): the rules and codecs work on them directly, with no DTensor dispatch on
the hot path. ``state_dict()`` exports it as DTensors with the parameter's placement (and
``load_state_dict()`` takes that back, for any number of processes), so
``torch.distributed.checkpoint`` saves and reshards it; see :mod:`hfoptim.distributed.checkpoint`.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..core.layout import Layout, Unit, check_state_shapes
from ..core.stats import ParamView
from .checkpoint import export_dtensor_state, import_dtensor_state
from .stats import ShardedStats, UnsupportedSharding


def shard_dim_of(p: DTensor) -> int | None:
    """The mesh dimension that shards ``p`` by rows (Shard(0)), None if ``p`` is replicated."""
    dim = None
    for i, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is Shard and placement.dim == 0 and dim is None:
            dim = i
            continue
        raise UnsupportedSharding(
            f"a DTensor parameter of shape {tuple(p.shape)} has placements {tuple(p.placements)}: hfoptim steps "
            f"FSDP2 row sharding exactly (Shard(0) on one mesh dimension, Replicate on the others); "
            f"tensor parallelism and other placements are not supported"
        )
    return dim


def dtensor_view(p: DTensor) -> ParamView:
    """What this process holds of the DTensor ``p``: rows ``[start, start + local rows)``."""
    dim = shard_dim_of(p)
    shape = p.shape
    if dim is None or len(shape) == 0:
        return ParamView(global_shape=shape)
    mesh = p.device_mesh
    n = mesh.size(dim)
    rank = mesh.get_local_rank(dim)
    rows = shape[0]
    row_len = math.prod(shape[1:]) if len(shape) > 1 else 1
    starts = []
    for k in range(n):
        size, start = Shard.local_shard_size_and_offset(rows, n, k)
        starts.append(min(start, rows) if size else rows)
        if k == rank:
            local_rows, row_start = size, (start if size else rows)
    cuts = tuple(sorted({s * row_len for s in starts if 0 < s < rows}))
    local = p._local_tensor
    if local.shape[0] != local_rows:
        raise UnsupportedSharding(
            f"DTensor of shape {tuple(shape)}: local shard has {local.shape[0]} rows, expected {local_rows} "
            f"(torch.chunk split over {n} processes)"
        )
    return ParamView(
        global_shape=shape, row_start=row_start, local_rows=local_rows, cuts=cuts, group=mesh.get_group(dim)
    )


def local_of(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class DTensorLayout(Layout):
    """Units over the local shards of DTensor parameters (others are stepped whole)."""

    def __init__(self, foreach: bool = True):
        self.foreach = foreach
        self.stats = ShardedStats(foreach=foreach)
        self._views: dict[int, tuple] = {}

    def view(self, p: torch.Tensor) -> ParamView:
        if not isinstance(p, DTensor):
            return ParamView.of(p)
        cached = self._views.get(id(p))
        if cached is None or cached[0] is not p or cached[1] is not p._local_tensor:
            cached = (p, p._local_tensor, dtensor_view(p))
            self._views[id(p)] = cached
        return cached[2]

    def units(self, optimizer, group: dict) -> list[Unit]:
        units = []
        for p in group["params"]:
            if p.grad is None:
                continue
            view = self.view(p)
            grad = p.grad
            if isinstance(p, DTensor):
                if not isinstance(grad, DTensor) or tuple(grad.placements) != tuple(p.placements):
                    got = tuple(grad.placements) if isinstance(grad, DTensor) else "a plain tensor"
                    raise UnsupportedSharding(
                        f"parameter of shape {tuple(p.shape)} with placements {tuple(p.placements)} has a gradient "
                        f"with placements {got}"
                    )
            units.append(Unit(local_of(p), local_of(grad), optimizer.state[p], view, p))
        return units

    def units_without_grad(self, optimizer, group: dict) -> list[Unit]:
        """Every parameter's unit, gradient or not (to create state without a step)."""
        return [Unit(local_of(p), local_of(p), optimizer.state[p], self.view(p), p) for p in group["params"]]

    def regroup_transposed(self, units: list[Unit], returns: list | None) -> list[Unit]:
        """Sharded ``Conv1D`` weights over whole output units (:mod:`hfoptim.distributed.transpose`)."""
        from .transpose import regroup

        return regroup(units, self.stats, returns)

    # ------------------------------------------------------------------ checkpoints
    def export_state(self, optimizer, state_dict: dict) -> dict:
        return export_dtensor_state(self, optimizer, state_dict)

    def import_state(self, optimizer, state_dict: dict) -> dict:
        return import_dtensor_state(self, optimizer, state_dict)

    def check_param_state(self, optimizer, pid, p, pstate: dict, group: dict) -> None:
        check_state_shapes(optimizer, pid, p, pstate, group, self.view(p))
