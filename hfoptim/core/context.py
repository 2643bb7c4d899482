"""The per-step context a rule sees: step counts, schedules, statistics, the loss."""

from __future__ import annotations

from typing import Union

import torch

from .stats import LocalStats, ParamView
from .tensorlist import TensorList
from .tracing import is_traced

PerTensor = Union[float, list]

#: constants of Adam-atan2 (Everett et al. 2024, arXiv 2407.05872): u = A * atan2(m, B * sqrt(v))
ATAN2_A = 1.27
ATAN2_B = 1.0


def _times(x: PerTensor, factor: float) -> PerTensor:
    """``x * factor`` for one number or a per-tensor list."""
    return [v * factor for v in x] if isinstance(x, list) else x * factor


def _root(v: TensorList, in_place) -> TensorList:
    """``sqrt(v)``: in ``v``'s memory for the tensors ``in_place`` marks (a bool or a list)."""
    if isinstance(in_place, list) and (all(in_place) or not any(in_place)):
        in_place = bool(in_place) and all(in_place)
    if not isinstance(in_place, list):
        return v.sqrt_() if in_place else v.sqrt()
    return TensorList([t.sqrt_() if own else t.sqrt() for t, own in zip(v, in_place)], v.foreach)


def owns_memory(value: torch.Tensor, kept) -> bool:
    """Whether ``value`` shares memory with none of the tensors in ``kept`` (other entries are
    ignored): a temporary that may be overwritten. False while tracing: the compiled path plans
    its own memory, and a traced tensor has no address."""
    if is_traced():
        return False
    address = value.untyped_storage().data_ptr()
    return all(not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() != address for t in kept)


class StepContext:
    """Everything about one bucket of parameters in one step, except tensors being updated.

    Attributes:
        group: the validated hyperparameters of the parameter group.
        steps: the 1-based step number of each parameter (per-parameter counters).
        views: what this process holds of each parameter (global shape, ...).
        loss: the training loss of this step, or None.
        lr: the learning rate applied by the engine; a rule may replace it by a per-tensor
            list (e.g. AdaLo's loss-driven step size, Adafactor's relative step).
    """

    def __init__(
        self,
        group: dict,
        steps: list[int],
        views: list[ParamView],
        stats: LocalStats,
        foreach: bool,
        loss: float | None,
        param_states: list[dict],
        lr: PerTensor | torch.Tensor | None = None,
    ):
        self.group = group
        self.steps = steps
        self.views = views
        self.stats = stats
        self.foreach = foreach
        self.loss = loss
        #: ``lr`` overrides ``group["lr"]`` (the compiled path passes it as a traced input)
        self.lr: PerTensor = float(group["lr"]) if lr is None else lr
        self.param_states = param_states
        #: set by the engine once the slots are decoded: ``store(values, slot_name)`` encodes the
        #: slot now and puts the decoded tensors in ``values`` (see :meth:`stored`)
        self.store = None
        #: slot name -> per tensor, whether :meth:`stored` gave a decoded temporary that shares
        #: no memory with the state (the rule may overwrite it); set by the engine's ``store``
        self.temporaries: dict[str, list[bool]] = {}
        #: the decoded slots (``s``), for post modifiers with state (CPR); set by the engine
        self.slots = None
        #: slots the engine does not encode but leaves, updated, in :attr:`encoded_later` (a
        #: compiled kernel writes them out: :attr:`~hfoptim.state.codec.Codec.encodes_after_kernel`)
        self.encode_later: frozenset[str] = frozenset()
        #: slot name -> its updated values, for the slots of :attr:`encode_later`
        self.encoded_later: dict[str, TensorList] = {}
        #: a list to record ``sum(v_hat)`` of each tensor in (stable weight decay), or None
        self.second_moment_sums: list | None = None
        #: set by the engine for the update modifier it runs last (no other one follows it)
        self.last_update_modifier = False
        #: set by an update modifier whose direction already holds the decoupled weight decay
        #: (LAMB's trust ratio): the engine then takes ``p <- p - lr u`` without decaying again
        self.decay_applied = False
        #: per tensor, a 0-d factor ``s`` set by the last update modifier (LAMB's trust ratio):
        #: the engine takes ``p <- p - lr s u`` in its one pass over ``p`` instead of a pass
        #: scaling ``u`` first; None: no factors
        self.update_scales: list | None = None

    # ------------------------------------------------------------------ schedules
    def per_step(self, fn) -> PerTensor:
        """``fn(t)`` for each parameter's step ``t``; a plain number when all steps agree."""
        values = [fn(t) for t in self.steps]
        return values[0] if all(v == values[0] for v in values) else values

    def bias_correction(self, beta: float) -> PerTensor:
        """``1 - beta**t`` per parameter."""
        return self.per_step(lambda t: 1.0 - beta**t)

    def owned(self, x: TensorList, *others: TensorList) -> bool:
        """Whether every tensor of ``x`` is a temporary of this step that may be overwritten: its
        memory is shared with no tensor of its parameter's state nor of ``others`` (the
        parameter, the user's gradient). False while tracing: the compiled path plans its own
        memory (in place or not fuses the same), and a traced tensor has no address."""
        return all(
            owns_memory(t, [*self.param_states[i].values(), *(other.tensors[i] for other in others)])
            for i, t in enumerate(x.tensors)
        )

    # ------------------------------------------------------------------ statistics
    def norm(self, x: TensorList) -> list[torch.Tensor]:
        """Global L2 norm of each tensor."""
        return self.stats.norm(x.tensors, self.views)

    def sum_sq(self, x: TensorList) -> list[torch.Tensor]:
        return self.stats.sum_sq(x.tensors, self.views)

    def numel(self, i: int) -> int:
        """Number of elements of the whole parameter ``i`` (not of a shard)."""
        return self.views[i].global_numel

    def rms(self, x: TensorList) -> list[torch.Tensor]:
        """Root mean square of each whole tensor."""
        return [(s / self.numel(i)).sqrt() for i, s in enumerate(self.sum_sq(x))]

    def row_sums(self, x: TensorList, square: bool = False) -> list[torch.Tensor | None]:
        """Sum over each whole row (every dimension but the first; ``square``: of the squares)
        of each tensor of 2+ dimensions, shape ``(rows,)`` for this process's rows; None for
        0-/1-D tensors. One call of the statistics backend for the list (one collective under
        sharding)."""
        index = [i for i, t in enumerate(x.tensors) if t.dim() > 1]
        sums = self.stats.row_sums([x.tensors[i] for i in index], [self.views[i] for i in index], square)
        out: list[torch.Tensor | None] = [None] * len(x.tensors)
        for i, s in zip(index, sums):
            out[i] = s
        return out

    def mean(self, x: TensorList) -> list[torch.Tensor]:
        return [s / self.numel(i) for i, s in enumerate(self.stats.sum(x.tensors, self.views))]

    def matrix_map(self, fn, x: TensorList) -> TensorList:
        """``fn`` applied once to each whole parameter seen as a matrix ``(rows, row_len)``, the
        local rows of the result returned (see :meth:`LocalStats.matrix_map`); under sharding
        the matrix is gathered on one process, never computed from a shard."""
        return TensorList(self.stats.matrix_map(fn, x.tensors, self.views), self.foreach)

    # ------------------------------------------------------------------ storage
    def stored(self, s, name: str) -> TensorList:
        """Slot ``name`` of ``s`` as its storage keeps it: encoded now, decoded back into the list.

        Most rules use a slot as they updated it (the full tensor) and leave storing to the
        engine (SMMF's official code does so). A rule whose paper uses the *stored* form within
        the step calls this after its last write to the slot: Adafactor divides by the factored
        ``V_t = R_t C_t / 1^T R_t`` of step t, not by the dense EMA. The engine then does not encode
        the slot again. With dense storage the slot is returned unchanged.
        """
        values = getattr(s, name)
        if self.store is not None:
            self.store(values, name)
        return values

    # ------------------------------------------------------------------ preconditioning
    def adam_direction(self, m: TensorList, v: TensorList, b1: float, b2: float, eps: float) -> TensorList:
        r"""The bias-corrected Adam direction :math:`\hat m / (\sqrt{\hat v} + \epsilon)` in the
        group's denominator form, :math:`\hat m = m / (1 - \beta_1^t)`,
        :math:`\hat v = v / (1 - \beta_2^t)`; ``m`` and ``v`` are left as they are.

        With ``denominator="eps"`` the bias corrections move into the denominator,
        :math:`m / (\sqrt{v}\,(1-\beta_1^t)/\sqrt{1-\beta_2^t} + \epsilon (1-\beta_1^t))`:
        one temporary and four passes instead of two temporaries and five (torch's AdamW
        folds them the same way). Equal up to rounding.

        With ``denominator="atan2"`` the same factor moves into the second argument, since
        :math:`\mathrm{atan2}(a/c, b) = \mathrm{atan2}(a, c\,b)` for :math:`c > 0`:
        :math:`A\,\mathrm{atan2}(m, B\sqrt{v}\,(1-\beta_1^t)/\sqrt{1-\beta_2^t})`, one
        temporary and four passes instead of three temporaries and six. Equal up to rounding."""
        form = self.group["denominator"]
        if form not in ("eps", "atan2"):
            return self.precondition(m / self.bias_correction(b1), v / self.bias_correction(b2), eps, scratch=True)
        if self.second_moment_sums is not None:
            self._record(self.stats.sum(v.tensors, self.views), self.bias_correction(b2))
        scale = self.per_step(lambda t: (1.0 - b1**t) / (1.0 - b2**t) ** 0.5)
        root = v.sqrt()
        if form == "atan2":
            return root.mul_(scale if ATAN2_B == 1 else _times(scale, ATAN2_B)).ratan2_(m).mul_(ATAN2_A)
        shift = self.per_step(lambda t: eps * (1.0 - b1**t))
        return root.mul_(scale).add_(shift).rdiv_(m)

    def _record(self, sums: list, divisor: PerTensor) -> None:
        """Keep ``sum(v_hat)`` per tensor (``sums / divisor``) for stable weight decay."""
        divisors = divisor if isinstance(divisor, list) else [divisor] * len(sums)
        self.second_moment_sums[:] = [x / d for x, d in zip(sums, divisors)]

    def precondition(
        self, num: TensorList, v_hat: TensorList, eps: PerTensor, scratch: bool = False, v_scratch=None
    ) -> TensorList:
        """Divide by the root second moment in the form the group asked for.

        * ``denominator="eps"`` (Adam):      num / (sqrt(v_hat) + eps)
        * ``denominator="atan2"`` (Adam-atan2, arXiv 2407.05872): A * atan2(num, B * sqrt(v_hat)),
          A = 1.27, B = 1, no eps
        * ``denominator="softplus"`` (Sadam, arXiv 1908.00700): num / softplus_b(sqrt(v_hat)) with
          ``softplus_b(x) = log(1 + exp(b x)) / b``, ``b = softplus_beta`` (the paper's 50;
          b = 1 would floor the denominator at log 2 and turn Adam into momentum SGD)

        ``scratch=True`` says ``num`` and ``v_hat`` are temporaries of the rule: they are
        overwritten instead of copied (two fewer full-size allocations per step), and the result
        is returned in ``num``'s memory (a rule may reuse ``v_hat``'s afterwards, as Adan does).
        ``v_scratch`` (per tensor, or one bool) says only ``v_hat`` is a temporary (Adafactor's
        decoded factored second moment, see :attr:`temporaries`): its root is taken in place.
        """
        if self.second_moment_sums is not None:
            self._record(self.stats.sum(v_hat.tensors, self.views), 1.0)
        form = self.group["denominator"]
        root = v_hat.sqrt_() if scratch else _root(v_hat, v_scratch)
        if form == "eps":
            if not (isinstance(eps, (int, float)) and eps == 0):  # Adafactor's eps 0: no pass adding it
                root.add_(eps)
            return num.div_(root) if scratch else root.rdiv_(num)  # root is ours: divide into it
        if form == "atan2":
            if ATAN2_B != 1:
                root.mul_(ATAN2_B)
            # into num when it is scratch (the rule may reuse v_hat's memory), else into root
            return (num.atan2_(root) if scratch else root.ratan2_(num)).mul_(ATAN2_A)
        if form == "softplus":
            return num / root.softplus(self.group["softplus_beta"])
        raise AssertionError(form)
