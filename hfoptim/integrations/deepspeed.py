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
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings

from ..core.engine import Engine
from ..distributed.select import UnsupportedSharding
from ..distributed.zero import ZeroLayout, bf16_layout, zero3_layout, zero12_layout

logger = logging.getLogger(__name__)


def _zero_classes() -> tuple:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer


def hfoptim_engine(optimizer) -> Engine | None:
    """The hfoptim Engine inside ``optimizer`` (itself, or inside wrappers such as Lookahead)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, Engine):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def attach(engine_or_optimizer, *, foreach: bool | None = None) -> Engine:
    """Install the exact ZeRO layout on the hfoptim optimizer that DeepSpeed wraps.

    ``engine_or_optimizer``: the DeepSpeedEngine returned by ``deepspeed.initialize`` or its
    ``.optimizer`` (the ZeRO optimizer). Returns the hfoptim optimizer. Raises
    :class:`~hfoptim.distributed.select.UnsupportedSharding` naming the combination for setups
    that cannot be exact, and ``TypeError`` when DeepSpeed does not wrap an hfoptim optimizer.
    """
    DeepSpeedZeroOptimizer, Stage3, BF16 = _zero_classes()
    zero = engine_or_optimizer
    if not isinstance(zero, (DeepSpeedZeroOptimizer, Stage3, BF16)):
        zero = getattr(engine_or_optimizer, "optimizer", None)
    engine = hfoptim_engine(getattr(zero, "optimizer", None))
    if not isinstance(zero, (DeepSpeedZeroOptimizer, Stage3, BF16)):
        inner = hfoptim_engine(zero) or hfoptim_engine(engine_or_optimizer)
        if inner is not None:
            return inner  # no ZeRO partitioning (stage 0 / DDP): parameters are stepped whole
        raise TypeError(f"attach() needs a DeepSpeed engine or ZeRO optimizer, got {type(engine_or_optimizer)}")
    if engine is None:
        wrapped = type(getattr(zero, "optimizer", None)).__name__
        raise TypeError(f"DeepSpeed's {type(zero).__name__} wraps {wrapped}, not an hfoptim optimizer")
    _refuse_unsupported(zero, engine)
    fe = engine.foreach if foreach is None else foreach
    if isinstance(zero, DeepSpeedZeroOptimizer):
        layout = zero12_layout(zero, fe)
    elif isinstance(zero, Stage3):
        layout = zero3_layout(zero, fe)
    else:
        layout = bf16_layout(zero, fe)
    engine.layout = layout
    return engine


def _refuse_unsupported(zero, engine: Engine) -> None:
    name = f"{type(engine).__name__} ({engine.rule.name}) under DeepSpeed {type(zero).__name__}"
    if getattr(zero, "zenflow", False):
        raise UnsupportedSharding(
            f"{name} with ZenFlow: ZenFlow steps part of the parameters with its own CPU optimizer; "
            f"use plain ZeRO-1/2 (zero_optimization without zenflow)"
        )
    if getattr(zero, "swap_optimizer", False):
        raise UnsupportedSharding(
            f"{name} with offload_optimizer.device='nvme': DeepSpeed swaps optimizer state to NVMe by its own "
            f"flat state tensors and would not swap hfoptim's per-parameter state; use offload_optimizer.device='cpu' "
            f"or no optimizer offload"
        )
    if getattr(zero, "backup_optimizer", None) is not None:
        raise UnsupportedSharding(
            f"{name} with offload_optimizer.ratio < 1: DeepSpeed steps the GPU sub-groups with its own AdamW; "
            f"use ratio 1.0 (full CPU offload) or no offload"
        )
    if getattr(zero, "elastic_checkpoint", False):
        raise UnsupportedSharding(
            f"{name} with zero_optimization.elastic_checkpoint=true: elastic checkpoints merge state tensors "
            f"by key across partitions, which does not fit per-parameter state; set elastic_checkpoint=false"
        )
    if getattr(zero, "torch_autocast_gradscaler", None) is not None and engine.rule.needs_loss:
        raise UnsupportedSharding(f"{name}: a loss-driven rule under torch autocast's GradScaler step; use bf16")


def find_and_attach(engine: Engine) -> ZeroLayout | None:
    """Find the DeepSpeed ZeRO optimizer that wraps ``engine`` and attach it (once, at the first
    step when the engine sees flat partitions it was not told about); None if there is none."""
    if "deepspeed" not in sys.modules:
        return None
    try:
        classes = _zero_classes()
    except ImportError:  # pragma: no cover - deepspeed half-installed
        return None
    with warnings.catch_warnings():  # isinstance() on some lazily imported objects warns
        warnings.simplefilter("ignore")
        owners = [
            obj
            for obj in gc.get_objects()
            if isinstance(obj, classes) and hfoptim_engine(getattr(obj, "optimizer", None)) is engine
        ]
    if len(owners) != 1:
        return None
    attach(owners[0])
    logger.info("hfoptim: attached to DeepSpeed %s automatically", type(owners[0]).__name__)
    return engine.layout
