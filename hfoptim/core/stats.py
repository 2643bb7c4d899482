"""Per-tensor statistics: the one place where rules and modifiers reduce over a tensor.

Every norm, mean, row or column sum that a rule or modifier needs is computed here, over the
*whole* parameter. On one process that is the local tensor. The sharding layer replaces
:class:`LocalStats` with a backend that combines the partial sums of all shards in one batched
all-reduce, so no statistic is ever computed on a shard as if it were the tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamView:
    """What this process holds of one parameter: on one process, all of it."""

    global_shape: torch.Size

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @classmethod
    def of(cls, p: torch.Tensor) -> ParamView:
        return cls(global_shape=p.shape)


class LocalStats:
    """Statistics for tensors that are held whole by this process."""

    def __init__(self, foreach: bool = True):
        self.foreach = foreach

    def sum_sq(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[torch.Tensor]:
        """Sum of squares of each tensor, as 0-d tensors."""
        if self.foreach and tensors:
            norms = torch._foreach_norm(tensors)
            return [n * n for n in norms]
        return [t.square().sum() for t in tensors]

    def norm(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[torch.Tensor]:
        """L2 norm of each tensor, as 0-d tensors."""
        if self.foreach and tensors:
            return list(torch._foreach_norm(tensors))
        return [torch.linalg.vector_norm(t) for t in tensors]

    def sum(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[torch.Tensor]:
        """Sum of each tensor, as 0-d tensors."""
        return [t.sum() for t in tensors]

    def row_sum(self, tensor: torch.Tensor, view: ParamView) -> torch.Tensor:
        """Sums over every dimension but the first: shape ``(rows,)``."""
        return tensor.reshape(tensor.shape[0], -1).sum(dim=1)

    def row_sum_sq(self, tensor: torch.Tensor, view: ParamView) -> torch.Tensor:
        """Sums of squares over every dimension but the first: shape ``(rows,)``."""
        return tensor.reshape(tensor.shape[0], -1).square().sum(dim=1)

    def col_sum(self, matrix: torch.Tensor, view: ParamView) -> torch.Tensor:
        """Sums over the first dimension of a 2-D view: shape ``(cols,)``."""
        return matrix.sum(dim=0)
