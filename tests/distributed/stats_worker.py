"""ShardedStats and the refusals, on N processes: ``torchrun --nproc_per_node N stats_worker.py``.

1. Every statistic of :class:`ShardedStats` (and its whole-matrix map, Muon's gather to one
   owner) over ZeRO-style flat partitions (parameters cut
   anywhere, inside rows; the padding of cut rows filled with NaN, which must never leak) and
   over FSDP2-style row shards equals :class:`LocalStats` on the whole tensors; each call issues
   at most one collective per process group, whatever the number of tensors.
2. FSDP1 (use_orig_params True and False) and DTensor placements other than Shard(0) are refused
   with errors that name FSDP2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hfoptim.core.stats import LocalStats, ParamView  # noqa: E402
from hfoptim.distributed.stats import ShardedStats  # noqa: E402
from hfoptim.distributed.zero import _Piece, flat_group_segments  # noqa: E402
from tests.distributed.common import finish, run_cases, setup_threads  # noqa: E402

SHAPES = [(), (5,), (300,), (13, 7), (3, 1000), (6, 3, 2, 2), (67, 97), (1, 9), (2, 600)]
BLOCK = 256

#: every public LocalStats method and how it is checked here; a method added to LocalStats without
#: an entry fails the run (give it a sharded version and a check)
CHECKED = {
    "sum_sq",
    "norm",
    "sum",
    "row_sum",
    "row_sum_sq",
    "col_sum",
    "row_sums",
    "col_sums",
    "block_absmax",
    "any_nonfinite",
    "matrix_map",
    "dim_absmax",
}


def full_tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def zero_units(fulls, world, rank, partition_size=None):
    """(local tensor, view) per parameter as the ZeRO layout makes them, padding set to NaN."""
    offsets, pos = [], 0
    for t in fulls:
        offsets.append(pos)
        pos += t.numel() + 3  # some alignment padding between parameters
    size = partition_size or -(-pos // world)
    flat = torch.cat([torch.cat([t.reshape(-1), torch.zeros(3, dtype=t.dtype)]) for t in fulls])
    flat = torch.cat([flat, torch.zeros(size * world - flat.numel(), dtype=flat.dtype)])
    local = flat[rank * size : (rank + 1) * size].clone()
    segments = flat_group_segments([t.shape for t in fulls], offsets, size, world, rank)
    out = []
    for seg in segments:
        piece = _Piece(seg, local, dist.group.WORLD)
        piece.refresh()
        if piece.padded:
            a, b = piece.range
            flat_param = piece.param.view(-1)
            flat_param[:a] = float("nan")
            flat_param[b:] = float("nan")
        out.append((piece.param, piece.view))
    return out


def row_units(fulls, world, rank):
    """(local tensor, view) per parameter as FSDP2 shards rows (torch.chunk sizes)."""
    out = []
    for t in fulls:
        if t.dim() == 0:
            out.append((t.clone(), ParamView(t.shape)))
            continue
        rows = t.shape[0]
        chunk = -(-rows // world)
        starts = [min(k * chunk, rows) for k in range(world + 1)]
        r0, r1 = starts[rank], starts[rank + 1]
        row_len = t[0].numel() if t.dim() > 1 else 1
        cuts = tuple(sorted({s * row_len for s in starts if 0 < s < rows}))
        view = ParamView(t.shape, row_start=r0, local_rows=r1 - r0, cuts=cuts, group=dist.group.WORLD)
        out.append((t[r0:r1].clone(), view))
    return out


def local_blocks(full_maxima: torch.Tensor, full: torch.Tensor, view: ParamView) -> torch.Tensor:
    """The maxima of the blocks the local tensor holds, from the whole tensor's."""
    if full.dim() >= 2:
        per_line = -(-full[0].numel() // BLOCK)
        return full_maxima.view(full.shape[0], per_line)[view.row_start : view.row_start + view.rows].reshape(-1)
    if view.rows == 0:
        return full_maxima[:0]
    first = view.row_start // BLOCK
    last = -(-(view.row_start + view.rows) // BLOCK)
    return full_maxima[first:last]


def check_stats(kind: str, failures: list, detail: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    missing = {m for m in dir(LocalStats) if not m.startswith("_") and callable(getattr(LocalStats, m))} - CHECKED
    if missing:
        failures.append(f"LocalStats methods without a sharded check: {sorted(missing)}")
    fulls = full_tensors(7)
    units = zero_units(fulls, world, rank) if kind == "zero" else row_units(fulls, world, rank)
    tensors, views = [u[0] for u in units], [u[1] for u in units]
    ref, sharded = LocalStats(), ShardedStats()

    def close(name, got, want):
        try:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        except AssertionError as error:
            failures.append(f"{kind} {name}: {str(error).splitlines()[:4]}")

    for name in ("sum_sq", "norm", "sum"):
        before = sharded.collectives
        got = getattr(sharded, name)(tensors, views)
        want = getattr(ref, name)(fulls, [ParamView(t.shape) for t in fulls])
        for i, (g, w) in enumerate(zip(got, want)):
            close(f"{name}[{SHAPES[i]}]", g, w)
        if sharded.collectives - before > 1:
            failures.append(f"{kind} {name}: {sharded.collectives - before} collectives for one call")
    before = sharded.collectives
    maxima = sharded.block_absmax(tensors, views, BLOCK)
    if sharded.collectives - before > 1:
        failures.append(f"{kind} block_absmax: {sharded.collectives - before} collectives for one call")
    for i, (full, (t, v)) in enumerate(zip(fulls, units)):
        whole = ParamView(full.shape)
        full_max = ref.block_absmax([full], [whole], BLOCK)[0]
        close(f"block_absmax[{SHAPES[i]}]", maxima[i], local_blocks(full_max, full, v))
        if full.dim() < 2:
            continue
        rows = slice(v.row_start, v.row_start + v.rows)
        close(f"row_sum[{SHAPES[i]}]", sharded.row_sum(t, v), ref.row_sum(full, whole)[rows])
        close(f"row_sum_sq[{SHAPES[i]}]", sharded.row_sum_sq(t, v), ref.row_sum_sq(full, whole)[rows])
        matrix = t.reshape(v.rows, v.row_len)
        close(f"col_sum[{SHAPES[i]}]", sharded.col_sum(matrix, v), ref.col_sum(full.reshape(full.shape[0], -1), whole))
        # a per-row vector (factored codecs' row sums): cut rows are held twice, count once
        r = ref.row_sum(full, whole)[rows]
        close(f"sum of per-row vector [{SHAPES[i]}]", sharded.sum([r], [v])[0], ref.row_sum(full, whole).sum())
    # the list forms: one collective for all the tensors
    mats = [(t.reshape(v.rows, v.row_len), v, full) for t, v, full in zip(tensors, views, fulls) if full.dim() >= 2]
    for square in (False, True):
        before = sharded.collectives
        got = sharded.row_sums([m for m, _, _ in mats], [v for _, v, _ in mats], square=square)
        if sharded.collectives - before > 1:
            failures.append(f"{kind} row_sums: {sharded.collectives - before} collectives for one call")
        for g, (_, v, full) in zip(got, mats):
            want = ref.row_sums([full], [ParamView(full.shape)], square=square)[0][v.row_start : v.row_start + v.rows]
            close(f"row_sums(square={square})[{tuple(full.shape)}]", g, want)
    before = sharded.collectives
    got = sharded.col_sums([m for m, _, _ in mats], [v for _, v, _ in mats])
    if sharded.collectives - before > 1:
        failures.append(f"{kind} col_sums: {sharded.collectives - before} collectives for one call")
    for g, (_, _, full) in zip(got, mats):
        want = ref.col_sums([full.reshape(full.shape[0], -1)], [ParamView(full.shape)])[0]
        close(f"col_sums[{tuple(full.shape)}]", g, want)
    check_nonfinite(kind, tensors, views, sharded, failures)
    check_matrix_map(kind, sharded, tensors, views, fulls, failures)
    # per-dimension maxima (4-bit rank-1 normalization, SM3's cover): dimension 0 on this
    # process's rows, the others whole; one collective
    before = sharded.collectives
    got = sharded.dim_absmax(
        [t for t, v, full in zip(tensors, views, fulls) if full.dim() >= 2],
        [v for v, full in zip(views, fulls) if full.dim() >= 2],
    )
    if sharded.collectives - before > 1:
        failures.append(f"{kind} dim_absmax: {sharded.collectives - before} collectives for one call")
    for g, (_, v, full) in zip(got, mats):
        want = ref.dim_absmax([full], [ParamView(full.shape)])[0]
        close(f"dim_absmax[{tuple(full.shape)}] dim 0", g[0], want[0][v.row_start : v.row_start + v.rows])
        for k in range(1, full.dim()):
            close(f"dim_absmax[{tuple(full.shape)}] dim {k}", g[k], want[k])
    detail["collectives"] = sharded.collectives


def check_nonfinite(kind, tensors, views, sharded, failures) -> None:
    """``any_nonfinite``: False although the padding of cut rows is NaN (never owned); True on
    EVERY process, with one collective, when one element owned by the last process only is NaN
    or infinite."""
    rank, world = dist.get_rank(), dist.get_world_size()
    before = sharded.collectives
    if bool(sharded.any_nonfinite(tensors, views)):
        failures.append(f"{kind} any_nonfinite: True for finite tensors (the NaN padding leaked)")
    if sharded.collectives - before != 1:
        failures.append(f"{kind} any_nonfinite: {sharded.collectives - before} collectives for one call")
    for bad in (float("nan"), float("inf")):
        spoiled = [t.clone() for t in tensors]
        index = max(range(len(views)), key=lambda i: views[i].global_numel)
        a, b = views[index].valid_range
        if rank == world - 1 and b > a:
            spoiled[index].view(-1)[b - 1] = bad
        if not bool(sharded.any_nonfinite(spoiled, views)):
            failures.append(f"{kind} any_nonfinite: False on rank {rank} when rank {world - 1} holds a {bad}")


def whole_matrix_fn(m: torch.Tensor) -> torch.Tensor:
    """A map no shard can compute: every output element depends on the whole matrix."""
    return m @ (m.T @ m) / m.norm() + m.sum(dim=0)


def check_matrix_map(kind, sharded, tensors, views, fulls, failures) -> None:
    """matrix_map gives each process its rows of fn(whole matrix), fn running once per matrix
    over all processes, with at most three collectives (the spans' all-gather, two all-to-alls)."""
    index = [i for i, full in enumerate(fulls) if full.dim() >= 2]
    calls = [0]

    def counted(m):
        calls[0] += 1
        return whole_matrix_fn(m)

    before = sharded.collectives
    got = sharded.matrix_map(counted, [tensors[i] for i in index], [views[i] for i in index])
    if sharded.collectives - before > 3:
        failures.append(f"{kind} matrix_map: {sharded.collectives - before} collectives for one call")
    total = torch.tensor([calls[0]])
    dist.all_reduce(total)
    if int(total) != len(index):
        failures.append(f"{kind} matrix_map: fn ran {int(total)} times over the processes for {len(index)} matrices")
    for out, i in zip(got, index):
        full, v = fulls[i], views[i]
        want = whole_matrix_fn(full.reshape(full.shape[0], -1)).reshape(-1)
        a, b = v.valid_range
        try:
            torch.testing.assert_close(out.reshape(-1)[a:b], want[v.offset + a : v.offset + b], rtol=1e-12, atol=1e-12)
        except AssertionError as error:
            failures.append(f"{kind} matrix_map[{tuple(full.shape)}]: {str(error).splitlines()[:4]}")


def check_refusals(failures: list, detail: dict) -> None:
    import hfoptim
    from hfoptim.distributed.select import UnsupportedSharding

    def expect(what, fn, needle):
        try:
            fn()
        except UnsupportedSharding as error:
            if needle not in str(error):
                failures.append(f"{what}: message lacks {needle!r}: {error}")
        else:
            failures.append(f"{what}: not refused")

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for orig in (True, False):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Linear(13, 5))
        model = FSDP(net, use_orig_params=orig, device_id=torch.device("cpu"))
        opt = hfoptim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 7)).sum().backward()
        expect(f"FSDP1 use_orig_params={orig}", opt.step, "fully_shard")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    p = torch.nn.Parameter(distribute_tensor(torch.randn(6, 8), mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.randn(6, 8), mesh, [Shard(1)])
    opt = hfoptim.AdamW([p], lr=1e-3)
    expect("DTensor Shard(1)", opt.step, "Shard(0)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_threads()
    dist.init_process_group("gloo")

    def one(name, failures, detail):
        if name == "refusals":
            check_refusals(failures, detail)
        else:
            check_stats(name, failures, detail)

    status = run_cases(["zero", "rows", "refusals"], one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
