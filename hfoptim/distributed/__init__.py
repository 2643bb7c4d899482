"""Exact optimizer steps for sharded parameters.

Rules, modifiers and codecs take every per-tensor statistic through the layout's stats object;
here each backend says what a process holds of each parameter (:class:`~hfoptim.core.stats.ParamView`)
and completes the statistics across processes with batched collectives:

* :mod:`.stats` -- :class:`ShardedStats`, the one place where partial sums are combined;
* :mod:`.fsdp2` -- FSDP2 (``fully_shard``) DTensor row shards, chosen at the first step;
* :mod:`.zero` -- DeepSpeed ZeRO-1/2 flat partitions and ZeRO-3 per-parameter partitions,
  installed by :func:`hfoptim.integrations.deepspeed.attach`;
* :mod:`.select` -- the choice at step time and the refusals (FSDP1, unknown flat tensors);
* :mod:`.checkpoint` -- FSDP2 state as DTensors for torch.distributed.checkpoint (reshardable),
  ZeRO segment state through DeepSpeed's checkpoint;
* :mod:`.loss` -- the loss loss-driven rules see (mean over data-parallel processes).
"""

from .select import UnsupportedSharding
from .stats import ShardedStats, ShardingError

#: backends under which every listed name steps exactly as on one process: checked on CPU with
#: gloo, 2 and 3 processes, by tests/test_sharding_{fsdp2,zero}.py (the whole matrix is `slow`)
EXACT_BACKENDS = ("fsdp2", "zero1", "zero2", "zero3")


def sharding_support(name: str) -> dict[str, bool]:
    """For an optimizer name: which sharding backends run it exactly (all of them for every
    valid name; FSDP1, ZeRO NVMe/partial offload and tensor parallelism are refused for all)."""
    from ..registry import get_optimizer

    get_optimizer(name)  # an unknown or invalid name raises ValueError
    return {backend: True for backend in EXACT_BACKENDS}


__all__ = ["EXACT_BACKENDS", "ShardedStats", "ShardingError", "UnsupportedSharding", "sharding_support"]
