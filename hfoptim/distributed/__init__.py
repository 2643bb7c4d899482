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

from ..registry import get_optimizer
from .select import UnsupportedSharding
from .stats import ShardedStats, ShardingError

#: backends under which every listed name steps exactly as on one process: checked on CPU with
#: gloo, 2 and 3 processes, by tests/test_sharding_{fsdp2,zero}.py (the whole matrix is `slow`)
EXACT_BACKENDS = ("fsdp2", "zero1", "zero2", "zero3")


#: what a ZeRO run of a name with stable weight decay (``adams``, ``*_swd``) needs: the decay is
#: divided by the mean second moment over ALL parameters, and DeepSpeed steps its flat
#: partitions one ``step()`` call at a time (the optimizer refuses otherwise, naming the fix)
STABLE_DECAY_UNDER_ZERO = (
    "one parameter group (ZeRO-3: zero_optimization.sub_group_size above the parameter count): stable "
    "weight decay needs every parameter in one step() call"
)


def sharding_support(name: str) -> dict[str, bool | str]:
    """For an optimizer name, per sharding backend: True when it runs exactly in every setup the
    backend offers, else the condition under which it does (outside it the optimizer raises,
    never steps inexactly). Setups refused for every name are not listed: FSDP1, ZeRO NVMe and
    partial offload, ZenFlow, tensor parallelism, and a loss-driven rule under fp16's GradScaler
    with DeepSpeed. Raises ``ValueError`` for an unknown or invalid name."""
    spec = get_optimizer(name)
    support: dict[str, bool | str] = {backend: True for backend in EXACT_BACKENDS}
    if spec.options.get("weight_decay_mode") == "stable":
        support.update({backend: STABLE_DECAY_UNDER_ZERO for backend in ("zero1", "zero2", "zero3")})
    return support


__all__ = [
    "EXACT_BACKENDS",
    "STABLE_DECAY_UNDER_ZERO",
    "ShardedStats",
    "ShardingError",
    "UnsupportedSharding",
    "sharding_support",
]
