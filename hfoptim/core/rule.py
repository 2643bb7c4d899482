"""What an algorithm declares: its hyperparameters, its state slots and its update.

A rule is a small, pure update over fp32 (or fp64) tensors. It never touches ``p.grad``, never
stores state itself and never knows how its state is stored (dense, 8-bit, factored, ...) or
whether it runs sharded: the engine decodes the slots before :meth:`Rule.update` and encodes
them after, and every per-tensor statistic goes through the :class:`~hfoptim.core.context.StepContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import torch

from .hparams import HP
from .tensorlist import TensorList

#: slot kinds, which decide the storage forms a slot may take
FIRST_MOMENT = "first_moment"  # signed EMA of gradients (8-bit signed code, SMMF with sign bits)
SECOND_MOMENT = "second_moment"  # non-negative EMA of squared gradients (8-bit unsigned, factored)
BUFFER = "buffer"  # any other per-element tensor (kept dense)
SCALAR = "scalar"  # one value per tensor (kept dense fp32)


@dataclass(frozen=True)
class Slot:
    """One piece of per-parameter optimizer state.

    ``name`` is the key in ``optimizer.state[p]`` for dense storage (and the prefix of the keys
    of other storage forms); ``kind`` is one of the kinds above; ``init`` builds the initial
    value from the parameter (zeros of the parameter's shape by default, a 0-d zero for SCALAR);
    ``when`` decides from the parameter group whether the slot exists at all (e.g. Adafactor's
    first moment only when ``beta1`` is set); None: always.
    """

    name: str
    kind: str
    init: Callable[[torch.Tensor], torch.Tensor] | None = None
    when: Callable[[dict], bool] | None = None

    def active(self, group: dict) -> bool:
        """True when the parameter group keeps this slot."""
        return self.when is None or bool(self.when(group))

    def initial(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.init is not None:
            return self.init(p).to(dtype)
        if self.kind == SCALAR:
            return torch.zeros((), dtype=dtype, device=p.device)
        return torch.zeros(p.shape, dtype=dtype, device=p.device)


class Rule:
    """Base class of every algorithm. Subclasses set the class attributes and ``update``."""

    #: lowercase registry name, e.g. "ademamix"
    name: ClassVar[str] = ""
    #: name of the public optimizer class, e.g. "AdEMAMix" (``hfoptim.AdEMAMix``)
    class_name: ClassVar[str] = ""
    #: hyperparameters with the paper's defaults (``lr`` and ``weight_decay`` included)
    hyperparams: ClassVar[dict[str, HP]] = {}
    #: the per-parameter state
    slots: ClassVar[tuple[Slot, ...]] = ()
    #: weight-decay forms this rule supports; the first is the default
    weight_decay_modes: ClassVar[tuple[str, ...]] = ("decoupled", "cautious", "l2")
    #: True when the rule divides by a root second moment through ``ctx.precondition``
    #: (then ``denominator="atan2"`` / ``"softplus"`` apply)
    preconditioned: ClassVar[bool] = False
    #: True when the rule needs the training loss (``step(closure)`` or ``step(loss=...)``)
    needs_loss: ClassVar[bool] = False
    #: storage forms this rule refuses, each with the reason (a combination that cannot work)
    refused_state: ClassVar[dict[str, str]] = {}
    #: storage form per slot when the user asks for none (e.g. Adafactor: factored second moment)
    default_state: ClassVar[dict[str, str]] = {}
    #: the paper (title, arXiv id) the rule follows
    paper: ClassVar[str] = ""
    #: True when each element's update depends only on that element's gradient, parameter and
    #: state and on per-step numbers (no statistic of the whole tensor): the engine may then step
    #: a large tensor in pieces of whole rows to bound its temporaries (``chunk_bytes``)
    elementwise: ClassVar[bool] = False

    def active_slots(self, group: dict) -> tuple[Slot, ...]:
        """The slots kept for parameters of ``group`` (see :attr:`Slot.when`)."""
        return tuple(slot for slot in self.slots if slot.active(group))

    def update(self, ctx, p: TensorList, g: TensorList, s: SimpleNamespace) -> TensorList:
        """Advance the state ``s`` (one TensorList per slot, decoded, updated in place) with the
        gradient ``g`` (read-only) and return the update direction ``u``; the engine then applies
        ``p <- p - lr * u`` with the group's weight decay. ``p`` is read-only here."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else cls.name
