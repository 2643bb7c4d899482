"""Saving and resharding the optimizer state of sharded parameters.

**FSDP2 / torch.distributed.checkpoint.** A process keeps the state of its shard as local
tensors; ``state_dict()`` exports it in a form DCP can save and reshard (e.g. saved by 2
processes, loaded by 3), and ``load_state_dict()`` takes it back:

* stored tensors whose first dimension follows the parameter's rows (dense moments, 8-bit codes
  and per-row scales of matrices, factored/shared row statistics) become DTensors with the
  parameter's placement, as ``(global rows, per-row size)`` when a row holds several entries;
* tensors that do not depend on the shard (column statistics, per-tensor scalars, the step
  count) stay plain tensors (DCP saves them once);
* tensors that are neither (SMMF's factors of the flattened tensor, sign bits, the 8-bit scales
  of a vector whose blocks a boundary cuts) are replaced by the DECODED slot as a DTensor under
  ``"<slot>.decoded"`` (``Codec.export_value``) and encoded again on load for the new shards
  (8-bit and 4-bit: the same codes and scales; SMMF: the same factors to float rounding).

The decisions come from the codec's ``shapes()`` evaluated for shards of 1, 2 and 5 rows, so a
new codec is handled without code here. The hfoptim tag (rule, parameter shapes) is also copied
into each parameter group, because DCP keeps only ``state`` and ``param_groups``.

DCP's ``get_optimizer_state_dict`` creates missing state by stepping with zero gradients and
``lr=0``; :func:`init_state` creates it without a step (a loss-driven rule could not take that
step), and :func:`get_state_dict` / :func:`set_state_dict` call it before DCP.

**DeepSpeed ZeRO.** The per-segment state is saved by DeepSpeed's own checkpoint (each process's
``optimizer.state_dict()``); loading validates every segment's keys and shapes and keeps the
dtypes it was saved with.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from ..core.layout import transposed_view
from ..core.optimizer import RuleOptimizer
from ..core.stats import ParamView
from ..state import convert, resolve

TAG = "hfoptim"
GROUP_TAG = "hfoptim_tag"
DECODED = ".decoded"
#: shard sizes (rows) the codecs' shapes are evaluated for: small primes, a multiple of 8 (bit
#: packing), more than one 8-bit block (256) of a vector
_PROBE_ROWS = (1, 2, 3, 8, 13, 257, 1031)


# ---------------------------------------------------------------------- classification
def _probe_view(view: ParamView, rows: int) -> ParamView:
    return ParamView(view.global_shape, row_start=0, local_rows=rows, cuts=view.cuts, group=view.group)


def key_kinds(optimizer, group: dict, view: ParamView, p: torch.Tensor) -> dict[str, tuple]:
    """For every stored key of a sharded parameter ``p``, with the slot it belongs to:
    ``("rows", slot, per_row_shape)`` (the tensor is ``(rows, *per_row_shape)`` up to a reshape),
    ``("replicated", slot)`` or ``("local", slot)``. The state of a parameter stepped as a batch of
    matrices (fused experts) is stacked per matrix: every key, the step counter too, follows rows."""
    kinds: dict[str, tuple] = {"step": ("replicated", None)}
    probes = [optimizer.expected_state_shapes(p, group, _probe_view(view, rows)) for rows in _PROBE_ROWS]
    for slot in [None, *optimizer.rule.active_slots(group)]:
        keys = ["step"] if slot is None else [k for k in probes[0] if k == slot.name or k.startswith(slot.name + ".")]
        for key in keys:
            sizes = [math.prod(q[key]) for q in probes]
            shapes = [tuple(q[key]) for q in probes]
            if len(set(shapes)) == 1:
                kinds[key] = ("replicated", slot)
            elif all(s == sizes[0] * r for s, r in zip(sizes, _PROBE_ROWS)) and all(len(s) >= 1 for s in shapes):
                one = shapes[0]
                kinds[key] = ("rows", slot, one[1:] if one[0] == 1 else (sizes[0],))
            else:
                kinds[key] = ("local", slot)
    return kinds


def state_view(optimizer, group: dict, p: torch.Tensor, view: ParamView) -> tuple[ParamView, torch.Tensor | None]:
    """The view of the part of ``p`` whose state this process keeps, and the parameter whose layout
    shapes that state (None: a matrix of its own). A sharded ``Conv1D`` weight stepped through its
    canonical view keeps state for whole output units (:func:`hfoptim.core.layout.transposed_view`,
    split like ``Shard(0)`` of the ``(out, in)`` matrix): its state is exported as DTensors of the
    canonical shape, which DCP reshards like any row-sharded state."""
    layout = optimizer.layout_of(p)
    if view.sharded and layout.transposed and not layout.batch:
        if optimizer.stepped_as(group, layout, view.global_shape) is not None:
            return transposed_view(view), None
    return view, p


def _dtensor_like(p: DTensor, local: torch.Tensor, global_rows: int) -> DTensor:
    shape = torch.Size((global_rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


def _params_by_id(optimizer, state_dict) -> dict:
    out = {}
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
        for pid, p in zip(saved["params"], group["params"]):
            out[pid] = (p, group)
    return out


# ---------------------------------------------------------------------- FSDP2 export / import
def export_dtensor_state(layout, optimizer, state_dict: dict) -> dict:
    """``state_dict`` with the state of DTensor parameters in DCP's form (module docstring)."""
    params = _params_by_id(optimizer, state_dict)
    stats = layout.stats
    for pid in sorted(state_dict["state"], key=str):
        p, group = params[pid]
        view = layout.view(p) if isinstance(p, DTensor) else None
        if view is None or not view.sharded:
            continue
        pstate = state_dict["state"][pid]
        view, shaped = state_view(optimizer, group, p, view)
        kinds = key_kinds(optimizer, group, view, shaped)
        out = {}
        decoded_slots = []  # slots with a tensor that is neither per-row nor shard-independent
        for kind in kinds.values():
            if kind[0] == "local" and kind[1] not in decoded_slots:
                decoded_slots.append(kind[1])
        for key, value in pstate.items():
            kind = kinds.get(key, ("replicated", None))
            if kind[1] is not None and kind[1] in decoded_slots:
                continue
            if not isinstance(value, torch.Tensor) or kind[0] == "replicated":
                out[key] = value
            else:
                out[key] = _dtensor_like(p, value.reshape(view.rows, *kind[2]), view.global_rows)
        for slot in decoded_slots:
            codec = resolve.codec_for(optimizer.rule, slot, group, view)
            dtype = optimizer.compute_dtype(p._local_tensor)
            value = codec.export_value(slot, pstate, view, dtype, stats=stats).reshape(view.local_shape)
            if len(view.global_shape) == 0:
                out[slot.name + DECODED] = value
            else:
                out[slot.name + DECODED] = _dtensor_like(p, value.contiguous(), view.global_rows)
        state_dict["state"][pid] = out
    tag = state_dict.get(TAG)
    if tag is not None:
        for g in state_dict["param_groups"]:
            g[GROUP_TAG] = tag
    return state_dict


def _local(value):
    return value.to_local() if isinstance(value, DTensor) else value


def import_dtensor_state(layout, optimizer, state_dict: dict) -> dict:
    """The inverse of :func:`export_dtensor_state`, for the shards of this run (which may differ
    from the run that saved): local tensors in the shapes the codecs keep, decoded slots encoded
    again. DCP may hand back state without the top-level hfoptim tag; the copy in the parameter
    groups is used then."""
    groups = state_dict["param_groups"]
    if TAG not in state_dict and groups and all(GROUP_TAG in g for g in groups):
        state_dict[TAG] = groups[0][GROUP_TAG]
    for g in groups:
        g.pop(GROUP_TAG, None)
    # the saved tensors are upgraded here, where the shards' views are known (the decoded slots
    # are encoded in this version's format): the tag says so to the optimizer's load
    fmt = convert.saved_format(state_dict[TAG]) if TAG in state_dict else convert.STATE_FORMAT
    if TAG in state_dict:
        state_dict[TAG] = {**state_dict[TAG], "format": convert.STATE_FORMAT}
    params = _params_by_id(optimizer, state_dict)
    for pid in sorted(state_dict["state"], key=str):
        if pid not in params:
            continue  # the engine reports unknown ids
        p, group = params[pid]
        pstate = state_dict["state"][pid]
        view = layout.view(p) if isinstance(p, DTensor) else None
        saved_group = next((s for s, g in zip(groups, optimizer.param_groups) if g is group), group)
        options = {k: v for k, v in saved_group.items() if k in optimizer._spec}
        merged = {**group, **options}
        if view is None or not view.sharded:
            local = {k: _local(v) for k, v in pstate.items()}
            if fmt < convert.STATE_FORMAT:
                local = convert.upgrade_param_state(optimizer.rule, local, merged, optimizer.param_view(p), fmt)
            state_dict["state"][pid] = local
            continue
        view, shaped = state_view(optimizer, merged, p, view)
        expected = optimizer.expected_state_shapes(shaped, merged, view)
        out = {}
        for key, value in pstate.items():
            if key.endswith(DECODED):
                continue
            local = _local(value)
            if isinstance(local, torch.Tensor) and key in expected and local.numel() == math.prod(expected[key]):
                local = local.reshape(expected[key])
            out[key] = local
        out = convert.upgrade_param_state(optimizer.rule, out, merged, view, fmt)
        for key, value in pstate.items():
            if not key.endswith(DECODED):
                continue
            name = key[: -len(DECODED)]
            slot = next((s for s in optimizer.rule.active_slots(merged) if s.name == name), None)
            if slot is None:
                raise ValueError(
                    f"state_dict entry {key!r} for parameter {pid}: {optimizer.rule.name} has no slot {name!r}"
                )
            codec = resolve.codec_for(optimizer.rule, slot, merged, view)
            local = _local(value).reshape(view.local_shape)
            dtype = optimizer.compute_dtype(p._local_tensor)
            out.update(codec.init(slot, local.to(dtype), view, stats=layout.stats))
        state_dict["state"][pid] = out
    return state_dict


# ---------------------------------------------------------------------- state without a step
def hfoptim_engine(optimizer) -> RuleOptimizer | None:
    """The hfoptim RuleOptimizer inside ``optimizer`` (itself, or inside wrappers such as Lookahead)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, RuleOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return None


def init_state(optimizer) -> None:
    """Create the state of every parameter (step 0) without stepping, under whatever layout the
    parameters need (FSDP2 shards, ZeRO segments); collectives run in the same order on every
    process. Call it on every process before ``torch.distributed.checkpoint`` loads into a
    fresh optimizer (or use :func:`set_state_dict`)."""
    engine = hfoptim_engine(optimizer)
    engine.layout = engine.layout.for_step(engine)
    layout = engine.layout
    for gi, group in enumerate(engine.param_groups):
        for unit in engine._canonical(gi, group, layout.units_without_grad(engine, group)):
            engine._init_state(unit, group)


def get_state_dict(model, optimizer, **options) -> dict:
    """``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` without its
    zero-gradient initialization step (see :func:`init_state`)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    init_state(optimizer)
    return get_optimizer_state_dict(model, optimizer, **options)


def set_state_dict(model, optimizer, optim_state_dict: dict, **options) -> None:
    """``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` without its
    zero-gradient initialization step (see :func:`init_state`)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    init_state(optimizer)
    set_optimizer_state_dict(model, optimizer, optim_state_dict, **options)
