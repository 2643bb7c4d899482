"""A callback that puts the optimizer's state memory into the Trainer's logs.

State is created lazily on the first optimizer step, so it is measured at the end of the first
step (``hfoptim.memory.state_bytes``: every tensor the optimizer holds), summed over processes
(each holds its shard under ZeRO / FSDP), written to the Python log at once and added to the next
Trainer log entry (``trainer_state.json``'s ``log_history``, the console and every reporter) as

- ``optimizer_state_bytes``: total bytes of optimizer state, all processes together;
- ``optimizer_state_bytes_per_param``: those bytes per parameter element the optimizer updates.

It also reports steps the optimizer skipped because a gradient was not finite (hfoptim's
``skip_nonfinite``, on by default for compressed state): whenever the count grew since the
last log entry, the entry gets

- ``optimizer_nonfinite_skips``: steps skipped so far in this run (every process skips together,
  so the count is the same on each),

and a warning goes to the Python log. (With fp16 and a GradScaler, a step whose scaled
gradients overflow is skipped by the scaler before the optimizer sees it: the scaler lowers its
scale and the optimizer counts nothing, so no step is counted twice.)

``HFOptimTrainer`` installs it first among the callbacks (so reporters see the values); with a
plain ``Trainer`` use ``trainer.callback_handler.callbacks.insert(0, OptimizerStateCallback())``.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

BYTES_KEY = "optimizer_state_bytes"
PER_PARAM_KEY = "optimizer_state_bytes_per_param"
SKIPS_KEY = "optimizer_nonfinite_skips"


def innermost_optimizer(optimizer):
    """The optimizer under accelerate's and DeepSpeed's wrappers (an hfoptim optimizer, with its
    Lookahead if any, or the built-in one)."""
    from accelerate.optimizer import AcceleratedOptimizer

    o = optimizer
    for _ in range(8):
        inner = getattr(o, "optimizer", None)
        wrapper = isinstance(o, AcceleratedOptimizer) or type(o).__module__.startswith("deepspeed")
        if inner is None or not wrapper:
            break
        o = inner
    return o


def _local_numel(optimizer) -> int:
    total = 0
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            local = getattr(p, "_local_tensor", p)
            total += local.numel()
    return total


def _trainable_numel(model) -> int:
    """Elements of the model's trainable parameters, each once, whole: a DTensor's ``numel()`` and
    a ZeRO-3 parameter's ``ds_numel`` are the whole parameter's."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += int(getattr(p, "ds_numel", p.numel()))
    return total


def measure(optimizer, model=None) -> dict[str, float]:
    """Optimizer-state bytes of this process, summed over processes when distributed; per
    parameter element of ``model``'s trainable parameters (else of the optimizer's groups, summed
    over processes; ZeRO-3 empties those between steps)."""
    from ...memory import state_bytes

    inner = innermost_optimizer(optimizer)
    total = float(state_bytes(inner).total)
    numel = float(_local_numel(inner))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        both = torch.tensor([total, numel], dtype=torch.float64, device=device)
        dist.all_reduce(both)
        total, numel = both.tolist()
    if model is not None:
        numel = float(_trainable_numel(model))
    return {BYTES_KEY: int(total), PER_PARAM_KEY: (total / numel) if numel else 0.0}


class OptimizerStateCallback(TrainerCallback):
    """Logs the optimizer's state bytes (total and per parameter, summed over processes)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] | None = None
        self._pending = False
        self._skips_logged = 0

    def on_step_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.metrics is not None or optimizer is None:
            return
        try:
            self.metrics = measure(optimizer, model)
        except ImportError as error:  # hfoptim.memory not available in this install
            logger.warning("optimizer state bytes not logged: %s", error)
            self.metrics = {}
            return
        self._pending = True
        logger.info(
            "optimizer state: %d bytes (%.3f bytes per parameter), all processes",
            self.metrics[BYTES_KEY],
            self.metrics[PER_PARAM_KEY],
        )

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None:
            return
        entry = {}
        if self._pending:
            entry.update(self.metrics)
            self._pending = False
        skips = nonfinite_skips(optimizer)
        if skips > self._skips_logged:
            logger.warning(
                "the optimizer skipped %d step(s) with non-finite gradients (%d in this run so far)",
                skips - self._skips_logged,
                skips,
            )
            entry[SKIPS_KEY] = skips
            self._skips_logged = skips
        if not entry:
            return
        logs.update(entry)
        if state.log_history:
            state.log_history[-1].update(entry)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.metrics, self._pending = None, False
        self._skips_logged = nonfinite_skips(optimizer)


def nonfinite_skips(optimizer) -> int:
    """Steps the optimizer under the wrappers skipped for non-finite gradients (0 if it never
    skips)."""
    if optimizer is None:
        return 0
    return int(getattr(innermost_optimizer(optimizer), "nonfinite_skips", 0))
