"""The shard-view layer: exact statistics from shards, and loud refusals.

* tests/distributed/stats_worker.py on 3 processes: every ShardedStats method over ZeRO-style
  flat partitions (parameters cut inside rows, the padding of cut rows filled with NaN) and
  FSDP2-style row shards equals LocalStats on the whole tensors, with at most one collective
  per call; every public LocalStats method must be checked there (a new one fails the run until
  it has a sharded version); FSDP1 (use_orig_params True/False) and DTensor Shard(1) refused.
* In process: a flat tensor the optimizer was not built with is refused (never stepped as one
  tensor); ZeRO setups that cannot be exact are refused at attach, naming the alternative;
  segment bookkeeping of ZeRO-1/2 and ZeRO-3 partitions.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import hfoptim
from hfoptim.distributed.select import UnsupportedSharding
from hfoptim.distributed.zero import flat_group_segments, per_param_segments
from tests.distributed.launch import run_worker, torchrun


def test_sharded_stats_equal_whole_tensor_stats_and_refusals(tmp_path):
    run_worker(torchrun(3), "stats_worker.py", [], tmp_path / "out.json", timeout=240)


def test_flat_partition_the_optimizer_was_not_built_with_is_refused():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = hfoptim.AdamW(params, lr=1e-3)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))  # what ZeRO does
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(UnsupportedSharding, match="attach"):
        opt.step()
    assert torch.equal(flat.detach(), torch.cat([p.detach().reshape(-1) for p in params]))


def test_parameters_it_was_built_with_still_step_locally():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    opt = hfoptim.AdamW([p], lr=1e-3)
    opt.step()
    assert type(opt.layout).__name__ == "LocalLayout"


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ({"swap_optimizer": True}, "nvme"),
        ({"backup_optimizer": object()}, "ratio"),
        ({"zenflow": True}, "ZenFlow"),
        ({"elastic_checkpoint": True}, "elastic_checkpoint=false"),
    ],
)
def test_zero_combinations_that_cannot_be_exact_are_refused(attrs, needle):
    from hfoptim.distributed.zero import refuse_unsupported

    engine = hfoptim.AdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(UnsupportedSharding, match=needle):
        refuse_unsupported(SimpleNamespace(**attrs), engine)


def test_zero12_segments_cover_every_element_once():
    shapes = [torch.Size(s) for s in [(13, 7), (5,), (67, 97), (), (1, 9)]]
    offsets, pos = [], 0
    for s in shapes:
        offsets.append(pos)
        pos += max(1, int(torch.Size(s).numel())) + 2  # alignment padding
    for world in (2, 3, 5):
        size = -(-pos // world)
        owned = [torch.zeros(s.numel(), dtype=torch.int64) for s in shapes]
        for rank in range(world):
            for seg in flat_group_segments(shapes, offsets, size, world, rank):
                owned[seg.index][seg.start : seg.stop] += 1
                assert seg.pos + (seg.stop - seg.start) <= size
                assert all(0 < c < shapes[seg.index].numel() for c in seg.cuts)
        assert all(bool((o == 1).all()) for o in owned)


def test_zero3_segments_follow_deepspeed_partitioning():
    shapes = [torch.Size((13, 7)), torch.Size((5,)), torch.Size((1,))]
    world = 3
    sizes = [-(-s.numel() // world) for s in shapes]
    for rank in range(world):
        segs = per_param_segments(shapes, sizes, world, rank)
        assert [s.pos for s in segs] == [0, sizes[0], sizes[0] + sizes[1]]
        assert segs[0].start == min(rank * sizes[0], 91) and segs[0].cuts == (31, 62)
