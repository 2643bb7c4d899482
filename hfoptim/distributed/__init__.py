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

__all__ = ["ShardedStats", "ShardingError", "UnsupportedSharding"]
