"""Which storage form each slot of each parameter gets.

The user asks with the group option ``state`` (``"fp32"``, ``"8bit"``, ...); a rule may name a
default form per slot (Adafactor: a factored second moment). A form applies to the slots whose
kind it can hold; the others stay dense fp32, as do tensors whose GLOBAL size is below
``state_min_numel`` (decided from the whole parameter, never from a shard, so precision does not
depend on the world size).
"""

from __future__ import annotations

from ..core.hparams import HyperparameterError
from ..core.rule import Rule, Slot
from ..core.stats import ParamView
from .codec import CODECS, Codec

DENSE = "fp32"


def check_state_option(rule: Rule, state: str, where: str) -> None:
    """Refuse a storage form that does not exist or fits none of the rule's slots."""
    if state not in CODECS:
        raise HyperparameterError(
            f"{where}: unknown state form state={state!r}; available: {', '.join(sorted(CODECS))}"
        )
    if state == DENSE:
        return
    codec = CODECS[state]
    if not any(slot.kind in codec.kinds for slot in rule.slots):
        kinds = ", ".join(sorted({s.kind for s in rule.slots})) or "none"
        raise HyperparameterError(
            f"{where}: state={state!r} stores {', '.join(sorted(codec.kinds))} slots, but {rule.name} keeps "
            f"{kinds}: nothing to compress"
        )


def codec_for(rule: Rule, slot: Slot, group: dict, view: ParamView) -> Codec:
    """The storage form of ``slot`` for the parameter seen through ``view``.

    The form the group asks for applies to the slots whose kind it can hold, on tensors of at
    least ``state_min_numel`` elements (globally); every other slot keeps the rule's own default
    form (Adafactor's factored second moment, SMMF's factors) or dense fp32. So ``smmf`` with
    ``state="factored"`` factors its second moment Adafactor's way and keeps its SMMF first moment.
    """
    default = rule.default_state.get(slot.name, DENSE)
    asked = CODECS[group["state"]]
    if (
        group["state"] != DENSE
        and slot.kind in asked.kinds
        and view.global_numel >= group["state_min_numel"]
    ):
        return asked
    return CODECS[default]


def all_dense(rule: Rule, group: dict) -> bool:
    """True when every slot is stored densely whatever the parameter (no decode copies)."""
    return group["state"] == DENSE and not rule.default_state
