"""The one optimizer class every algorithm runs on.

``Engine`` does the bookkeeping, a :class:`~hfoptim.core.rule.Rule` does the math:

1. state is created lazily on a parameter's first step (accelerate swaps FSDP2 parameters after
   the optimizer is built, so nothing is allocated in ``__init__``);
2. each parameter counts its own steps (ZeRO-3 calls ``step()`` once per sub-group, so a
   group-level counter would run too fast);
3. parameters are bucketed by device and dtype; the multi-tensor path runs each bucket through
   ``torch._foreach_*`` kernels, the reference path (``foreach=False``) runs one parameter at a
   time through the same rule code; a bucket is stepped in chunks, large tensors in row pieces,
   so the step's temporaries stay within ``chunk_bytes`` (:mod:`hfoptim.core.chunking`);
4. bf16/fp16 parameters are computed in fp32 (fp64 stays fp64); ``p.grad`` is never written;
5. per step: gradient modifiers -> rule (state decoded, updated, encoded) -> update modifiers ->
   weight decay and ``p <- p - lr u``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..modifiers import GRAD, MODIFIERS, UPDATE
from ..modifiers.weight_decay import add_l2, apply_update
from ..state import resolve
from ..state.codec import decode_all, encode_all
from . import chunking, fused
from .context import StepContext
from .hparams import HP, HyperparameterError, validate_all
from .layout import LocalLayout, Unit
from .rule import Rule
from .stats import ParamView
from .tensorlist import TensorList

#: keys torch or other libraries put into parameter groups; carried, never interpreted
PASSTHROUGH_GROUP_KEYS = frozenset({"params", "param_names", "name", "initial_lr"})

STATE_DICT_TAG = "hfoptim"


def engine_hyperparams(rule: type[Rule]) -> dict[str, HP]:
    """Every option a parameter group of ``rule`` accepts: the rule's, the modifiers', the engine's."""
    spec: dict[str, HP] = dict(rule.hyperparams)
    spec["weight_decay_mode"] = HP(rule.weight_decay_modes[0], kind="str", choices=rule.weight_decay_modes)
    spec["maximize"] = HP(False, kind="bool")
    spec["denominator"] = HP("eps", kind="str", choices=("eps", "atan2", "softplus"))
    spec["softplus_beta"] = HP(
        50.0, low=0.0, low_open=True, doc="sharpness of denominator='softplus' (Sadam, arXiv 1908.00700: 50)"
    )
    spec["state"] = HP(
        "auto",
        kind="str",
        doc="storage form of the state: auto (the rule's own), fp32 (all dense), 8bit, bf16, factored, smmf, shared",
    )
    spec["compile"] = HP(
        "auto",
        kind="str",
        choices=("auto", "on", "off"),
        doc="fuse decode-update-encode of 8-bit/bf16 state with torch.compile: auto (tensors of 65536+ "
        "elements, when it works here), on, off (see hfoptim.core.fused)",
    )
    spec["state_min_numel"] = HP(4096, kind="int", low=0, doc="tensors smaller than this (globally) keep fp32 state")
    spec["chunk_bytes"] = HP(
        chunking.DEFAULT_CHUNK_BYTES,
        kind="int",
        low=0,
        doc="bound on the step's temporary memory: tensors are stepped in groups of at most chunk_bytes/64 "
        "elements, large ones in pieces of whole rows where the rule allows (0: no bound; see hfoptim.core.chunking)",
    )
    for modifier in MODIFIERS:
        spec.update(modifier.hyperparams)
    return spec


class Engine(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a :class:`Rule`.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        rule: the algorithm (a Rule subclass); optimizer classes such as ``hfoptim.AdEMAMix``
            fix it.
        foreach: True (default) for the multi-tensor path, False for the per-parameter
            reference path.
        **hyperparameters: the rule's hyperparameters and the shared options (``weight_decay``,
            ``weight_decay_mode``, ``maximize``, ``denominator``, ``state``, ``cautious``,
            ``agc``, ``soft_clip``, ``centralize``, ``trust_ratio``, ...).
    """

    rule_class: ClassVar[type[Rule] | None] = None

    def __init__(self, params, rule: type[Rule] | None = None, *, foreach: bool | None = None, **hyperparameters):
        rule = rule or self.rule_class
        if rule is None:
            raise TypeError("Engine needs a rule: use an optimizer class such as hfoptim.AdamW")
        self.rule: Rule = rule()
        self.foreach = True if foreach is None else bool(foreach)
        self._spec = engine_hyperparams(rule)
        defaults = self._validate_group(hyperparameters, where=f"{type(self).__name__}()")
        self.layout = LocalLayout(foreach=self.foreach)
        self._handed_loss: Any = None
        super().__init__(params, defaults)

    #: rebuilt by __setstate__: the option specs, and the layout (it tracks the parameters by
    #: identity; a sharded layout is found again at the next step)
    _REBUILT = frozenset({"_spec", "layout"})

    def __getstate__(self) -> dict[str, Any]:
        """For copy.deepcopy and pickle: everything but the hooks (as torch) and the rebuilt
        parts. torch's own ``__getstate__`` keeps only defaults/state/param_groups, losing the rule."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in self._REBUILT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._spec = engine_hyperparams(type(self.rule))
        if "layout" in self.__dict__:
            return  # torch's load_state_dict calls __setstate__ too: keep the (sharded) layout
        self.layout = LocalLayout(foreach=self.foreach)
        for group in self.param_groups:
            self.layout.register(group["params"])

    # ------------------------------------------------------------------ validation
    def _validate_group(self, options: dict, where: str) -> dict:
        values = validate_all(self._spec, options, where)
        rule = self.rule
        if values["denominator"] != "eps" and not rule.preconditioned:
            raise HyperparameterError(
                f"{where}: denominator={values['denominator']!r} needs a rule that divides by a second "
                f"moment; {rule.name} does not"
            )
        for modifier in MODIFIERS:
            if modifier.enabled(values):
                reason = modifier.incompatible(rule)
                if reason:
                    raise HyperparameterError(f"{where}: {modifier.switch} cannot be used with {rule.name}: {reason}")
        resolve.check_state_option(rule, values, where)
        return values

    def add_param_group(self, param_group: dict) -> None:
        options = {k: v for k, v in param_group.items() if k not in PASSTHROUGH_GROUP_KEYS}
        for key, value in self.defaults.items():
            options.setdefault(key, value)
        index = len(self.param_groups)
        checked = self._validate_group(options, where=f"{type(self).__name__} parameter group {index}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        group = {k: v for k, v in param_group.items() if k in PASSTHROUGH_GROUP_KEYS}
        group["params"] = params
        group.update(checked)
        super().add_param_group(group)
        self.layout.register(params)

    # ------------------------------------------------------------------ layout (sharding hook)
    def param_view(self, p: torch.Tensor) -> ParamView:
        """What this process holds of ``p``."""
        return self.layout.view(p)

    # ------------------------------------------------------------------ step
    def set_loss(self, loss: Any) -> None:
        """Hand the training loss of the coming step to the optimizer, for callers that cannot pass
        it to :meth:`step`: the HF Trainer, and DeepSpeed, whose engine calls ``step()`` inside
        ``backward``. ``step()`` uses it when given neither ``loss`` nor a closure. It stays until
        replaced (ZeRO-3 calls ``step()`` once per sub-group, all in one training step)."""
        self._handed_loss = loss

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None):
        """One optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (its value reaches rules that
                need the loss, e.g. AdaLo).
            loss: the training loss of this step, for rules that need it when no closure is
                given (a float or a 0-d tensor; a mean over data-parallel ranks under sharding).
                Without either, the loss handed over by :meth:`set_loss` is used.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if loss is None:
            loss = closure_loss if closure_loss is not None else self._handed_loss
        loss_value = None
        if self.rule.needs_loss:
            if loss is None:
                raise RuntimeError(
                    f"{self.rule.name} sets its step size from the training loss: call "
                    f"optimizer.step(closure), optimizer.step(loss=loss) or optimizer.set_loss(loss) before step()"
                )
            loss_value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            if not math.isfinite(loss_value):
                raise ValueError(f"{self.rule.name} got a non-finite loss {loss_value}")
        self.layout = self.layout.for_step(self)
        if loss_value is not None:
            loss_value = self.layout.mean_loss(loss_value)
        for group in self.param_groups:
            units = self.layout.units(self, group)
            for unit in units:
                self._check_grad(unit)
            for bucket in self._buckets(units):
                for unit in bucket:
                    self._init_state(unit, group)["step"] += 1
                for chunk, stats in chunking.plan(self, group, bucket):
                    self._step_bucket(group, chunk, loss_value, stats)
        return closure_loss

    def _check_grad(self, unit: Unit) -> None:
        g = unit.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if g.is_complex():
            raise RuntimeError(f"{type(self).__name__} does not support complex gradients (got {g.dtype})")
        if g.shape != unit.param.shape:
            raise RuntimeError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(unit.param.shape)}")

    def _buckets(self, units: list[Unit]) -> list[list[Unit]]:
        if not self.foreach:
            return [[u] for u in units]
        buckets: dict[tuple, list] = defaultdict(list)
        for u in units:
            buckets[(u.param.device, u.param.dtype, u.grad.dtype)].append(u)
        return list(buckets.values())

    @staticmethod
    def compute_dtype(p: torch.Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype

    def _init_state(self, unit: Unit, group: dict) -> dict:
        state = unit.state
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            dtype = self.compute_dtype(unit.param)
            for slot in self.rule.active_slots(group):
                codec = resolve.codec_for(self.rule, slot, group, unit.view)
                state.update(codec.init(slot, slot.initial(unit.param, dtype), unit.view, stats=self.layout.stats))
        return state

    def _step_bucket(self, group: dict, units: list[Unit], loss: float | None, stats) -> None:
        """Step ``units`` (state initialised, step counters advanced) with the statistics
        backend ``stats`` (the layout's, or :class:`~hfoptim.core.stats.PieceStats` for a row
        piece)."""
        rule, foreach = self.rule, self.foreach
        units = fused.step_compiled(self, group, units, loss, stats)  # compressed state: one kernel each
        if not units:
            return
        params = [u.param for u in units]
        views = [u.view for u in units]
        states = [u.state for u in units]
        steps = [int(s["step"].item()) for s in states]
        dtype = self.compute_dtype(params[0])
        low_precision = params[0].dtype != dtype

        p_work = TensorList([p.to(dtype) if low_precision else p for p in params], foreach)
        g = TensorList([u.grad if u.grad.dtype == dtype else u.grad.to(dtype) for u in units], foreach)
        if group["maximize"]:
            g = -g

        ctx = StepContext(group, steps, views, stats, foreach, loss, states)
        advance(rule, group, ctx, p_work, g, states, views, dtype)
        if low_precision:
            for p, w in zip(params, p_work):
                p.copy_(w)
        for unit in units:
            if unit.writeback is not None:
                unit.writeback()

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        self.layout = self.layout.for_step(self)  # sharded parameters: the layout exports the state
        sd = super().state_dict()
        # the (global) parameter shapes, so a load over other shapes fails even for rules whose
        # state is all per-tensor scalars (Amos), which torch's state_dict could not tell apart
        shapes = {
            pid: list(self.param_view(p).global_shape)
            for saved, group in zip(sd["param_groups"], self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        sd[STATE_DICT_TAG] = {"rule": self.rule.name, "format": 1, "shapes": shapes}
        return self.layout.export_state(self, sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by an optimizer of the same rule over the same shapes.

        Raises ``ValueError`` naming the problem for a state dict of another optimizer, another
        rule, another state form or other parameter shapes. State tensors keep the dtype they
        were saved with (torch would cast them to the parameter's dtype, losing fp32 state of
        bf16 parameters)."""
        self.layout = self.layout.for_step(self)
        state_dict = self.layout.import_state(self, state_dict)  # sharded state: back to this run's shards
        tag = state_dict.get(STATE_DICT_TAG)
        if tag is None:
            raise ValueError(
                f"this state_dict was not saved by an hfoptim optimizer (no {STATE_DICT_TAG!r} entry); "
                f"{type(self).__name__} cannot load it"
            )
        if tag.get("rule") != self.rule.name:
            raise ValueError(
                f"this state_dict was saved by an hfoptim {tag.get('rule')!r} optimizer; "
                f"{type(self).__name__} runs {self.rule.name!r}"
            )
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} parameter groups, the optimizer {len(self.param_groups)}"
            )
        id_to_param = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {gi}: state_dict has {len(saved['params'])} parameters, "
                    f"the optimizer {len(group['params'])}"
                )
            id_to_param.update(zip(saved["params"], group["params"]))
        for pid, shape in tag.get("shapes", {}).items():
            p = id_to_param.get(pid)
            if p is not None and list(self.param_view(p).global_shape) != list(shape):
                raise ValueError(
                    f"state_dict was saved for a parameter {pid} of shape {tuple(shape)}, the optimizer's "
                    f"parameter has shape {tuple(self.param_view(p).global_shape)}"
                )
        for pid, pstate in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                raise ValueError(f"state_dict has state for unknown parameter id {pid}")
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            saved_group = saved_groups[self.param_groups.index(group)]
            options = {k: v for k, v in saved_group.items() if k in self._spec}
            self.layout.check_param_state(self, pid, p, pstate, {**group, **options})
        originals = {pid: dict(pstate) for pid, pstate in state_dict["state"].items()}
        super().load_state_dict({k: v for k, v in state_dict.items() if k != STATE_DICT_TAG})
        for pid, pstate in originals.items():
            p = id_to_param[pid]
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self.layout.after_load(self)

    def _check_param_state(self, pid, p: torch.Tensor, pstate: dict, group: dict) -> None:
        view = self.param_view(p)
        expected = {"step": ()}
        for slot in self.rule.active_slots(group):
            codec = resolve.codec_for(self.rule, slot, group, view)
            expected.update(codec.shapes(slot, view, p))
        if set(pstate) != set(expected):
            raise ValueError(
                f"state_dict entry for parameter {pid} has keys {sorted(pstate)}, but {type(self).__name__} "
                f"({self.rule.name}, state={group['state']!r}) keeps {sorted(expected)}: it was saved by another "
                f"optimizer or with another state form"
            )
        for key, shape in expected.items():
            value = pstate[key]
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"state_dict entry {key!r} for parameter {pid} has shape {tuple(value.shape)}, expected "
                    f"{tuple(shape)} for a parameter of shape {tuple(p.shape)}"
                )


class SlotValues:
    """The decoded slots a rule updates, as attributes (``s.exp_avg``)."""


def advance(
    rule: Rule,
    group: dict,
    ctx: StepContext,
    p_work: TensorList,
    g: TensorList,
    states: list[dict],
    views: list[ParamView],
    dtype: torch.dtype,
) -> None:
    """One step of the tensors of a bucket after the bookkeeping: gradient modifiers -> l2 decay
    -> decode the slots -> ``rule.update`` -> encode -> update modifiers -> weight decay and
    ``p <- p - lr u`` (``p_work`` in place). The plain path calls it for a bucket; the compiled
    path (:mod:`hfoptim.core.fused`) traces it for one parameter."""
    for modifier in MODIFIERS:
        if modifier.stage == GRAD and modifier.enabled(group):
            g = modifier.apply(ctx, g, g, p_work)
    if group["weight_decay_mode"] == "l2" and group["weight_decay"] != 0:
        g = add_l2(g, p_work, group["weight_decay"])

    active = rule.active_slots(group)
    stats = ctx.stats
    codecs = {slot.name: [resolve.codec_for(rule, slot, group, v) for v in views] for slot in active}
    slots = SlotValues()  # not SimpleNamespace: torch.compile traces a plain class, not that one
    for slot in active:
        decoded = decode_all(slot, codecs[slot.name], states, views, dtype, stats)  # each codec once
        setattr(slots, slot.name, TensorList(decoded, ctx.foreach))
    stored_early: set[str] = set()

    def store(values: TensorList, name: str) -> None:  # ctx.stored(): encode now, decode back
        slot = next(x for x in active if x.name == name)
        encode_all(slot, codecs[name], states, list(values), views, stats)
        back = decode_all(slot, codecs[name], states, views, dtype, stats)
        for codec, value, stored in zip(codecs[name], values, back):
            if not codec.identity:
                value.copy_(stored)
        stored_early.add(name)

    ctx.store = store
    u = rule.update(ctx, p_work, g, slots)
    for slot in active:
        if slot.name in stored_early:
            continue
        encode_all(slot, codecs[slot.name], states, list(getattr(slots, slot.name)), views, stats)

    for modifier in MODIFIERS:
        if modifier.stage == UPDATE and modifier.enabled(group):
            u = modifier.apply(ctx, u, g, p_work)
    wd = group["weight_decay"]
    mode = group["weight_decay_mode"]
    apply_update(p_work, u, ctx.lr, 0.0 if mode == "l2" else wd, mode)


def optimizer_class(rule: type[Rule], name: str, doc: str | None = None) -> type[Engine]:
    """A named optimizer class for ``rule``: ``hfoptim.AdEMAMix(params, lr=...)``."""
    cls = type(name, (Engine,), {"rule_class": rule, "__doc__": doc or rule.__doc__, "__module__": "hfoptim"})
    return cls
