"""DeepSpeed ZeRO with an hfoptim optimizer as the client optimizer, exactly.

DeepSpeed replaces the optimizer's parameters by flat fp32 partitions. :func:`attach` reads
DeepSpeed's partition bookkeeping and installs the layout that maps every flat partition back
onto the parameters' segments (:mod:`hfoptim.distributed.zero`), so per-tensor statistics,
factored/SMMF/8-bit state and per-parameter step counts are those of the whole parameters::

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=hfoptim_optimizer, config=cfg)
    hfoptim.integrations.deepspeed.attach(engine)

If you forget, the optimizer finds the DeepSpeed ZeRO optimizer that wraps it on its first step
and attaches itself (:func:`find_and_attach`); if it cannot, it raises instead of stepping a flat
partition as one tensor. Supported: ZeRO-1, ZeRO-2, the bf16 stage-1 optimizer, ZeRO-3, and
ZeRO-1/2/3 with the optimizer offloaded to CPU memory. Refused (error at attach): optimizer state
swapped to NVMe, ZeRO-3 partial offload (a second, DeepSpeed-owned optimizer steps part of the
sub-groups), ZenFlow, and ZeRO-1/2 "elastic" checkpoints (they merge state tensors by key).

Set ``gradient_clipping`` in the DeepSpeed config explicitly: DeepSpeed 0.19 clips at 1.0 by
default.

The code lives in :mod:`hfoptim.distributed.zero` (the layouts, :func:`attach`,
:func:`find_and_attach`), the layer below, which the optimizer's step-time layout choice uses
without importing upward; this module is the documented entry point.
"""

from ..distributed.checkpoint import hfoptim_engine
from ..distributed.zero import attach, find_and_attach

__all__ = ["attach", "find_and_attach", "hfoptim_engine"]
