"""Choosing the layout at step time, and refusing what cannot be stepped exactly.

The optimizer is built before the parameters are sharded in the usual HuggingFace flow
(``accelerate`` swaps FSDP2 parameters for DTensors after ``create_optimizer``; DeepSpeed ZeRO
replaces the parameter groups' tensors by flat partitions), so the layout is decided on the
first step, from what the parameter groups hold then:

* DTensor parameters (FSDP2 ``fully_shard``)  -> :class:`~hfoptim.distributed.fsdp2.DTensorLayout`;
* FSDP1 parameters (``_fsdp_flattened``: 1-D views of a FlatParameter) -> error, use FSDP2;
* tensors the optimizer was not built with (DeepSpeed's flat partitions) -> the ZeRO layout of
  the DeepSpeed optimizer that wraps this one (:func:`hfoptim.distributed.zero.attach`,
  found automatically when not called), else an error: never a flat partition stepped as one
  tensor;
* otherwise the parameters are stepped whole, locally.
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from ..core.layout import install_layout_choice
from .fsdp2 import DTensorLayout
from .stats import UnsupportedSharding
from .zero import find_and_attach

__all__ = ["UnsupportedSharding", "layout_for_step"]


FSDP1_MESSAGE = (
    "{name}: parameter {index} of group {group} is a view into an FSDP1 FlatParameter "
    "(FullyShardedDataParallel{orig}): each process holds a 1-D slice that does not respect rows, "
    "and per-tensor statistics (norms, rows/columns, 8-bit blocks) would be computed on the slice. "
    "hfoptim refuses rather than silently change the algorithm. Use FSDP2 instead: "
    "torch.distributed.fsdp.fully_shard(module), or with accelerate `fsdp_version: 2` in the FSDP config."
)

UNKNOWN_MESSAGE = (
    "{name}: parameter group {group} holds a tensor of shape {shape} that the optimizer was not built "
    "with. DeepSpeed ZeRO replaces the parameters by ONE flat partition per group; stepping it as one "
    "tensor would silently change every per-tensor statistic (norms, factored and 8-bit state). "
    "No DeepSpeed ZeRO optimizer wrapping this optimizer was found: after deepspeed.initialize(...), call "
    "hfoptim.integrations.deepspeed.attach(engine) so hfoptim maps the partitions back onto the parameters."
)


def layout_for_step(optimizer, local):
    """The layout ``optimizer`` should step with; ``local`` is its current LocalLayout."""
    name = type(optimizer).__name__
    dtensors = False
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if isinstance(p, DTensor):
                dtensors = True
                continue
            if getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False):
                orig = "" if getattr(p, "_is_flat_param", False) else ", use_orig_params=True"
                raise UnsupportedSharding(FSDP1_MESSAGE.format(name=name, index=i, group=gi, orig=orig))
            known = local.known.get(id(p))
            if known is None or known[0]() is not p:
                layout = find_and_attach(optimizer)
                if layout is None:
                    raise UnsupportedSharding(UNKNOWN_MESSAGE.format(name=name, group=gi, shape=tuple(p.shape)))
                return layout
    if dtensors:
        return DTensorLayout(foreach=local.foreach)
    return local


install_layout_choice(layout_for_step)  # LocalLayout.for_step hands over to it
