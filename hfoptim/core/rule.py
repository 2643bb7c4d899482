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
STATISTIC = "statistic"  # a small tensor of another shape than the parameter (kept dense fp32), e.g.
# SM3's per-dimension accumulators: ``Slot.shape`` gives its shape


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
    #: the slot's shape from the (local) parameter's shape, for slots shaped otherwise than the
    #: parameter (STATISTIC); None: the parameter's shape (``()`` for SCALAR)
    shape: Callable[[tuple], tuple] | None = None

    def active(self, group: dict) -> bool:
        """True when the parameter group keeps this slot."""
        return self.when is None or bool(self.when(group))

    def shape_for(self, p_shape: tuple) -> tuple:
        """The shape of this slot for a parameter (or shard) of shape ``p_shape``."""
        if self.shape is not None:
            return tuple(self.shape(tuple(p_shape)))
        return () if self.kind == SCALAR else tuple(p_shape)

    def initial(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.init is not None:
            return self.init(p).to(dtype)
        return torch.zeros(self.shape_for(p.shape), dtype=dtype, device=p.device)


#: slots that group options add to every rule's state (CPR's per-tensor multiplier and bound,
#: ``weight_decay_mode="cpr"``); the modifiers package fills it from its modifiers' ``slots``,
#: each slot's ``when`` deciding from the group whether it exists
OPTION_SLOTS: list[Slot] = []


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
    #: False when some parameters' steps divide by no second moment although the rule is
    #: ``preconditioned`` (Muon's matrices): stable weight decay (AdamS) does not apply then
    stable_decay_applies: ClassVar[bool] = True
    #: True when the first two ``betas`` are Adam's (first- and second-moment EMAs) and ``eps`` is
    #: Adam's denominator epsilon: the HF Trainer then passes ``adam_beta1``, ``adam_beta2``,
    #: ``adam_epsilon`` (other rules give those betas other meanings: Adan, AdaLo's loss EMA)
    adam_arguments: ClassVar[bool] = False
    #: True when the rule needs the training loss (``step(closure)`` or ``step(loss=...)``)
    needs_loss: ClassVar[bool] = False
    #: the slots whose new value the rule's update stores mid-step (``ctx.stored``: Adafactor's
    #: second moment); a compiled kernel encodes those itself, even in a storage form that
    #: :attr:`~hfoptim.state.codec.Codec.encodes_after_kernel`
    stores_early: ClassVar[frozenset[str]] = frozenset()
    #: storage forms this rule refuses, each with the reason (a combination that cannot work)
    refused_state: ClassVar[dict[str, str]] = {}
    #: storage form per slot when the user asks for none (e.g. Adafactor: factored second moment)
    default_state: ClassVar[dict[str, str]] = {}
    #: the paper (title, arXiv id) the rule follows
    paper: ClassVar[str] = ""
    #: True when each element's update depends only on that element's gradient, parameter and
    #: state and on per-step numbers (no norm, row, shape or other statistic of the tensor): a
    #: parameter's layout (:mod:`hfoptim.core.param_layout`) then cannot change the step (it is
    #: stepped as stored), and the engine may step a large tensor in pieces of whole rows to bound
    #: its temporaries (``chunk_bytes``)
    elementwise: ClassVar[bool] = False
    #: True when every statistic of the whole tensor its update needs (beyond :attr:`elementwise`)
    #: is a sum, sum of squares, norm or per-dimension maximum asked of the statistics backend
    #: (``ctx.norm``, ``ctx.mean``, ``ctx.rms``, ``ctx.stats.sum``, ``ctx.stats.dim_absmax``), none
    #: a column sum nor a whole matrix: a shard of whole rows may then take the compiled kernel
    #: in stages (:func:`hfoptim.core.compiled_step.shard_staged`)
    staged_stats: ClassVar[bool] = False
    #: True when the rule's step of a matrix is the same for its transpose (elementwise, or the
    #: only statistics are over the whole tensor: nSGDA's norm): a Conv1D weight is then stepped
    #: as stored
    orientation_free: ClassVar[bool] = False

    def is_elementwise(self, group: dict) -> bool:
        """:attr:`elementwise` for parameters of ``group``: an option may add a whole-tensor
        statistic to an elementwise rule (adaptive memory's inner products)."""
        return self.elementwise

    def check_options(self, group: dict) -> str | None:
        """A problem with a combination of the group's (each valid) hyperparameters, or None."""
        return None

    def active_slots(self, group: dict) -> tuple[Slot, ...]:
        """The slots kept for parameters of ``group`` (see :attr:`Slot.when`), the rule's own and
        those of the group's options (:data:`OPTION_SLOTS`)."""
        return tuple(slot for slot in (*self.slots, *OPTION_SLOTS) if slot.active(group))

    def split_group(self, options: dict, params: list[torch.Tensor]) -> list[tuple[dict, list[torch.Tensor]]]:
        """The parameter groups one group the user gives becomes: ``(options, params)`` pairs.

        One group, unchanged, for most rules. A rule that runs different updates by parameter
        role (Muon: orthogonalized matrices, AdamW for the rest) splits here, when the group is
        added, so that every group the engine steps has one update and one set of slots."""
        return [(options, params)]

    def compiles(self, group: dict) -> bool:
        """Whether parameters of ``group`` may take the compiled per-parameter path
        (:mod:`hfoptim.core.compiled_step`): False for an update that needs the whole matrix at once
        through a collective (Muon's orthogonalization)."""
        return True

    def update(self, ctx, p: TensorList, g: TensorList, s: SimpleNamespace) -> TensorList:
        """Advance the state ``s`` (one TensorList per slot, decoded, updated in place) with the
        gradient ``g`` (read-only) and return the update direction ``u``; the engine then applies
        ``p <- p - lr * u`` with the group's weight decay. ``p`` is read-only here."""
        raise NotImplementedError

    @classmethod
    def describe(cls) -> str:
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else cls.name
