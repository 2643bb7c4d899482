"""How one slot of optimizer state is stored.

A codec turns the fp32 value a rule works on into what is kept between steps and back. The rule
never sees the stored form: the engine calls :meth:`Codec.decode` before the update and
:meth:`Codec.encode` after it. So a storage form changes what is kept BETWEEN steps; within a
step the rule computes its direction from the full updated tensor (bitsandbytes' 8-bit and SMMF's
order). A rule whose paper divides by the stored form of the current step (Adafactor) asks for
it with ``ctx.stored``. Stored tensors live in ``optimizer.state[p]`` under
``"<slot>"`` (dense) or ``"<slot>.<part>"`` (other forms), so torch's ``state_dict`` and
distributed checkpoints carry them like any other state.

Every reduction a codec makes over the tensor (row and column sums of a factored form, the
total of a shared value) goes through ``stats`` (:class:`~hfoptim.core.stats.LocalStats` or the
sharding layer's backend), which the engine passes to :meth:`Codec.init`, :meth:`Codec.decode`
and :meth:`Codec.encode`; a codec that reduces nothing ignores it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.rule import SCALAR, Slot
from ..core.stats import ParamView


class Codec:
    """Base class of storage forms."""

    #: name used in ``state=...`` and in registry names (e.g. "8bit")
    name: ClassVar[str] = ""
    #: slot kinds this form can hold
    kinds: ClassVar[frozenset] = frozenset()
    #: True when ``decode`` returns the stored tensor itself and ``encode`` does nothing
    identity: ClassVar[bool] = False

    def shapes(self, slot: Slot, view: ParamView, p: torch.Tensor) -> dict[str, tuple]:
        """The shape of each stored tensor for ``slot`` of parameter ``p`` (to validate loads)."""
        raise NotImplementedError

    def init(self, slot: Slot, value: torch.Tensor, view: ParamView, *, stats=None) -> dict[str, torch.Tensor]:
        """Stored tensors holding the initial ``value`` (fp32, the parameter's local shape)."""
        raise NotImplementedError

    def decode(self, slot: Slot, stored: dict, view: ParamView, dtype: torch.dtype, *, stats=None) -> torch.Tensor:
        """The slot's value as a tensor of ``dtype`` in the parameter's local shape."""
        raise NotImplementedError

    def encode(self, slot: Slot, stored: dict, value: torch.Tensor, view: ParamView, *, stats=None) -> None:
        """Store ``value`` (the slot after the update) into ``stored`` in place."""
        raise NotImplementedError


class Dense(Codec):
    """The slot kept as an ordinary tensor of the compute dtype (fp32, or fp64 for fp64 params)."""

    name = "fp32"
    kinds = frozenset({"first_moment", "second_moment", "buffer", SCALAR})
    identity = True

    def shapes(self, slot, view, p):
        return {slot.name: () if slot.kind == SCALAR else tuple(p.shape)}

    def init(self, slot, value, view, *, stats=None):
        return {slot.name: value}

    def decode(self, slot, stored, view, dtype, *, stats=None):
        return stored[slot.name]

    def encode(self, slot, stored, value, view, *, stats=None):
        tensor = stored[slot.name]
        if value is not tensor:
            tensor.copy_(value)


#: storage forms by name; the state issue adds 8-bit, bf16, factored, SMMF and shared forms
CODECS: dict[str, Codec] = {"fp32": Dense()}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown state form {name!r}; available: {', '.join(sorted(CODECS))}") from None
