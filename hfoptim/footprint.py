"""Per-device training memory under a parallelism strategy: parameters, gradients, fp32 master
weights and optimizer state, for a model known only by its config.

The optimizer-state bytes come from the optimizer itself: it is built over the model's parameters
on the ``meta`` device and stepped once there, so every codec (8-bit codes and scales, factored
rows and columns, sign bits, counters) is counted exactly as a real step would allocate it,
without allocating anything. The strategy then says how each part is divided among devices
(``P`` trainable parameters, ``N`` devices, ``S`` the optimizer state of the whole model):

============  ==========  ==========  ===============  ==============  ===============
strategy      parameters  gradients   fp32 grad part.  fp32 master     optimizer state
============  ==========  ==========  ===============  ==============  ===============
ddp           4P          4P          --               --              S
zero1         bP          bP          4P / N           4P / N          S / N
zero2         bP          bP / N      4P / N           4P / N          S / N
zero3         bP / N      bP / N      4P / N           4P / N (*)      S / N
fsdp (FSDP2)  4P / N      4P / N      --               -- (**)         S / N
============  ==========  ==========  ===============  ==============  ===============

``b`` is 2 under DeepSpeed with bf16/fp16 mixed precision, else 4 (DDP and FSDP2 mixed precision
keep fp32 parameters and cast for compute). This follows DeepSpeed's code and its own estimator:
ZeRO-1/2 keep an fp32 clone of their partition of the weights (even in fp32 runs) and an fp32
gradient partition for the step, so mixed-precision AdamW under ZeRO-2 is ``2P + 18P/N`` exactly
as ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` counts it
(2 + 2 + 12 bytes per parameter on one device, as in the ZeRO paper, plus the 4-byte gradient
partition). (*) ZeRO-3 keeps a separate fp32 master only under bf16/fp16. Unlike DeepSpeed's ZeRO-3
estimator this counts the 16-bit gradient partition buffer (``grad_partitions_flat_buffer``) and
not the largest layer's gather buffer. (**) FSDP2's fp32 parameter shards are the master weights.
Activations, temporary all-gathers and communication buckets are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
PRECISIONS = ("no", "bf16", "fp16")


# ---------------------------------------------------------------------------------------- state
def _walk_tensors(obj, seen: set[int]) -> int:
    total = 0
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in seen:
            seen.add(key)
            total += obj.numel() * obj.element_size()
    elif isinstance(obj, dict):
        for value in obj.values():
            total += _walk_tensors(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            total += _walk_tensors(value, seen)
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor an optimizer keeps as state (and those of optimizers it wraps:
    accelerate's ``AcceleratedOptimizer``, Lookahead), parameters excluded.

    Uses :func:`hfoptim.memory.state_bytes` when it is available."""
    try:
        from .memory import state_bytes  # the state issue's walker, once it exists
    except ImportError:
        state_bytes = None
    if state_bytes is not None:
        report = state_bytes(optimizer)
        return int(getattr(report, "total", report))
    seen: set[int] = set()
    total = 0
    current, visited = optimizer, set()
    while current is not None and id(current) not in visited:
        visited.add(id(current))
        state = getattr(current, "state", None)
        if isinstance(state, dict):
            total += _walk_tensors(dict(state), seen)
        current = getattr(current, "optimizer", None)
    return total


def estimate_state_bytes(params: Iterable[torch.Tensor], optim: str, **options) -> int:
    """Bytes of the state that ``hfoptim.create_optimizer(params, optim, **options)`` allocates,
    computed by one step on ``meta`` copies of ``params`` (shapes and dtypes only).

    Uses :func:`hfoptim.memory.estimate` (each codec's ``init`` on meta tensors) when it is
    available. Otherwise: a parameter's state depends only on its own shape and dtype (and the
    options), so each distinct (shape, dtype) is stepped once and counted as often as it occurs
    (a 7B-parameter model has a handful of distinct shapes)."""
    from .registry import get_optimizer

    params = list(params)
    try:
        from .memory import estimate
    except ImportError:  # before the state work's memory module
        estimate = None
    if estimate is not None:
        return int(estimate(params, optim, **options).total)
    spec = get_optimizer(optim)
    counts: dict[tuple, int] = {}
    for p in params:
        key = (tuple(p.shape), p.dtype)
        counts[key] = counts.get(key, 0) + 1
    total = 0
    for (shape, dtype), count in counts.items():
        q = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
        q.grad = torch.empty_like(q)
        optimizer = spec([q], **options)
        if getattr(getattr(optimizer, "rule", None), "needs_loss", False):
            optimizer.step(loss=1.0)
        else:
            optimizer.step()
        total += count * optimizer_state_bytes(optimizer)
    return total


def state_bytes_per_param(optim: str, shape: tuple[int, ...] = (4096, 4096), **options) -> float:
    """Optimizer-state bytes per parameter for one tensor of ``shape`` (default a large matrix)."""
    p = torch.empty(shape, device="meta")
    return estimate_state_bytes([p], optim, **options) / math.prod(shape)


# ---------------------------------------------------------------------------------------- strategy
@dataclass
class Footprint:
    """Bytes per device for one optimizer under one strategy."""

    optim: str
    strategy: str
    world_size: int
    mixed_precision: str
    num_params: int
    state_total: int
    params: int = 0
    grads: int = 0
    grad_partition: int = 0
    master: int = 0
    state: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.grad_partition + self.master + self.state

    @property
    def state_per_param(self) -> float:
        """Optimizer state of the whole model per trainable parameter (no sharding)."""
        return self.state_total / max(self.num_params, 1)


def _ceil_div(a: int, n: int) -> int:
    return -(-a // n)


def footprint(
    optim: str,
    num_params: int,
    state_total: int,
    strategy: str = "ddp",
    world_size: int = 1,
    mixed_precision: str = "no",
) -> Footprint:
    """Per-device memory for ``num_params`` trainable parameters whose optimizer state is
    ``state_total`` bytes, under ``strategy`` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; choose from {', '.join(PRECISIONS)}")
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    n, p = world_size, num_params
    half = mixed_precision != "no"
    b = 2 if (strategy.startswith("zero") and half) else 4
    f = Footprint(optim, strategy, n, mixed_precision, p, state_total)
    if strategy == "ddp":
        f.params, f.grads, f.state = p * b, p * b, state_total
        if half:
            f.notes.append("DDP mixed precision: fp32 parameters and gradients, bf16/fp16 autocast for compute")
    elif strategy == "fsdp":
        f.params, f.grads, f.state = _ceil_div(4 * p, n), _ceil_div(4 * p, n), _ceil_div(state_total, n)
        f.notes.append("FSDP2: fp32 parameter shards are the master weights; all-gathered layers not counted")
    else:
        stage = int(strategy[-1])
        f.params = _ceil_div(p * b, n) if stage == 3 else p * b
        f.grads = _ceil_div(p * b, n) if stage >= 2 else p * b
        f.grad_partition = _ceil_div(4 * p, n)
        f.master = _ceil_div(4 * p, n) if (stage < 3 or half) else 0
        f.state = _ceil_div(state_total, n)
        if stage < 3 and not half:
            f.notes.append("ZeRO-1/2 keep an fp32 clone of each weight partition even in fp32 runs")
    return f


# ---------------------------------------------------------------------------------------- models
def model_on_meta(name_or_path: str, trust_remote_code: bool = False):
    """A model built from its config on the meta device: ``"tiny-llama"``, a local folder with a
    ``config.json`` or a hub name (the config is read, no weights are downloaded)."""
    from .embedded import TINY_LLAMA, load_config, model_from_config

    kwargs = {} if name_or_path == TINY_LLAMA else {"trust_remote_code": trust_remote_code}
    config = load_config(name_or_path, **kwargs)
    return model_from_config(config, device="meta")


def trainable_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """Trainable parameters, each once (tied weights counted once)."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def compare(
    model: torch.nn.Module,
    optims: list[str],
    strategy: str = "ddp",
    world_size: int = 1,
    mixed_precision: str = "no",
    options: dict | None = None,
) -> list[Footprint]:
    """One :class:`Footprint` per optimizer name for ``model``'s trainable parameters."""
    params = trainable_parameters(model)
    num = sum(p.numel() for p in params)
    out = []
    for name in optims:
        state = estimate_state_bytes(params, name, **(options or {}))
        out.append(footprint(name, num, state, strategy, world_size, mixed_precision))
    return out
