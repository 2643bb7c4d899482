r"""Converting a parameter's stored state from one storage form to another.

A resume with another ``state=`` than the checkpoint's (``adamw`` saved, ``adamw_8bit`` asked,
or the reverse) keeps what the user asks for now: each slot is decoded with the codec it was
saved with and encoded again with the codec the current options choose,

.. math::
    \mathrm{stored}' = \mathrm{encode}_{\mathrm{new}}\big(\mathrm{decode}_{\mathrm{old}}(\mathrm{stored})\big)

Slots whose codec does not change (a tensor below ``state_min_numel``, a ``BUFFER`` slot that
``8bit`` does not hold, the per-parameter ``step``) are carried unchanged.

**What is lost.** Decoding is exact: a compressed form decodes to precisely the values it
represents, so a conversion to ``fp32`` keeps every bit of what was stored (it cannot recover
what the compression already dropped). Encoding into a compressed form loses what that form
loses at every step anyway:

* ``bf16``: rounding to 8 significant bits (stochastic, unbiased);
* ``8bit``: the blockwise dynamic code (one byte per element, one scale per 256);
* ``factored`` (second moments): the rank-1 row/column approximation ``R C / 1^T R``;
* ``smmf``: the rank-1 approximation of ``|m|`` and ``v`` of the square-matricized tensor;
* ``shared`` (second moments): the row means (per tensor for 0-/1-D tensors);
* ``4bit``: the 4-bit codes (16 levels); its signed first-moment levels reach +1 but not -1, so
  re-encoding a decoded block whose largest magnitude is negative takes a slightly smaller scale
  (a ``4bit`` -> ``fp32`` -> ``4bit`` round trip may move such a block's codes by one level; a
  sharded checkpoint, which must re-encode exactly, uses :meth:`Codec.export_value` instead).

Every pair of forms the rule supports converts (each codec decodes to the dense value and
every codec can be initialized from a dense value); what cannot be converted is refused by the
caller (:meth:`hfoptim.core.optimizer.RuleOptimizer.load_state_dict`: a sharded run, where the saved
state is only a shard of each tensor).
"""

from __future__ import annotations

import torch

from ..core.rule import Rule, Slot
from ..core.stats import ParamView
from .resolve import codec_for

#: the version of the stored state's layout that ``state_dict()`` writes (the hfoptim tag's
#: ``"format"``); older formats are upgraded on load (:func:`upgrade_param_state`):
#:
#: 1. the first;
#: 2. the ``4bit`` codes of a line packed as its two halves (code ``k`` and ``k + ceil(n / 2)``
#:    in byte ``k``), no longer as neighbours (``2k`` and ``2k + 1``): see
#:    :mod:`hfoptim.state.fourbit`.
STATE_FORMAT = 2

#: group options that say how this run stores and runs the state, not what the algorithm is: a
#: resume keeps the current optimizer's values of these (and converts the state to its forms)
STORAGE_KEYS = ("state", "state_min_numel")


def slot_keys(slot: Slot, pstate: dict) -> list[str]:
    """The keys of ``pstate`` that store ``slot`` (``"<slot>"`` or ``"<slot>.<part>"``)."""
    return [k for k in pstate if k == slot.name or k.startswith(slot.name + ".")]


def saved_format(tag: dict) -> int:
    """The state-dict format of a saved hfoptim tag (1 where it predates the entry). Raises
    ``ValueError`` for a format this version does not know."""
    fmt = tag.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or not 1 <= fmt <= STATE_FORMAT:
        raise ValueError(
            f"this state_dict has hfoptim state format {fmt!r}; this version of hfoptim reads formats 1 to "
            f"{STATE_FORMAT}. It was saved by a newer hfoptim: load it with that version (or upgrade this one)"
        )
    return fmt


def upgrade_param_state(rule: Rule, pstate: dict, saved_group: dict, view: ParamView, fmt: int) -> dict:
    """``pstate`` (saved in format ``fmt``, in the forms ``saved_group`` chose) in the layout of
    :data:`STATE_FORMAT`: each slot's :meth:`~hfoptim.state.codec.Codec.upgrade`. ``pstate``
    itself when nothing changes, else a new dict."""
    if fmt >= STATE_FORMAT:
        return pstate
    out = dict(pstate)
    for slot in rule.active_slots(saved_group):
        codec = codec_for(rule, slot, saved_group, view)
        out.update(codec.upgrade(slot, {k: pstate[k] for k in slot_keys(slot, pstate)}, view, fmt))
    return out


def needs_conversion(rule: Rule, saved_group: dict, group: dict, view: ParamView) -> bool:
    """True when some slot of a parameter seen through ``view`` is stored in another form under
    ``group``'s options than under ``saved_group``'s."""
    return any(
        codec_for(rule, slot, saved_group, view) is not codec_for(rule, slot, group, view)
        for slot in rule.active_slots(group)
    )


def convert_param_state(
    rule: Rule,
    pstate: dict,
    saved_group: dict,
    group: dict,
    view: ParamView,
    dtype: torch.dtype,
    device: torch.device,
    stats,
) -> dict:
    """``pstate`` (stored in the forms ``saved_group`` chose) stored in the forms ``group``
    chooses; ``dtype`` is the parameter's compute dtype. A new dict: ``pstate`` is not changed.
    See the module docstring for what each conversion loses."""
    out = {k: v for k, v in pstate.items() if not any(k in slot_keys(s, pstate) for s in rule.active_slots(group))}
    for slot in rule.active_slots(group):
        old = codec_for(rule, slot, saved_group, view)
        new = codec_for(rule, slot, group, view)
        stored = {k: pstate[k] for k in slot_keys(slot, pstate)}
        if old is new:
            out.update(stored)
            continue
        stored = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in stored.items()}
        value = old.decode(slot, stored, view, dtype, stats=stats).to(dtype=dtype, copy=True)
        out.update(new.init(slot, value, view, stats=stats))
    return out
