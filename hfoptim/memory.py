"""How much memory optimizer state takes: measured on a live optimizer, or predicted for a model
before anything is allocated.

    >>> report = hfoptim.memory.state_bytes(optimizer)
    >>> report.total, report.per_param            # bytes, bytes per trainable parameter
    >>> report.by_kind                            # {'first_moment': ..., 'counter': ..., ...}
    >>> hfoptim.memory.estimate(config, "ademamix_8bit").per_param

**What is counted.** Every tensor the optimizer keeps: each ``optimizer.state[p]`` entry (dense
moments, 8-bit codes and their scales, factored rows and columns, sign bits, the per-parameter
step counter) and the tensors a wrapper keeps besides (Lookahead's slow weights, or any other
optimizer wrapping another through ``.optimizer`` whose attributes hold tensors). Each tensor is
counted once (by identity and storage), parameters themselves never. Parameters counted for
"per parameter" are the distinct tensors in ``param_groups`` (their ``numel``).

**Kinds.** For an hfoptim optimizer each key is attributed to the kind of the slot it stores
(``first_moment``, ``second_moment``, ``buffer``, ``scalar``: see :mod:`hfoptim.core.rule`);
``step`` is a ``counter`` (4 bytes per tensor: the 0-d fp32 counter each parameter keeps, which
makes AdamW 8 + 4/numel bytes per parameter, 8.0 on a large matrix); a wrapper's tensors are
``wrapper``; keys of other optimizers are ``other`` (``step`` still a counter).

**Estimates** build the optimizer over the parameters' shapes on the ``meta`` device and ask each
codec for the state it would create (:meth:`hfoptim.state.Codec.init` on meta tensors: shapes and
dtypes, no storage), so an estimate equals what :func:`state_bytes` measures after a step
(tested). A transformers config is turned into a model with ``AutoModelForCausalLM.from_config``
under ``torch.device("meta")``. The estimate is for one process holding every parameter; under
sharding each process keeps about ``1/world_size`` of it (see :mod:`hfoptim.footprint`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from . import roles
from .core import param_layout
from .core.optimizer import RuleOptimizer
from .core.param_layout import ParamLayout
from .core.stats import ParamView
from .models import model_from_config
from .registry import OptimizerSpec, get_optimizer
from .state import resolve

COUNTER = "counter"
WRAPPER = "wrapper"
OTHER = "other"

#: keys of well-known non-hfoptim optimizers (torch.optim, bitsandbytes) and the kind they hold
KNOWN_KEYS = {
    "step": COUNTER,
    "exp_avg": "first_moment",
    "exp_avg_sq": "second_moment",
    "max_exp_avg_sq": "second_moment",
    "momentum_buffer": "first_moment",
    "state1": "first_moment",
    "state2": "second_moment",
    "absmax1": "first_moment",
    "absmax2": "second_moment",
    "qmap1": "first_moment",
    "qmap2": "second_moment",
}

#: attributes of optimizer objects that are never extra state
_NOT_STATE = frozenset({"param_groups", "state", "defaults", "optimizer"})


@dataclass
class StateReport:
    """Optimizer-state bytes: ``total``, split ``by_key`` (state key, e.g. ``"exp_avg.codes"``)
    and ``by_kind``; ``params`` is the number of parameter elements the optimizer updates."""

    total: int = 0
    params: int = 0
    by_key: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def per_param(self) -> float:
        """Bytes per parameter element (0.0 without parameters)."""
        return self.total / self.params if self.params else 0.0

    @property
    def per_param_without_counters(self) -> float:
        """Bytes per parameter element, step counters left out (8.0 exactly for AdamW)."""
        return (self.total - self.by_kind.get(COUNTER, 0)) / self.params if self.params else 0.0

    def add(self, key: str, kind: str, nbytes: int) -> None:
        self.total += nbytes
        self.by_key[key] = self.by_key.get(key, 0) + nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    def table(self) -> str:
        """A small text table: bytes and bytes per parameter, by kind and by key."""
        lines = [f"{'':24s} {'bytes':>14s} {'B/param':>9s}"]
        for title, parts in (("kind", self.by_kind), ("key", self.by_key)):
            for name, nbytes in sorted(parts.items(), key=lambda kv: -kv[1]):
                per = nbytes / self.params if self.params else 0.0
                lines.append(f"{title + ' ' + name:24s} {nbytes:14,d} {per:9.4f}")
        lines.append(f"{'total':24s} {self.total:14,d} {self.per_param:9.4f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- measuring
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _identity(t: torch.Tensor) -> tuple:
    """Identity of a tensor's memory: views of one storage region count once."""
    if t.device.type == "meta":
        return ("meta", id(t))
    try:
        storage = t.untyped_storage()
        return (t.device.type, storage.data_ptr(), t.storage_offset(), t.numel(), t.dtype)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return ("id", id(t))


def _slot_kinds(optimizer) -> list[tuple[str, str]]:
    rule = getattr(optimizer, "rule", None)
    slots = getattr(rule, "slots", ()) if rule is not None else ()
    return [(slot.name, slot.kind) for slot in slots]


def kind_of(key: str, slots: list[tuple[str, str]]) -> str:
    """The kind a state key holds, given the optimizer's ``(slot name, kind)`` pairs."""
    if key == "step":
        return COUNTER
    for name, kind in sorted(slots, key=lambda s: -len(s[0])):
        if key == name or key.startswith(name + "."):
            return kind
    return KNOWN_KEYS.get(key, OTHER)


def _chain(optimizer) -> list:
    """The optimizer and every optimizer it wraps through ``.optimizer`` (outermost first)."""
    out, seen = [], set()
    current = optimizer
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append(current)
        inner = getattr(current, "optimizer", None)
        current = inner if inner is not current else None
    return out


def _param_ids(optimizer) -> tuple[set[int], int]:
    ids, numel = set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ids:
                ids.add(id(p))
                numel += p.numel()
    return ids, numel


def _tensors_in(obj, depth: int = 0):
    """Tensors held by a dict / list / tuple (values only; dict keys are parameters). A tensor
    subclass that stores its data in inner tensors (torchao's 8-bit state: codes, scales, code
    table) counts as those."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            for name in names:
                yield from _tensors_in(getattr(obj, name), depth + 1)
            return
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)


def state_bytes(optimizer) -> StateReport:
    """Measure the state ``optimizer`` holds now (see the module docstring)."""
    chain = _chain(optimizer)
    param_ids, numel = _param_ids(optimizer)
    report = StateReport(params=numel)
    seen: set = set()

    def count(t: torch.Tensor, key: str, kind: str) -> None:
        if id(t) in param_ids:
            return
        ident = _identity(t)
        if ident in seen:
            return
        seen.add(ident)
        report.add(key, kind, _nbytes(t))

    slots = [pair for opt in chain for pair in _slot_kinds(opt)]
    for opt in chain:  # per-parameter state (a wrapper's `state` may be its inner optimizer's)
        state = getattr(opt, "state", None)
        if not isinstance(state, dict):
            continue
        for pstate in list(state.values()):
            if not isinstance(pstate, dict):
                continue
            for key, value in pstate.items():
                for t in _tensors_in(value):
                    count(t, str(key), kind_of(str(key), slots))
    for opt in chain:  # tensors a wrapper keeps besides (Lookahead's slow weights, ...)
        for attr, value in vars(opt).items():
            if attr in _NOT_STATE or attr.startswith("_"):
                continue
            for t in _tensors_in(value):
                count(t, f"{type(opt).__name__}.{attr}", WRAPPER)
    return report


# ------------------------------------------------------------------------------------ estimating
def _role_groups(model: torch.nn.Module, metas: dict[int, torch.Tensor], options: dict) -> list[dict]:
    """Muon's parameter groups by role (:mod:`hfoptim.roles`) over the meta copies ``metas``
    (by the id of the model's parameter)."""
    groups: dict[tuple, dict] = {}
    for name, opts in roles.muon_options(model, **options).items():
        meta = metas.get(id(model.get_parameter(name)))
        if meta is not None:
            groups.setdefault(tuple(sorted(opts.items())), {"params": [], **opts})["params"].append(meta)
    return list(groups.values())


def _parameters(source) -> tuple[list[torch.Tensor], dict[int, ParamLayout]]:
    """Trainable parameters (each once) of a module or an iterable of tensors / parameter groups;
    and the layouts detected for them (by ``id``; a module's only)."""
    layouts: dict[int, ParamLayout] = {}
    if isinstance(source, torch.nn.Module):
        named = dict(source.named_parameters())
        layouts = {id(named[n]): layout for n, layout in param_layout.detect(source).items() if n in named}
        params = [p for p in source.parameters() if p.requires_grad]
    else:
        params = []
        for item in source:
            if isinstance(item, dict):
                params.extend(item["params"] if not isinstance(item["params"], torch.Tensor) else [item["params"]])
            else:
                params.append(item)
    out, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out, layouts


def _meta(p: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)


def estimate(source, optimizer: Any = "adamw", *, model_class=None, **kwargs) -> StateReport:
    """Predict what :func:`state_bytes` would report for ``optimizer`` over ``source``, without
    allocating: ``source`` is a model, a transformers config (built on the meta device as
    ``model_class``, by default the class the config is for:
    :func:`hfoptim.models.model_class_for`) or an iterable of parameters; ``optimizer`` a
    registry name (``"ademamix_8bit"``), an :class:`~hfoptim.registry.OptimizerSpec` or an
    hfoptim optimizer class; ``kwargs`` its options (``state="8bit"``, ``state_min_numel=...``,
    ``lookahead_k``, ``param_layouts``...). A model's parameter layouts (Conv1D, fused experts)
    are detected as :func:`hfoptim.create_optimizer` does. Muon over a model (or config) gives
    each parameter its role (:mod:`hfoptim.roles`: AdamW's two moments for embeddings, head, norms
    and biases; one momentum for matrices)."""
    if isinstance(optimizer, str):
        spec = get_optimizer(optimizer)
    elif isinstance(optimizer, OptimizerSpec):
        spec = optimizer
    elif isinstance(optimizer, type) and issubclass(optimizer, RuleOptimizer):
        spec = OptimizerSpec(optimizer.rule_class.name, optimizer.rule_class, {})
    else:
        raise TypeError(f"estimate() needs an optimizer name, an OptimizerSpec or an hfoptim class, got {optimizer!r}")
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):  # a transformers config
        source = model_from_config(source, device="meta", model_class=model_class)
    params, detected = _parameters(source)
    metas = [_meta(p) for p in params]
    report = StateReport(params=sum(p.numel() for p in metas))
    if not metas:
        return report
    declared = {m: detected[id(p)] for p, m in zip(params, metas) if id(p) in detected}
    meta_of = {id(p): m for p, m in zip(params, metas)}
    for key, layout in (kwargs.pop("param_layouts", None) or {}).items():  # the user's tensors -> their metas
        declared[meta_of.get(id(key), key) if isinstance(key, torch.Tensor) else key] = layout
    targets: list = metas
    by_name = {k: kwargs.pop(k) for k in roles.ROLE_OPTIONS if k in kwargs}
    if "algorithm" in spec.rule.hyperparams and isinstance(source, torch.nn.Module):
        # Muon from a model: by role, as create_optimizer and the Trainer build it
        targets = _role_groups(source, meta_of, by_name)
    elif by_name:
        raise ValueError(f"{', '.join(by_name)} choose Muon's parameter roles from a model; not for {spec.name!r}")
    built = spec(targets, param_layouts=declared, **kwargs)  # validates; allocates nothing (state is lazy)
    engine = next(o for o in _chain(built) if isinstance(o, RuleOptimizer))
    rule = engine.rule
    slots = [(slot.name, slot.kind) for slot in rule.slots]
    for group in engine.param_groups:
        for p in group["params"]:
            view = engine.param_view(p)
            dtype = RuleOptimizer.compute_dtype(p)
            # stepped through its canonical view: the state of one matrix, once per matrix
            stepped = engine.stepped_as(group, engine.layout_of(p), view.global_shape)
            matrices, one = (1, p) if stepped is None else (stepped[0], _meta(torch.empty(stepped[1], device="meta")))
            one_view = engine.param_view(p) if stepped is None else ParamView.of(one)
            report.add("step", COUNTER, 4 * matrices)  # the fp32 step counter of each matrix
            for slot in rule.active_slots(group):
                codec = resolve.codec_for(rule, slot, group, one_view)
                stored = codec.init(slot, slot.initial(one, dtype), one_view, stats=engine.layout.stats)
                for key, t in stored.items():
                    report.add(key, kind_of(key, slots), _nbytes(t) * matrices)
    if spec.lookahead:
        for p in metas:
            copy_dtype = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
            report.add("Lookahead.slow", WRAPPER, p.numel() * torch.empty((), dtype=copy_dtype).element_size())
    return report


def per_param(name: str, shape: tuple[int, ...] = (4096, 4096), **kwargs) -> float:
    """Estimated state bytes per parameter of ``name`` for one tensor of ``shape`` (a large
    matrix by default, where the per-tensor counter and small-tensor rules vanish)."""
    p = torch.empty(shape, device="meta")
    return estimate([p], name, **kwargs).per_param


def by_kind_per_param(report: StateReport) -> dict[str, float]:
    """``report.by_kind`` divided by the parameter count."""
    n = max(report.params, 1)
    return {k: v / n for k, v in report.by_kind.items()}


def merge(reports) -> StateReport:
    """The sum of several reports (e.g. one per parameter group or model part)."""
    out = StateReport()
    keys: dict[str, int] = defaultdict(int)
    kinds: dict[str, int] = defaultdict(int)
    for r in reports:
        out.total += r.total
        out.params += r.params
        for k, v in r.by_key.items():
            keys[k] += v
        for k, v in r.by_kind.items():
            kinds[k] += v
    out.by_key, out.by_kind = dict(keys), dict(kinds)
    return out


__all__ = ["StateReport", "by_kind_per_param", "estimate", "kind_of", "merge", "per_param", "state_bytes"]
