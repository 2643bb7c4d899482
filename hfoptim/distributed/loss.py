"""The loss a loss-driven rule (AdaLo, ...) sees under data parallelism: the mean over the
data-parallel processes, so every process takes the same step size."""

from __future__ import annotations

import torch
import torch.distributed as dist


def mean_over(loss: float, group=None) -> float:
    """Mean of ``loss`` over ``group`` (None: the default group), in float64, one all-reduce."""
    if not dist.is_available() or not dist.is_initialized():
        return loss
    size = dist.get_world_size(group)
    if size == 1:
        return loss
    buf = torch.tensor([loss], dtype=torch.float64)
    backend = dist.get_backend(group)
    if backend == "nccl":
        buf = buf.cuda()
    dist.all_reduce(buf, group=group)
    return float(buf.item()) / size
