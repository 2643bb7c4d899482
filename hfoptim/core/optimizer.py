"""The one optimizer class every algorithm runs on.

``RuleOptimizer`` does the bookkeeping, a :class:`~hfoptim.core.rule.Rule` does the math:

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
   weight decay and ``p <- p - lr u``;
6. with ``skip_nonfinite`` (on by default for compressed state) a step whose gradients hold a
   NaN or an infinity anywhere in the optimizer is skipped before anything is written, by every
   process of a sharded run together (the flag goes through the layout's statistics), and
   counted in ``nonfinite_skips``;
7. ``load_state_dict`` converts state saved in another storage form to the current one and
   validates the saved parameter groups (see its docstring).
"""

from __future__ import annotations

import math
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..modifiers import MODIFIERS
from ..modifiers.weight_decay import stable_scale
from ..state import convert, resolve
from ..state.convert import STORAGE_KEYS
from . import chunking, compiled_step, param_layout, uncut
from .context import StepContext
from .hparams import HP, HyperparameterError, validate_all
from .layout import LocalLayout, Unit, canonical_units, transposed_view
from .param_layout import OUT_IN, ParamLayout
from .rule import Rule
from .stats import LocalStats, ParamView
from .step import advance
from .tensorlist import TensorList

#: keys torch or other libraries put into parameter groups; carried, never interpreted
PASSTHROUGH_GROUP_KEYS = frozenset({"params", "param_names", "name", "initial_lr"})

STATE_DICT_TAG = "hfoptim"

#: group options about how this run executes (not the algorithm): a resume keeps the current
#: optimizer's values, as it keeps its storage options (``STORAGE_KEYS``)
RUN_KEYS = ("compile", "skip_nonfinite")


def engine_hyperparams(rule: type[Rule]) -> dict[str, HP]:
    """Every option a parameter group of ``rule`` accepts: the rule's, the modifiers', the engine's."""
    spec: dict[str, HP] = dict(rule.hyperparams)
    spec["weight_decay_mode"] = HP(rule.weight_decay_modes[0], kind="str", choices=weight_decay_modes(rule))
    spec["maximize"] = HP(False, kind="bool")
    spec["denominator"] = HP("eps", kind="str", choices=("eps", "atan2", "softplus"))
    spec["softplus_beta"] = HP(
        50.0, low=0.0, low_open=True, doc="sharpness of denominator='softplus' (Sadam, arXiv 1908.00700: 50)"
    )
    spec["state"] = HP(
        "auto",
        kind="str",
        doc="storage form of the state: auto (the rule's own), fp32 (all dense), 8bit, 4bit, bf16, factored, smmf, "
        "shared",
    )
    spec["compile"] = HP(
        "auto",
        kind="str",
        choices=("auto", "on", "off"),
        doc="one torch.compile kernel per parameter for the whole step (any state form): auto (tensors of 65536+ "
        "elements, and smaller ones with 8-bit, 4-bit or bf16 state when the group has 32+ of their shape, when it "
        "works here), on, off (see hfoptim.core.compiled_step)",
    )
    spec["state_min_numel"] = HP(4096, kind="int", low=0, doc="tensors smaller than this (globally) keep fp32 state")
    spec["skip_nonfinite"] = HP(
        None,
        choices=(None, True, False),
        doc="skip a step whose gradients hold a NaN or an infinity (any parameter of the optimizer, all "
        "processes together), leaving parameters and state untouched: True, False, or None (default: on "
        "when the group keeps compressed state, whose blocks or factors one NaN would spoil)",
        check=lambda v: None if v is None or isinstance(v, bool) else "True, False or None, not a number",
    )
    spec["chunk_bytes"] = HP(
        None,
        kind="optional_int",
        low=0,
        doc="bound on the step's temporary memory: tensors are stepped in groups of at most chunk_bytes/64 "
        "elements (global sizes), large ones in pieces of whole rows where the rule allows, of chunk_bytes/64/N "
        "local elements for a shard of N processes (chunk_bytes/B for a tensor the compiled kernel steps in rows "
        "of one block, holding B bytes per element: 1 for fp32 tensors; 0: no bound; None, the default: 64 MiB "
        "on a CPU, 1 GiB on a GPU, where each call's host cost outweighs a piece's work; see hfoptim.core.chunking)",
    )
    for modifier in MODIFIERS:
        spec.update(modifier.hyperparams)
    return spec


def weight_decay_modes(rule: type[Rule]) -> tuple[str, ...]:
    """The rule's own weight-decay forms, CPR (any rule: a constraint applied after the update)
    and, for rules that divide by a second moment, stable weight decay (AdamS)."""
    extra = ("cpr", "stable") if rule.preconditioned and rule.stable_decay_applies else ("cpr",)
    return tuple(rule.weight_decay_modes) + tuple(m for m in extra if m not in rule.weight_decay_modes)


def validate_options(
    rule: Rule, options: dict, where: str, check_storage: bool = True, spec: dict[str, HP] | None = None
) -> dict:
    """``options`` of one parameter group of ``rule`` validated: a copy with every default, or
    :class:`HyperparameterError` naming the option and what is accepted. Pure (no parameters, no
    optimizer): the engine checks every group with it and the registry every name's options.
    ``check_storage=False`` skips the check that the storage form fits the group's slots (a loaded
    group keeps the current optimizer's storage options, checked when its groups were built: a
    group a rule split off, such as Muon's matrices, may hold none of the slots the form
    compresses). ``spec``: :func:`engine_hyperparams` of the rule, when the caller has it."""
    values = validate_all(spec or engine_hyperparams(type(rule)), options, where)
    if values["denominator"] != "eps" and not rule.preconditioned:
        raise HyperparameterError(
            f"{where}: denominator={values['denominator']!r} needs a rule that divides by a second "
            f"moment; {rule.name} does not"
        )
    problem = rule.check_options(values)
    if problem:
        raise HyperparameterError(f"{where}: {problem}")
    for modifier in MODIFIERS:
        if modifier.enabled(values):
            reason = modifier.incompatible(rule)
            if reason:
                raise HyperparameterError(f"{where}: {modifier.switch} cannot be used with {rule.name}: {reason}")
        problem = modifier.check_options(values)
        if problem:
            raise HyperparameterError(f"{where}: {problem}")
    if check_storage:
        resolve.check_state_option(rule, values, where)
    return values


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a :class:`Rule`.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        rule: the algorithm (a Rule subclass); optimizer classes such as ``hfoptim.AdEMAMix``
            fix it.
        foreach: True (default) for the multi-tensor path, False for the per-parameter
            reference path.
        param_layouts: the layout of parameters that are not torch's ``(out, in)``
            (:mod:`hfoptim.core.param_layout`), keyed by parameter tensor or by name (names need
            parameter groups with ``param_names``, e.g. built from ``model.named_parameters()``);
            values are :class:`~hfoptim.core.param_layout.ParamLayout` or ``"in_out"``,
            ``"batch_out_in"``, ... :func:`hfoptim.create_optimizer` fills it from the model.
        **hyperparameters: the rule's hyperparameters and the shared options (``weight_decay``,
            ``weight_decay_mode``, ``maximize``, ``denominator``, ``state``, ``cautious``,
            ``agc``, ``soft_clip``, ``centralize``, ``trust_ratio``, ...).
    """

    rule_class: ClassVar[type[Rule] | None] = None

    def __init__(
        self,
        params,
        rule: type[Rule] | None = None,
        *,
        foreach: bool | None = None,
        param_layouts: dict | None = None,
        **hyperparameters,
    ):
        rule = rule or self.rule_class
        if rule is None:
            raise TypeError("RuleOptimizer needs a rule: use an optimizer class such as hfoptim.AdamW")
        self.rule: Rule = rule()
        self.foreach = True if foreach is None else bool(foreach)
        self._spec = engine_hyperparams(rule)
        defaults = self._validate_group(hyperparameters, where=f"{type(self).__name__}()")
        self.layout = LocalLayout(foreach=self.foreach)
        self._handed_loss: Any = None
        self._shape_counts: dict[int, Counter] = {}  # see tensors_of_shape
        #: the compiled path's per-unit decisions (hfoptim.core.compiled_step.unit_plan)
        self.kernel_plans: dict = {}
        #: the compiled path's buffers during a step (:class:`~hfoptim.core.compiled_step.Workspace`)
        self._workspace: compiled_step.Workspace | None = None
        #: steps skipped because a gradient was not finite (``skip_nonfinite``); saved in state_dict
        self.nonfinite_skips = 0
        self._declared_by_id, self._declared_by_name = _split_declared(param_layouts or {})
        self._used_names: set[str] = set()
        self._used_ids: set[int] = set()
        #: the layout of each parameter, by group and position (positions survive FSDP2's swap of
        #: the parameters for DTensors), and by ``id`` of the tensor the optimizer was built with
        self.param_layouts: list[list[ParamLayout]] = []
        self._layout_by_id: dict[int, tuple] = {}  # id -> (weakref to the tensor, layout)
        super().__init__(params, defaults)
        if set(self._declared_by_id) - self._used_ids:
            raise ValueError(
                f"{type(self).__name__}(): param_layouts has {len(set(self._declared_by_id) - self._used_ids)} "
                f"tensor key(s) that are not among the parameters given to the optimizer"
            )
        unused = sorted(set(self._declared_by_name) - self._used_names)
        if unused:
            raise ValueError(
                f"{type(self).__name__}(): param_layouts names {unused}, which no parameter group holds; parameter "
                f"groups carry names under 'param_names' (build them from model.named_parameters()), or key "
                f"param_layouts by the parameter tensors"
            )
        del self._declared_by_id, self._declared_by_name, self._used_names, self._used_ids

    #: rebuilt by __setstate__: the option specs, and the layout (it tracks the parameters by
    #: identity; a sharded layout is found again at the next step)
    _REBUILT = frozenset({"_spec", "layout", "_layout_by_id", "_shape_counts", "kernel_plans"})

    def __getstate__(self) -> dict[str, Any]:
        """For copy.deepcopy and pickle: everything but the hooks (as torch) and the rebuilt
        parts. torch's own ``__getstate__`` keeps only defaults/state/param_groups, losing the rule."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_") and k not in self._REBUILT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_skips", 0)
        self._shape_counts, self.kernel_plans = {}, {}
        self._spec = engine_hyperparams(type(self.rule))
        if "_layout_by_id" not in self.__dict__:  # copied or unpickled: the tensors are new
            self._layout_by_id = {
                id(p): (weakref.ref(p), layout)
                for group, layouts in zip(self.param_groups, self.__dict__.get("param_layouts", []))
                for p, layout in zip(group["params"], layouts)
            }
        if "layout" in self.__dict__:
            return  # torch's load_state_dict calls __setstate__ too: keep the (sharded) layout
        self.layout = LocalLayout(foreach=self.foreach)
        for group in self.param_groups:
            self.layout.register(group["params"])

    # ------------------------------------------------------------------ validation
    def _validate_group(self, options: dict, where: str, check_storage: bool = True) -> dict:
        """``options`` validated for this optimizer's rule (see :func:`validate_options`)."""
        return validate_options(self.rule, options, where, check_storage, spec=self._spec)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group, validated. ``params`` may hold tensors or ``(name, tensor)``
        pairs (``model.named_parameters()``, as torch >= 2.6 accepts: the names go to
        ``param_names``). ``foreach`` (True, False or None: the optimizer's) chooses the path of
        this group, as torch's optimizers accept it per group."""
        options = {k: v for k, v in param_group.items() if k not in PASSTHROUGH_GROUP_KEYS and k != "foreach"}
        for key, value in self.defaults.items():
            options.setdefault(key, value)
        index = len(self.param_groups)
        where = f"{type(self).__name__} parameter group {index}"
        checked = self._validate_group(options, where=where)
        foreach = param_group.get("foreach")
        if foreach not in (None, True, False):
            raise HyperparameterError(f"{where}: invalid foreach={foreach!r}: expected True, False or None")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for item in params:
            p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{where}: expected tensors or (name, tensor) pairs as parameters, got {type(item).__name__}"
                )
            if p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        names = param_group.get("param_names")
        pairs = [isinstance(item, tuple) for item in params]
        if any(pairs):
            if not all(pairs):
                raise ValueError(f"{where}: give every parameter as a (name, tensor) pair or none of them")
            names, params = [n for n, _ in params], [t for _, t in params]
        by_id = dict(zip(map(id, params), names)) if names is not None else None
        for options, part in self.rule.split_group(checked, params):
            group = {k: v for k, v in param_group.items() if k in PASSTHROUGH_GROUP_KEYS}
            group["params"] = part
            if by_id is not None:
                group["param_names"] = [by_id[id(p)] for p in part]
            group.update(options)
            if "foreach" in param_group:
                group["foreach"] = foreach
            layouts = self._declared_layouts(part, group.get("param_names"), len(self.param_groups))
            super().add_param_group(group)
            self.param_layouts.append(layouts)
            for p, layout in zip(part, layouts):
                self._layout_by_id[id(p)] = (weakref.ref(p), layout)
            self.layout.register(part)

    def group_foreach(self, group: dict) -> bool:
        """The path of ``group``: its own ``foreach`` if it set one, else the optimizer's."""
        foreach = group.get("foreach")
        return self.foreach if foreach is None else foreach

    def _declared_layouts(self, params: list, names, index: int) -> list[ParamLayout]:
        by_id = getattr(self, "_declared_by_id", {})
        by_name = getattr(self, "_declared_by_name", {})
        names = list(names) if names is not None else [None] * len(params)
        out = []
        for i, (p, name) in enumerate(zip(params, names)):
            layout = by_id.get(id(p))
            if layout is not None:
                self._used_ids.add(id(p))
            if name is not None and name in by_name:
                self._used_names.add(name)
                layout = by_name[name]
            layout = OUT_IN if layout is None else layout
            label = f"parameter {name!r}" if name is not None else f"parameter {i} of group {index}"
            layout.check(p.shape, f"{type(self).__name__}: {label}")
            out.append(layout)
        return out

    # ------------------------------------------------------------------ parameter layouts
    def layout_of(self, p: torch.Tensor) -> ParamLayout:
        """The :class:`~hfoptim.core.param_layout.ParamLayout` of parameter ``p`` (torch's
        ``(out, in)`` unless detected or declared)."""
        for group, layouts in zip(self.param_groups, self.param_layouts):
            for q, layout in zip(group["params"], layouts):
                if q is p:
                    return layout
        return self._built_with(p) or OUT_IN

    def _built_with(self, p: torch.Tensor) -> ParamLayout | None:
        """The layout of ``p`` if the optimizer was built with this very tensor (DeepSpeed keeps
        the model's parameters while the groups hold its flat partitions)."""
        known = self._layout_by_id.get(id(p))
        return known[1] if known is not None and known[0]() is p else None

    def layout_free(self, group: dict, layout: ParamLayout, shape) -> bool:
        """True when ``layout`` cannot change the group's step of a parameter of (global) ``shape``,
        so it is stepped as stored: every storage form elementwise, both for the parameter as
        stored and for one of its canonical matrices (``state_min_numel`` may choose other forms
        for the two sizes), and

        * with batch axes (fused experts): an elementwise rule and no modifier (a whole-tensor
          norm would span the matrices);
        * transposed only (Conv1D): a rule that is elementwise or uses whole-tensor statistics
          only (``Rule.orientation_free``: norms are the same for the transpose) and no modifier
          with per-unit statistics (``Modifier.per_unit``)."""
        rule = self.rule
        views = (
            ParamView(global_shape=torch.Size(shape)),
            ParamView(global_shape=torch.Size(layout.canonical_shape(shape))),
        )
        if not all(resolve.codec_for(rule, s, group, v).elementwise for s in rule.active_slots(group) for v in views):
            return False
        enabled = [m for m in MODIFIERS if m.enabled(group)]
        elementwise = rule.is_elementwise(group)
        if layout.batch:
            return elementwise and not enabled
        return (elementwise or rule.orientation_free) and not any(m.per_unit for m in enabled)

    def stepped_as(self, group: dict, layout: ParamLayout, shape) -> tuple[int, tuple] | None:
        """How a parameter of (global) ``shape`` is stepped: ``(matrices, shape of one)`` through its
        canonical view, or None when it is stepped as stored (default layout, or a step on which
        the layout has no effect: :meth:`layout_free`)."""
        if layout.is_default:
            return None
        one = layout.canonical_shape(shape)
        if self.layout_free(group, layout, shape):
            return None
        return layout.batch_size(shape), one

    def _canonical(self, gi: int, group: dict, units: list[Unit], returns: list | None = None) -> list[Unit]:
        """The units of ``group`` as the rules see them (:func:`~hfoptim.core.layout.canonical_units`);
        a sharded transposed weight is moved to whole output units by the layout, and a callable
        that sends its update back is appended to ``returns`` (None: nothing is written, state is
        only created)."""
        layouts: dict[int, ParamLayout] = {}
        positional = self.param_layouts[gi] if gi < len(self.param_layouts) else []
        positions = dict(zip((id(p) for p in group["params"]), positional))
        for unit in units:
            source = unit.source if unit.source is not None else unit.owner
            layout = positions.get(id(source)) or self._built_with(source)
            if layout is not None and self.stepped_as(group, layout, unit.view.global_shape) is not None:
                layouts[id(source)] = layout
        if not layouts:
            return units
        return canonical_units(
            units,
            layouts,
            lambda state, subs: self._init_batched(state, subs, group),
            lambda moved: self.layout.regroup_transposed(moved, returns),
        )

    def _init_batched(self, state: dict, subs: list[Unit], group: dict) -> None:
        """The state of a batch of matrices: each matrix's initial state, stacked."""
        per = [self._init_state(Unit(u.param, u.grad, {}, u.view, u.owner), group) for u in subs]
        for key in per[0]:
            state[key] = torch.stack([s[key] for s in per])

    def expected_state_shapes(self, p: torch.Tensor | None, group: dict, view: ParamView | None = None) -> dict:
        """The shape of every state tensor kept for ``p`` (its local part ``view``) in ``group``:
        the codecs' shapes for the parameter as stored, or for one canonical matrix stacked over
        the local matrices (see :meth:`stepped_as`), or, for a sharded transposed weight, for this
        process's whole output units (:func:`~hfoptim.core.layout.transposed_view`). ``p=None``: a
        matrix of its own (``view``)."""
        view = self.param_view(p) if view is None else view
        layout = OUT_IN if p is None else self.layout_of(p)
        stepped = self.stepped_as(group, layout, view.global_shape)
        if stepped is None:
            matrices, one_view, one_p = None, view, torch.empty(view.local_shape, device="meta")
        else:
            _, one = stepped
            batch = layout.batch
            inner = view.local_shape[batch:]
            # a batch of matrices keeps its state stacked; a transposed matrix, of the canonical shape
            matrices = (math.prod(view.local_shape) // math.prod(inner) if math.prod(inner) else 0) if batch else None
            one_view = ParamView(global_shape=torch.Size(one))
            if view.sharded and not batch:  # a sharded Conv1D weight: kept for whole output units
                one_view = transposed_view(view)
            one_p = torch.empty(one_view.local_shape, device="meta")
        expected = {"step": ()}
        for slot in self.rule.active_slots(group):
            codec = resolve.codec_for(self.rule, slot, group, one_view)
            expected.update(codec.shapes(slot, one_view, one_p))
        if matrices is None:
            return expected
        return {k: (matrices, *shape) for k, shape in expected.items()}

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

    def tensors_of_shape(self, group: dict, shape) -> int:
        """How many tensors of the (global) ``shape`` ``group`` steps, as counted at the start of the
        current or last :meth:`step` over the units the rules see (every process of a sharded
        run counts the same units, an empty shard included). ``compile="auto"`` compiles a shape
        that many small tensors share (:func:`~hfoptim.core.compiled_step.auto_takes`)."""
        return self._shape_counts.get(id(group), {}).get(tuple(shape), 0)

    def shape_counts(self, group: dict) -> Counter:
        """The (global) shapes ``group`` steps and how many tensors of each, as
        :meth:`tensors_of_shape` counts them (a new object at every :meth:`step`)."""
        return self._shape_counts.get(id(group), Counter())

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
        self._check_global_modes()
        # stable weight decay needs a statistic of every parameter's new second moment before any
        # parameter moves: every bucket is advanced first, the updates applied after
        deferred: list | None = [] if any(g["weight_decay_mode"] == "stable" for g in self.param_groups) else None
        returns: list = []  # sharded transposed weights stepped over whole output units: sent back after
        plan = [
            (group, self._canonical(gi, group, self.layout.units(self, group), returns))
            for gi, group in enumerate(self.param_groups)
        ]
        for _, units in plan:
            for unit in units:
                self._check_grad(unit)
        self._shape_counts = {id(group): Counter(tuple(u.view.global_shape) for u in units) for group, units in plan}
        if self._skips_nonfinite() and not self._grads_finite([u for _, units in plan for u in units]):
            self.nonfinite_skips += 1
            return closure_loss
        sharded = type(self.layout.stats) is not LocalStats
        mirrored: list = []  # uncut parameters' units, whose whole-tensor state the owners send the others
        self._workspace = compiled_step.Workspace()  # the kernels' buffers, for this step only
        try:
            self._step_plan(plan, loss_value, deferred, sharded, mirrored)
        finally:
            self._workspace = None
        uncut.mirror(self, mirrored, self.layout.stats)
        if deferred:
            scale = stable_scale([d.ctx for d in deferred])
            for d in deferred:
                d.finish(scale)
        for send_back in returns:
            send_back()
        return closure_loss

    def _step_plan(self, plan: list, loss_value, deferred, sharded: bool, mirrored: list) -> None:
        """Step every bucket of ``plan`` (``(group, units)`` pairs); the parameters held whole
        under sharding are appended to ``mirrored``."""
        for group, units in plan:
            for bucket in self._buckets(units, self.group_foreach(group)):
                # the step counters in one call (a LoRA set's 224 additions cost about 1 ms a step)
                torch._foreach_add_([self._init_state(unit, group)["step"] for unit in bucket], 1.0)
                held: list[Unit] = []
                if sharded and deferred is None:
                    # the parameters one process holds whole are stepped there alone, after the shared ones
                    bucket, held, cut_free = uncut.split(bucket)
                    mirrored.append((group, cut_free))
                self._step_calls(group, bucket, loss_value, deferred, sharded=sharded)
                if held:
                    self._step_calls(group, held, loss_value, deferred, sharded=False, share=uncut.share(cut_free))

    def _step_calls(
        self, group: dict, bucket: list[Unit], loss: float | None, deferred, sharded: bool, share: int = 1
    ) -> None:
        """Step ``bucket`` (state initialised, step counters advanced) in the calls
        :func:`~hfoptim.core.chunking.plan` cuts it into (``share``: see there); ``sharded``: with
        shards among them, whose collectives run first (:func:`~hfoptim.core.chunking.collectives_first`)."""
        if not bucket:
            return
        shard_sums = chunking.ShardSums()  # sums the row pieces of shards leave partial
        calls = chunking.plan(self, group, bucket, shard_sums, share)
        writebacks: list | None = None
        if deferred is None and sharded:
            calls, writebacks = chunking.collectives_first(self, group, calls), []
        for chunk, stats in calls:
            self._step_bucket(group, chunk, loss, stats, deferred, writebacks)
        for writeback in writebacks or ():
            writeback()
        shard_sums.complete(self.layout.stats)

    def _skips_nonfinite(self) -> bool:
        """Whether a non-finite gradient skips the step: ``skip_nonfinite`` of any group, None
        meaning on for a group that keeps compressed state."""
        for group in self.param_groups:
            skip = group["skip_nonfinite"]
            if skip or (skip is None and not resolve.all_dense(self.rule, group)):
                return True
        return False

    def _grads_finite(self, units: list[Unit]) -> bool:
        """True when every gradient this process holds is finite, agreed by all the processes
        that share a parameter: the flag goes through the layout's statistics (one MAX
        all-reduce per process group under sharding), so every process skips together. Gradients
        on the meta device (a memory estimate steps meta copies) hold no values: finite."""
        if any(u.grad.is_meta for u in units):
            return True
        return not bool(self.layout.stats.any_nonfinite([u.grad for u in units], [u.view for u in units]))

    def _check_global_modes(self) -> None:
        """Weight-decay forms that need every parameter at once, or a switch on some group."""
        modes = {g["weight_decay_mode"] for g in self.param_groups}
        if "stable" in modes and not self.layout.steps_all_parameters:
            raise RuntimeError(
                f"{type(self).__name__}: weight_decay_mode='stable' divides the decay by the mean second moment over "
                f"ALL parameters, but {self.layout.partial_step_reason}"
            )
        # DeepSpeed's ZeRO steps one parameter group a call: a no-decay group alone proves nothing
        cpr_groups = [g for g in self.param_groups if g["weight_decay_mode"] == "cpr"]
        if cpr_groups and self.layout.steps_all_parameters and all(g["weight_decay"] == 0 for g in cpr_groups):
            raise ValueError(
                f"{type(self).__name__}: weight_decay_mode='cpr' constrains the parameter groups whose weight_decay is "
                f"non-zero (its value is only the switch, as in automl/CPR), and every such group has weight_decay=0: "
                f"nothing would be constrained. Set weight_decay (e.g. 1.0; the HF Trainer: --weight_decay 1) on the "
                f"groups to constrain"
            )

    def _check_grad(self, unit: Unit) -> None:
        g = unit.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if g.is_complex():
            raise RuntimeError(f"{type(self).__name__} does not support complex gradients (got {g.dtype})")
        if g.shape != unit.param.shape:
            raise RuntimeError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(unit.param.shape)}")

    def _buckets(self, units: list[Unit], foreach: bool) -> list[list[Unit]]:
        if not foreach:
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
                if slot.init is None:  # zeros, which some storage forms hold without an encode pass
                    state.update(codec.init_zeros(slot, unit.param, dtype, unit.view, stats=self.layout.stats))
                else:
                    state.update(codec.init(slot, slot.initial(unit.param, dtype), unit.view, stats=self.layout.stats))
        return state

    def _step_bucket(
        self,
        group: dict,
        units: list[Unit],
        loss: float | None,
        stats,
        deferred: list | None = None,
        writebacks: list | None = None,
    ) -> None:
        """Step ``units`` (state initialised, step counters advanced) with the statistics
        backend ``stats`` (the layout's, or :class:`~hfoptim.core.stats.PieceStats` for a row
        piece); with ``deferred`` (stable weight decay) the update is recorded there, applied once
        every bucket has advanced; with ``writebacks`` the units' write-backs are appended there
        for the caller to run, instead of run here."""
        rule, foreach = self.rule, self.group_foreach(group)
        if deferred is None:  # (a deferred step records every tensor's second moment: plain path)
            # one compiled kernel per parameter
            rest = compiled_step.step_compiled(self, group, units, loss, stats, self._workspace)
            plain = {id(unit) for unit in rest}
            _write_back([unit for unit in units if id(unit) not in plain], writebacks)
            units = rest
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

        def done() -> None:
            if low_precision:
                for p, w in zip(params, p_work):
                    p.copy_(w)
            _write_back(units, writebacks)

        if deferred is not None:
            ctx.second_moment_sums = []  # the rule's preconditioner records sum(v_hat) per tensor
        pending = advance(rule, group, ctx, p_work, g, states, views, dtype, defer=deferred is not None)
        if pending is None:
            done()
            return
        pending.done = done
        deferred.append(pending)

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
        sd[STATE_DICT_TAG] = {
            "rule": self.rule.name,
            "format": convert.STATE_FORMAT,
            "shapes": shapes,
            "nonfinite_skips": self.nonfinite_skips,
        }
        return self.layout.export_state(self, sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by an optimizer of the same rule over the same shapes.

        * The storage options of this optimizer (``state``, ``state_min_numel``) and its run
          options (``compile``, ``skip_nonfinite``, ``foreach``) stay as they are: state saved in
          another form is converted to this optimizer's (decoded with the saved form, encoded with
          the current one; see :mod:`hfoptim.state.convert` for what each conversion loses). A
          sharded run holds only shards of the saved state and refuses a conversion, saying how
          to proceed. The rule's hyperparameters (``lr``, ``betas``, ...) come from the state
          dict, as torch does.
        * Every saved parameter group is validated now: a missing or bad hyperparameter raises
          ``ValueError`` naming it, not a ``KeyError`` at the next step.
        * A ``step`` saved as a plain number (torch allows it) is loaded as a tensor.

        Raises ``ValueError`` naming the problem for a state dict of another optimizer, another
        rule or other parameter shapes (``hfoptim.convert_state_dict`` turns torch's and
        bitsandbytes' Adam/AdamW state dicts into ones this method loads). State tensors keep
        the dtype they were saved with (torch would cast them to the parameter's dtype, losing
        fp32 state of bf16 parameters)."""
        self.layout = self.layout.for_step(self)
        state_dict = self.layout.import_state(self, state_dict)  # sharded state: back to this run's shards
        tag = state_dict.get(STATE_DICT_TAG)
        if tag is None:
            raise ValueError(
                f"this state_dict was not saved by an hfoptim optimizer (no {STATE_DICT_TAG!r} entry); "
                f"{type(self).__name__} cannot load it as it is. For torch.optim.Adam/AdamW or "
                f"bitsandbytes' Adam/AdamW 8-bit state, use hfoptim.convert_state_dict(state_dict, optimizer)"
            )
        if tag.get("rule") != self.rule.name:
            raise ValueError(
                f"this state_dict was saved by an hfoptim {tag.get('rule')!r} optimizer; "
                f"{type(self).__name__} runs {self.rule.name!r}"
            )
        fmt = convert.saved_format(tag)  # a sharding layout's import upgrades what it reads
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
        checked_groups = [
            self._checked_saved_group(gi, saved, group)
            for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups))
        ]
        group_of = {pid: gi for gi, saved in enumerate(saved_groups) for pid in saved["params"]}
        states = {}
        for pid, pstate in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                raise ValueError(f"state_dict has state for unknown parameter id {pid}")
            gi = group_of[pid]
            checked, saved_storage = checked_groups[gi]
            as_saved = {**self.param_groups[gi], **checked, **saved_storage}
            self.layout.check_param_state(self, pid, p, pstate, as_saved)
            if fmt < convert.STATE_FORMAT:
                pstate = convert.upgrade_param_state(self.rule, pstate, as_saved, self.param_view(p), fmt)
            pstate = dict(pstate)
            if "step" in pstate and not isinstance(pstate["step"], torch.Tensor):
                pstate["step"] = torch.tensor(float(pstate["step"]), dtype=torch.float32)
            states[pid] = self._converted(pid, p, pstate, as_saved, {**self.param_groups[gi], **checked})
        groups = [
            {**{k: v for k, v in saved.items() if k != "foreach"}, **checked}
            for saved, (checked, _) in zip(saved_groups, checked_groups)
        ]
        super().load_state_dict(
            {**{k: v for k, v in state_dict.items() if k != STATE_DICT_TAG}, "state": states, "param_groups": groups}
        )
        for pid, pstate in states.items():
            p = id_to_param[pid]
            for key, value in pstate.items():
                if key == "step" and isinstance(value, torch.Tensor):  # stepped in place: never the caller's
                    self.state[p][key] = value.detach().clone()
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        self.nonfinite_skips = int(tag.get("nonfinite_skips", 0))
        self.layout.after_load(self)

    def _checked_saved_group(self, index: int, saved: dict, group: dict) -> tuple[dict, dict]:
        """The options of saved parameter group ``index`` validated, with this optimizer's
        storage and run options (see :meth:`load_state_dict`); and the saved storage options.
        Raises ``ValueError`` naming a missing or bad hyperparameter."""
        kept = (*STORAGE_KEYS, *RUN_KEYS)
        missing = [k for k in self._spec if k not in saved and k not in kept]
        if missing:
            raise ValueError(
                f"parameter group {index} of this state_dict lacks {', '.join(missing)}: it was not saved by "
                f"{type(self).__name__} of this version. Add the values to state_dict['param_groups'][{index}] "
                f"(defaults: {', '.join(f'{k}={self._spec[k].default!r}' for k in missing)}) before loading"
            )
        options = {k: v for k, v in saved.items() if k not in PASSTHROUGH_GROUP_KEYS and k not in (*kept, "foreach")}
        options.update({k: group[k] for k in kept if k in self._spec})
        checked = self._validate_group(options, where=f"state_dict parameter group {index}", check_storage=False)
        if "foreach" in group:
            checked["foreach"] = group["foreach"]
        as_saved = {k: saved[k] for k in STORAGE_KEYS if k in saved}
        return checked, as_saved

    def _converted(self, pid, p: torch.Tensor, pstate: dict, saved_group: dict, group: dict) -> dict:
        """``pstate`` in the storage forms of ``group`` (see :mod:`hfoptim.state.convert`)."""
        if all(saved_group[k] == group[k] for k in STORAGE_KEYS):
            return pstate
        view = self.param_view(p)
        if isinstance(self.layout, LocalLayout) and not convert.needs_conversion(self.rule, saved_group, group, view):
            return pstate
        if not isinstance(self.layout, LocalLayout):
            raise ValueError(
                f"parameter {pid} was saved with state={saved_group['state']!r} "
                f"(state_min_numel={saved_group['state_min_numel']}), this optimizer keeps state={group['state']!r} "
                f"(state_min_numel={group['state_min_numel']}); a sharded run holds only shards of the saved state "
                f"and cannot convert it. Resume with state={saved_group['state']!r}, or load the full state_dict into "
                f"{type(self).__name__}(..., state={group['state']!r}) on one process (it converts) and save it"
            )
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        return convert.convert_param_state(
            self.rule, pstate, saved_group, group, view, self.compute_dtype(p), device, self.layout.stats
        )


def optimizer_class(rule: type[Rule], name: str, doc: str | None = None) -> type[RuleOptimizer]:
    """A named optimizer class for ``rule``: ``hfoptim.AdEMAMix(params, lr=...)``."""
    cls = type(name, (RuleOptimizer,), {"rule_class": rule, "__doc__": doc or rule.__doc__, "__module__": "hfoptim"})
    return cls


def _split_declared(declared: dict) -> tuple[dict[int, ParamLayout], dict[str, ParamLayout]]:
    """``param_layouts`` split into layouts by tensor ``id`` and by parameter name."""
    if not isinstance(declared, dict):
        raise TypeError(f"param_layouts must be a dict (parameter name or tensor -> layout), got {type(declared)}")
    by_id, by_name = {}, {}
    for key, value in declared.items():
        layout = param_layout.parse(value, f"param_layouts[{key if isinstance(key, str) else 'tensor'!r}]")
        if isinstance(key, str):
            by_name[key] = layout
        elif isinstance(key, torch.Tensor):
            by_id[id(key)] = layout
        else:
            raise TypeError(f"param_layouts keys are parameter names or tensors, got {type(key).__name__}")
    return by_id, by_name


def _write_back(units: list, writebacks: list | None) -> None:
    """Run the write-backs of ``units`` (stepped), or append them to ``writebacks`` for the
    caller to run after its calls."""
    for unit in units:
        if unit.writeback is None:
            continue
        if writebacks is None:
            unit.writeback()
        else:
            writebacks.append(unit.writeback)
