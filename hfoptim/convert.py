"""Switching a running job from torch's or bitsandbytes' Adam/AdamW to an hfoptim ``adamw*`` form.

>>> sd = torch.load("optimizer.pt")                       # torch.optim.AdamW(model.parameters())
>>> opt = hfoptim.create_optimizer(model, "adamw_8bit")  # or hfoptim.AdamW(..., state="bf16"), ...
>>> opt.load_state_dict(hfoptim.convert_state_dict(sd, opt))

:func:`convert_state_dict` turns the state dict of

* ``torch.optim.AdamW`` / ``torch.optim.Adam`` (``exp_avg``, ``exp_avg_sq``, ``step``), and
* bitsandbytes' ``AdamW8bit`` / ``AdamW`` / ``Adam8bit`` / ``PagedAdamW8bit`` (``state1``/
  ``state2`` with blockwise ``absmax1``/``absmax2`` and ``qmap1``/``qmap2``, or fp32
  ``state1``/``state2`` for tensors below bitsandbytes' ``min_8bit_size``)

into an hfoptim ``adamw`` state dict with dense fp32 state; ``optimizer.load_state_dict`` then
stores it in the optimizer's own form (8-bit, bf16, factored, ...; see
:mod:`hfoptim.state.convert` for what each form loses). The moments are the same numbers:
bitsandbytes' codes are decoded exactly (``qmap[code] * absmax[block]``).

The hyperparameters come along as torch would restore them: ``lr``, ``betas``, ``eps``,
``weight_decay``, ``maximize``. The weight decay keeps its meaning: torch's ``AdamW`` (and
bitsandbytes' optimizers, which all decay decoupled) -> ``weight_decay_mode="decoupled"``
(``p <- p (1 - lr wd)``, as torch); torch's ``Adam`` with a non-zero ``weight_decay`` ->
``weight_decay_mode="l2"`` (``g + wd p``, as torch). So a converted run continues the source's
update exactly (up to the storage form chosen).

Refused, with the reason: ``amsgrad=True`` (hfoptim's AdamW keeps no ``max_exp_avg_sq``),
bitsandbytes' non-blockwise 8-bit state (``max1``/``new_max1``), bitsandbytes' AdEMAMix
(``alpha`` non-zero: a third state), an optimizer that does not run the ``adamw`` rule, and
parameter groups or counts that do not match the optimizer's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .core.optimizer import PASSTHROUGH_GROUP_KEYS, STATE_DICT_TAG, RuleOptimizer
from .state.convert import STATE_FORMAT

#: what torch's Adam/AdamW keep in a parameter group and hfoptim takes over
TORCH_HYPERPARAMS = ("lr", "betas", "eps", "weight_decay", "maximize")
#: torch's execution options: they choose kernels, not the update; not carried over
TORCH_RUN_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable", "amsgrad", "decoupled_weight_decay"})
#: bitsandbytes' group keys with no effect on Adam/AdamW's update at their default values
BNB_DEFAULTS = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}
#: bitsandbytes keeps its quantization state under this key in ``state_dict()``
BNB_WRAPPED = "__bnb_optimizer_quant_state__"

#: block sizes bitsandbytes' blockwise quantization uses (256 for its 8-bit optimizers)
BNB_BLOCKSIZES = (256, 64, 128, 512, 1024, 2048, 4096)

SOURCES = ("torch_adamw", "torch_adam", "bitsandbytes")


def convert_state_dict(
    state_dict: dict[str, Any], optimizer: RuleOptimizer, source: str | None = None
) -> dict[str, Any]:
    """A state dict that ``optimizer.load_state_dict`` loads, from a torch or bitsandbytes
    Adam/AdamW state dict (see the module docstring).

    Args:
        state_dict: the source optimizer's ``state_dict()`` over the same parameters, in the same
            order and groups as ``optimizer``'s.
        optimizer: an hfoptim optimizer running the ``adamw`` rule (``hfoptim.AdamW``, or
            ``create_optimizer(..., "adamw_8bit")`` and the other ``adamw*`` names), any storage
            form.
        source: ``"torch_adamw"``, ``"torch_adam"`` or ``"bitsandbytes"``; by default found from
            the state dict (torch's groups say ``decoupled_weight_decay``; a torch state dict
            without it and with a non-zero weight decay is ambiguous and needs ``source``).
    """
    if not isinstance(optimizer, RuleOptimizer) or optimizer.rule.name != "adamw":
        raise ValueError(
            f"convert_state_dict converts Adam/AdamW state into an hfoptim adamw optimizer (hfoptim.AdamW or an "
            f"'adamw*' name); got {type(optimizer).__name__}"
        )
    if STATE_DICT_TAG in state_dict:
        raise ValueError(
            "this state_dict was saved by hfoptim: load it with optimizer.load_state_dict directly (it converts "
            "between storage forms itself)"
        )
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown source={source!r}; expected one of {', '.join(SOURCES)}")
    groups, states = state_dict["param_groups"], state_dict["state"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer {len(optimizer.param_groups)}")
    source = source or detect_source(state_dict)
    params = {}
    new_groups = []
    for gi, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {gi}: state_dict has {len(saved['params'])} parameters, the optimizer "
                f"{len(group['params'])}"
            )
        params.update(zip(saved["params"], group["params"]))
        new_groups.append(_group(gi, saved, group, source))
    new_states = {}
    for pid, pstate in states.items():
        p = params.get(pid)
        if p is None:
            raise ValueError(f"state_dict has state for unknown parameter id {pid!r}")
        new_states[pid] = _param_state(pid, pstate, p, source)
    shapes = {pid: list(p.shape) for pid, p in params.items()}
    return {
        "state": new_states,
        "param_groups": new_groups,
        STATE_DICT_TAG: {"rule": "adamw", "format": STATE_FORMAT, "shapes": shapes, "converted_from": source},
    }


def detect_source(state_dict: dict[str, Any]) -> str:
    """``"bitsandbytes"``, ``"torch_adamw"`` or ``"torch_adam"`` from what the state dict keeps."""
    groups = state_dict["param_groups"]
    for pstate in state_dict["state"].values():
        if BNB_WRAPPED in pstate or "state1" in pstate:
            return "bitsandbytes"
    if any(key in g for g in groups for key in BNB_DEFAULTS):
        return "bitsandbytes"
    decoupled = {g.get("decoupled_weight_decay") for g in groups}
    if decoupled == {True}:
        return "torch_adamw"
    if decoupled == {False}:
        return "torch_adam"
    if all(g.get("weight_decay", 0) == 0 for g in groups):
        return "torch_adam"  # without weight decay the two are the same update
    raise ValueError(
        "cannot tell whether this state_dict is torch.optim.Adam's (L2 weight decay) or AdamW's (decoupled): its "
        "groups lack 'decoupled_weight_decay'. Pass source='torch_adam' or source='torch_adamw'"
    )


def _group(index: int, saved: dict, group: dict, source: str) -> dict:
    """The hfoptim parameter group: the optimizer's options, the source's hyperparameters."""
    where = f"parameter group {index} of the {source} state_dict"
    if saved.get("amsgrad"):
        raise ValueError(
            f"{where} runs AMSGrad (amsgrad=True): hfoptim's AdamW keeps no max_exp_avg_sq. Continue with the "
            f"source optimizer, or start hfoptim's state fresh (do not load this state_dict)"
        )
    if source == "bitsandbytes":
        for key, default in BNB_DEFAULTS.items():
            if saved.get(key, default) != default:
                raise ValueError(
                    f"{where} has {key}={saved[key]!r}: bitsandbytes' AdEMAMix, not Adam/AdamW; use "
                    f"hfoptim.AdEMAMix and start its state fresh"
                )
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in saved]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    out = {k: v for k, v in group.items() if k != "params"}
    out.update({k: saved[k] for k in TORCH_HYPERPARAMS if k in saved})
    out["betas"] = tuple(float(b) for b in saved["betas"])
    out["weight_decay_mode"] = "l2" if source == "torch_adam" and saved["weight_decay"] != 0 else "decoupled"
    out["state"] = "fp32"  # what this dict holds; load_state_dict encodes it into the optimizer's form
    out.update({k: saved[k] for k in PASSTHROUGH_GROUP_KEYS if k in saved and k != "params"})
    out["params"] = list(saved["params"])
    return out


def _param_state(pid, pstate: dict, p: torch.Tensor, source: str) -> dict:
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    step = pstate.get("step")
    if step is None:
        raise ValueError(f"state_dict entry for parameter {pid!r} has no 'step'")
    step = torch.tensor(float(step.item() if isinstance(step, torch.Tensor) else step), dtype=torch.float32)
    if source == "bitsandbytes":
        m, v = _bnb_moments(pid, pstate, p)
    else:
        if "max_exp_avg_sq" in pstate:
            raise ValueError(f"state_dict entry for parameter {pid!r} holds AMSGrad's max_exp_avg_sq: not convertible")
        try:
            m, v = pstate["exp_avg"], pstate["exp_avg_sq"]
        except KeyError as error:
            raise ValueError(
                f"state_dict entry for parameter {pid!r} has keys {sorted(pstate)}, not torch Adam's "
                f"exp_avg/exp_avg_sq (missing {error})"
            ) from None
    for name, x in (("exp_avg", m), ("exp_avg_sq", v)):
        if tuple(x.shape) != tuple(p.shape):
            raise ValueError(
                f"state_dict {name} of parameter {pid!r} has shape {tuple(x.shape)}, the parameter {tuple(p.shape)}"
            )
    return {"step": step, "exp_avg": m.to(dtype=dtype, copy=True), "exp_avg_sq": v.to(dtype=dtype, copy=True)}


def _bnb_moments(pid, pstate: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' two states, decoded: fp32 ``state1``/``state2`` as they are, blockwise
    8-bit ones as ``qmap[code] * absmax[block]`` over the flattened tensor."""
    state = {**pstate, **pstate.get(BNB_WRAPPED, {})}
    if "max1" in state or "new_max1" in state:
        raise ValueError(
            f"state_dict entry for parameter {pid!r} holds bitsandbytes' non-blockwise 8-bit state (max1/new_max1): "
            f"not convertible; resume with bitsandbytes, or save it with block_wise=True"
        )
    try:
        return tuple(_bnb_decode(state, i, p) for i in (1, 2))
    except KeyError as error:
        raise ValueError(
            f"state_dict entry for parameter {pid!r} has keys {sorted(state)}: not bitsandbytes' Adam state "
            f"(missing {error})"
        ) from None


def _bnb_decode(state: dict, i: int, p: torch.Tensor) -> torch.Tensor:
    codes = state[f"state{i}"]
    if codes.dtype != torch.uint8:
        return codes.float()
    absmax, qmap = state[f"absmax{i}"].float().reshape(-1), state[f"qmap{i}"].float().to(codes.device)
    n = codes.numel()
    fits = [b for b in BNB_BLOCKSIZES if math.ceil(n / b) == absmax.numel()]
    if not fits:
        raise ValueError(
            f"bitsandbytes state{i} of {n} elements has {absmax.numel()} block scales: no block size of "
            f"{', '.join(map(str, BNB_BLOCKSIZES))} fits"
        )
    blocksize = fits[0]
    values = qmap[codes.reshape(-1).long()]
    scales = absmax.repeat_interleave(blocksize)[:n].to(values.device)
    return (values * scales).reshape(p.shape)
