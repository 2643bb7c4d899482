"""Which storage form each slot of each parameter gets.

The user asks with the group option ``state``:

* ``"auto"`` (default): the rule's own forms -- dense fp32 for most rules, a factored second
  moment for Adafactor, SMMF factors for SMMF (``Rule.default_state``);
* ``"fp32"``: every slot dense, the rule's defaults included (the fp32 twin of Adafactor/SMMF);
* a form (``"8bit"``, ``"factored"``, ``"smmf"``, ``"shared"``, ...): applied to the slots whose
  kind it can hold, on tensors whose GLOBAL size is at least ``state_min_numel`` (decided from the
  whole parameter, never from a shard, so precision does not depend on the world size); every
  other slot keeps the rule's own form.
"""

from __future__ import annotations

from ..core.hparams import HyperparameterError
from ..core.rule import Rule, Slot
from ..core.stats import ParamView
from .codec import CODECS, Codec

DENSE = "fp32"
AUTO = "auto"


def check_state_option(rule: Rule, group: dict, where: str) -> None:
    """Refuse a storage form that does not exist or fits none of the slots the rule keeps with
    the group's hyperparameters (e.g. Amos keeps a first moment only with ``momentum > 0``)."""
    state = group["state"]
    if state == AUTO:
        return
    if state not in CODECS:
        raise HyperparameterError(
            f"{where}: unknown state form state={state!r}; available: {AUTO}, {', '.join(sorted(CODECS))}"
        )
    if state == DENSE:
        return
    if state in rule.refused_state:
        raise HyperparameterError(f"{where}: {rule.name} cannot keep state={state!r}: {rule.refused_state[state]}")
    codec = CODECS[state]
    active = rule.active_slots(group)
    if not any(slot.kind in codec.kinds for slot in active):
        kept = ", ".join(f"{s.name} ({s.kind})" for s in active) or "no state"
        idle = [s.name for s in rule.slots if s not in active and s.kind in codec.kinds]
        hint = ""
        if idle:
            hint = f"; {', '.join(idle)} exists only with other hyperparameters (see help({rule.class_name}))"
        raise HyperparameterError(
            f"{where}: state={state!r} stores {', '.join(sorted(codec.kinds))} slots, but {rule.name} keeps "
            f"{kept} here: nothing to compress{hint}"
        )


def codec_for(rule: Rule, slot: Slot, group: dict, view: ParamView) -> Codec:
    """The storage form of ``slot`` for the parameter seen through ``view`` (see the module
    docstring). ``smmf`` with ``state="factored"`` factors its second moment Adafactor's way and
    keeps its SMMF first moment."""
    state = group["state"]
    if state == DENSE:
        return CODECS[DENSE]
    default = CODECS[rule.default_state.get(slot.name, DENSE)]
    if state == AUTO:
        return default
    asked = CODECS[state]
    if slot.kind in asked.kinds and view.global_numel >= group["state_min_numel"]:
        return asked
    return default


def all_dense(rule: Rule, group: dict) -> bool:
    """True when every slot is stored densely whatever the parameter (no decode copies)."""
    return group["state"] == DENSE or (group["state"] == AUTO and not rule.default_state)
