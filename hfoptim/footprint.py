"""Per-device training memory under a parallelism strategy: parameters, gradients, fp32 master
weights and optimizer state, for a model known only by its config.

The optimizer-state bytes come from :func:`hfoptim.memory.estimate`: the optimizer is built
over the model's parameters on the ``meta`` device and each codec lays out its tensors there, so
8-bit codes and scales, factored rows and columns, sign bits and counters are counted as a real
step allocates them, without allocating anything. The strategy then says how each part is
divided among devices (``P`` trainable parameters, ``N`` devices, ``S`` the optimizer state of
the whole model):

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
partition). (*) ZeRO-3 keeps a separate fp32 master only under bf16/fp16. (**) FSDP2's fp32
parameter shards are the master weights.

ZeRO-3 also gathers each layer's full parameters for its forward and backward: counted as
DeepSpeed's estimator counts it, ``4 L`` bytes for the largest layer (``L`` its parameters, the
most any one module holds directly). Against
``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` (no offload:
``18 P / N + 4 L``), mixed-precision AdamW here is ``20 P / N + 4 L``: the same 18 as its ZeRO-2
estimator (2 for the 16-bit gradient partition, 4 for the fp32 gradient of the step, 4 for the
fp32 master, 8 for the moments) plus the 16-bit partition of the parameters themselves
(``ds_tensor``, 2 bytes per parameter / N), which ZeRO-3 keeps on the device and DeepSpeed's
ZeRO-3 estimator leaves out. ``hfoptim memory`` prints DeepSpeed's number next to this one.
Activations and communication buckets are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .memory import estimate

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
PRECISIONS = ("no", "bf16", "fp16")


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
    gathered: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.grad_partition + self.master + self.state + self.gathered

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
    largest_layer: int = 0,
) -> Footprint:
    """Per-device memory for ``num_params`` trainable parameters whose optimizer state is
    ``state_total`` bytes, under ``strategy`` (see the module docstring); ``largest_layer``: the
    parameters of the largest layer, gathered whole under ZeRO-3."""
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
        if stage == 3:
            f.gathered = 4 * largest_layer
            deepspeed = 18 * p // n + 4 * largest_layer
            f.notes.append(
                f"DeepSpeed's own estimator (estimate_zero3_model_states_mem_needs, which assumes 16-bit weights "
                f"and Adam) gives 18 B/param / N + 4 B x the largest layer ({largest_layer:,} params) = "
                f"{deepspeed:,} bytes per device. Its 18 is the count of its ZeRO-2 estimator (16-bit gradient 2, "
                f"fp32 gradient 4, fp32 master 4, Adam moments 8); this table adds the 16-bit parameter partition "
                f"ZeRO-3 keeps on each device (2 B/param / N)"
            )
    return f


# ---------------------------------------------------------------------------------------- models
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
    layer = largest_layer(model)
    out = []
    for name in optims:
        state = estimate(model, name, **(options or {})).total  # by role for Muon
        out.append(footprint(name, num, state, strategy, world_size, mixed_precision, layer))
    return out


def largest_layer(model: torch.nn.Module) -> int:
    """The most trainable parameters one module holds directly (DeepSpeed's ``model_to_params``
    counts the same per module): the largest set ZeRO-3 gathers whole."""
    sizes = [sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad) for m in model.modules()]
    return max(sizes, default=0)
