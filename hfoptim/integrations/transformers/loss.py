"""The training loss of each optimizer step, handed to loss-driven optimizers (AdaLo).

The HF Trainer never passes the loss to ``optimizer.step()``, and under DeepSpeed the real step
runs inside ``accelerator.backward`` of the last micro-batch. So the loss is collected where
every mode passes: the tensor given to ``accelerator.backward``. That tensor is already scaled
for gradient accumulation exactly as the Trainer reports it (divided by the number of
micro-batches, or normalized by the token count of the whole step), so the step's loss is the
SUM of those values over the micro-batches of one optimizer step (= the mean micro-batch loss,
or the token-weighted mean when the Trainer counts items). At the last micro-batch, before its
backward (hence before DeepSpeed's step), the sum is averaged over processes and handed to the
optimizer with ``RuleOptimizer.set_loss``; the optimizer's ``step()`` then uses it.
"""

from __future__ import annotations

import torch

from ...core.optimizer import RuleOptimizer

#: attribute names under which wrappers (accelerate, DeepSpeed, Lookahead) keep the optimizer
_WRAPPED = ("optimizer", "base_optimizer", "inner_optimizer", "_optimizer")


def find_engines(optimizer) -> list[RuleOptimizer]:
    """The hfoptim engines inside ``optimizer`` and the wrappers around it."""
    out, seen, stack = [], set(), [optimizer]
    while stack:
        o = stack.pop()
        if o is None or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, RuleOptimizer):
            out.append(o)
            continue
        stack.extend(getattr(o, name, None) for name in _WRAPPED)
    return out


def loss_driven(optimizer) -> list[RuleOptimizer]:
    """The engines in ``optimizer`` whose rule needs the loss."""
    return [e for e in find_engines(optimizer) if e.rule.needs_loss]


class LossHandoff:
    """Sums the micro-batch losses of one optimizer step and hands their mean over processes on."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        #: the last loss handed over (a 0-d fp32 tensor), for logging and tests
        self.last: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        if value.dim() != 0:
            value = value.mean()
        self._sum = value if self._sum is None else self._sum + value

    def hand_to(self, engines: list[RuleOptimizer], accelerator=None) -> torch.Tensor:
        if self._sum is None:
            raise RuntimeError("no micro-batch loss was collected for this optimizer step")
        total, self._sum = self._sum, None
        if accelerator is not None and accelerator.num_processes > 1:
            total = accelerator.reduce(total.clone(), reduction="mean")
        for engine in engines:
            engine.set_loss(total)
        self.last = total
        return total
