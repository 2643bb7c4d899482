"""From ``TrainingArguments`` to an hfoptim optimizer's keyword arguments and parameter groups.

What the Trainer builds for an hfoptim name:

- ``lr`` is ``args.learning_rate``; ``weight_decay`` is ``args.weight_decay`` on the parameters
  transformers decays (``Trainer.get_decay_parameter_names``: not biases, not norms) and 0 on the
  others; ``betas[:2]`` and ``eps`` come from ``args.adam_beta1/adam_beta2/adam_epsilon`` for the
  rules where they mean Adam's (``Rule.adam_arguments``), and nowhere else;
- names whose rule has :data:`TRAINER_DEFAULTS` get them (``adafactor``: ``relative_step=False,
  scale_parameter=False``, as transformers' built-in, so the learning rate drives the step);
- every option in ``optim_args`` overrides those (``lr=...``, ``betas=(0.9,0.99,0.9999)``, ...;
  betas / eps that replace ``adam_beta1/2`` / ``adam_epsilon`` are logged); an option that
  contradicts the name's suffix (``adamw_8bit`` with ``state=bf16``, ``adamw_cautious`` with
  ``cautious=false``, ``adamw_agc`` with ``agc=0``) is refused, while a strength the name sets
  (``adamw2``'s ``spectral_cap``, ``adams``' ``weight_decay``) may be tuned (logged);
- ``auto`` values follow the run: :data:`AUTO_TOTAL_STEPS` become the total number of optimizer
  steps (AdEMAMix's warm-up lengths, as the paper sets them); for ``state`` and ``compile``,
  ``auto`` is their own value ``"auto"``;
- ``<selector>:<option>=<value>`` entries (or the Trainer's ``param_overrides``) set options for
  some parameters: ``selector`` is ``embeddings`` (parameters of ``nn.Embedding`` modules) or a
  regular expression searched in the parameter name, e.g. ``embeddings:state=fp32`` (32-bit
  state for embeddings under an 8-bit name) or ``lm_head:weight_decay=0``. Later entries win.
- ``<selector>:layout=<layout>`` declares the layout of the parameters a selector picks
  (:mod:`hfoptim.core.param_layout`: ``out_in``, ``in_out``, ``batch_out_in``, ``batch_in_out``)
  over the one detected from their modules, e.g. ``c_attn|c_proj|c_fc:layout=out_in`` steps
  GPT-2's Conv1D weights as stored.
- only parameters with ``requires_grad`` are given to the optimizer (peft/LoRA: the adapters);
- Muon (a rule with an ``algorithm`` option) gets each parameter's role from the model
  (:mod:`hfoptim.roles`: embeddings, output head, norms, biases -> AdamW), moved by name with
  ``adamw_params=(regex,...)`` / ``muon_params=(...)`` in ``optim_args``; a
  ``<selector>:algorithm=...`` override still wins.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import nn

from ... import roles
from ...core import param_layout
from ...core.hparams import HyperparameterError
from ...core.optimizer import engine_hyperparams
from ...core.param_layout import ParamLayout
from ...registry import OptimizerSpec
from .optim_args import AUTO, OptimArgsError

logger = logging.getLogger(__name__)

#: options that accept ``auto``: the total number of optimizer steps of the run
AUTO_TOTAL_STEPS = frozenset({"t_alpha", "t_beta3"})

#: what the Trainer sets, for names whose rule is the key, unless ``optim_args`` says otherwise:
#: transformers' ``optim="adafactor"`` builds its Adafactor with ``relative_step=False,
#: scale_parameter=False`` and the learning rate of the arguments, so through the Trainer the
#: learning rate the user sets drives the step (hfoptim.Adafactor's own defaults are the paper's
#: relative step; a warning at construction says so)
TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {"adafactor": {"relative_step": False, "scale_parameter": False}}

#: the ``embeddings`` selector: parameters of these module types
EMBEDDING_SELECTOR = "embeddings"

#: keys that are not options
RESERVED = frozenset({"params", "param_names", "name", "initial_lr"})

#: the per-parameter entry that declares a layout (not a hyperparameter): ``<selector>:layout=...``
LAYOUT_OPTION = "layout"


@dataclasses.dataclass(frozen=True)
class Override:
    """Options for the parameters a selector picks."""

    selector: str
    options: dict

    def matches(self, name: str, embedding_names: set[str]) -> bool:
        if self.selector == EMBEDDING_SELECTOR:
            return name in embedding_names
        return re.search(self.selector, name) is not None


def split_optim_args(parsed: dict[str, Any]) -> tuple[dict[str, Any], list[Override]]:
    """Plain options and per-parameter overrides (in the order given) of parsed ``optim_args``."""
    options: dict[str, Any] = {}
    overrides: dict[str, dict] = {}
    for key, value in parsed.items():
        if ":" in key:
            selector, option = key.split(":", 1)
            overrides.setdefault(selector, {})[option] = value
        else:
            options[key] = value
    return options, [Override(s, o) for s, o in overrides.items()]


def split_layouts(options: dict, overrides: list[Override], where: str) -> tuple[list[Override], list[tuple]]:
    """The overrides without their ``layout`` entries, and the ``(selector, ParamLayout)`` pairs in
    the order given. A ``layout`` without a selector is refused (it would apply to every tensor)."""
    if LAYOUT_OPTION in options:
        raise OptimArgsError(
            f"{where}: layout={options[LAYOUT_OPTION]!r} needs a selector: '<regex on parameter names>:layout=...', "
            f"e.g. 'c_attn|c_proj|c_fc:layout=out_in'"
        )
    rest, layouts = [], []
    for o in overrides:
        if LAYOUT_OPTION in o.options:
            try:
                layouts.append((o.selector, param_layout.parse(o.options[LAYOUT_OPTION], f"{where}: {o.selector}")))
            except ValueError as error:
                raise OptimArgsError(str(error)) from None
        others = {k: v for k, v in o.options.items() if k != LAYOUT_OPTION}
        if others or LAYOUT_OPTION not in o.options:
            rest.append(Override(o.selector, others))
    return rest, layouts


def declared_layouts(model: nn.Module, names: set[str], layouts: list[tuple]) -> dict[str, ParamLayout]:
    """The layout of each parameter named in ``names``: detected from its module, then the
    ``(selector, layout)`` declarations in order (later ones win)."""
    out = {n: layout for n, layout in param_layout.detect(model).items() if n in names}
    if layouts:
        embeddings = embedding_parameter_names(model)
        for name in names:
            for selector, layout in layouts:
                if Override(selector, {}).matches(name, embeddings):
                    out[name] = layout
    return out


def overrides_from(mapping: dict[str, dict] | None) -> list[Override]:
    """``{"embeddings": {"state": "fp32"}, "lm_head": {"weight_decay": 0.0}}`` as overrides."""
    if not mapping:
        return []
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise OptimArgsError(
            "param_overrides must map a selector ('embeddings' or a regex on parameter names) to a dict of options"
        )
    return [Override(str(s), dict(o)) for s, o in mapping.items()]


def _tunes(named: Any, value: Any) -> bool:
    """Whether ``value`` tunes the strength a name sets (a non-zero number over a non-zero
    number), rather than contradicting its choice (a form, a mode, a switch, or switching off)."""
    numbers = (int, float)
    is_number = isinstance(named, numbers) and not isinstance(named, bool)
    return is_number and isinstance(value, numbers) and not isinstance(value, bool) and bool(named) and bool(value)


def check_plan(spec: OptimizerSpec, options: dict, overrides: list[Override], where: str) -> None:
    """Validate options and overrides without a model: every key known, every value accepted.

    Raises :class:`OptimArgsError` naming the problem and listing the accepted options; also for an
    option that contradicts what the name's suffixes set (``adamw_8bit`` with ``state=bf16``)."""
    options = take_role_options(spec, options, where)[0]
    overrides, _ = split_layouts(options, overrides, where)
    for key, given in options.items():
        value, named = literal_auto(spec, key, given), spec.options.get(key)
        if key not in spec.options or value == named:
            continue
        if _tunes(named, value):
            logger.info("hfoptim: optim_args sets %s=%r over the %r of the name %r", key, value, named, spec.name)
        else:
            raise OptimArgsError(
                f"{where}: {key}={value!r} contradicts the name {spec.name!r}, which sets {key}={named!r}. "
                f"Choose one: a name without that suffix with {key}={value!r} in optim_args, or the name alone "
                f"(per-parameter '<selector>:{key}=...' entries may still differ)"
            )
    for bag, label in [(options, "")] + [(o.options, f"{o.selector}:") for o in overrides]:
        for key, value in bag.items():
            if key in RESERVED:
                raise OptimArgsError(f"{where}: {label}{key} is not an optimizer option")
            if value is AUTO and key not in AUTO_TOTAL_STEPS and not _auto_is_a_value(spec, key):
                raise OptimArgsError(
                    f"{where}: {label}{key}=auto: 'auto' is accepted for {', '.join(sorted(AUTO_TOTAL_STEPS))} "
                    f"(set from the total number of training steps) and for options whose value can be 'auto' "
                    f"(state, compile)"
                )
    for o in overrides:
        if o.selector != EMBEDDING_SELECTOR:
            try:
                re.compile(o.selector)
            except re.error as error:
                raise OptimArgsError(
                    f"{where}: selector {o.selector!r} is neither {EMBEDDING_SELECTOR!r} nor a regular expression "
                    f"({error})"
                ) from None

    def probe(values: dict) -> dict:  # 'auto' stands in as a valid step count
        return {k: (1 if v is AUTO and k in AUTO_TOTAL_STEPS else literal_auto(spec, k, v)) for k, v in values.items()}

    groups = [{"params": [nn.Parameter(torch.zeros(1))]}]
    groups += [{"params": [nn.Parameter(torch.zeros(1))], **probe(o.options)} for o in overrides]
    try:
        spec(groups, **probe(options))
    except (HyperparameterError, TypeError) as error:
        raise OptimArgsError(f"{where}: {error}") from None


def _auto_is_a_value(spec: OptimizerSpec, key: str) -> bool:
    """Whether the string ``"auto"`` is a value of option ``key`` (``state=auto``, ``compile=auto``)."""
    hp = engine_hyperparams(spec.rule).get(key)
    return hp is not None and hp.kind == "str" and (not hp.choices or "auto" in hp.choices)


def literal_auto(spec: OptimizerSpec | None, key: str, value: Any) -> Any:
    """``auto`` as the string ``"auto"`` for options that take it as a value, else ``value``."""
    if value is AUTO and key not in AUTO_TOTAL_STEPS and (spec is None or _auto_is_a_value(spec, key)):
        return "auto"
    return value


def take_role_options(spec: OptimizerSpec, options: dict, where: str) -> tuple[dict, dict]:
    """``options`` without the role options (``adamw_params``, ``muon_params``), and those, checked:
    only for a rule that chooses by role (Muon), regular expressions only."""
    by_name = {k: v for k, v in options.items() if k in roles.ROLE_OPTIONS}
    if not by_name:
        return options, {}
    if "algorithm" not in spec.rule.hyperparams:
        raise OptimArgsError(f"{where}: {', '.join(by_name)} choose Muon's parameter roles; {spec.name!r} has none")
    try:
        checked = {k: roles.patterns(v, k) for k, v in by_name.items()}
    except ValueError as error:
        raise OptimArgsError(f"{where}: {error}") from None
    return {k: v for k, v in options.items() if k not in by_name}, checked


def role_options(model: nn.Module, spec: OptimizerSpec, by_name: dict) -> dict[str, dict] | None:
    """Per-parameter options by role for a rule that takes them (Muon), else None."""
    if "algorithm" not in spec.rule.hyperparams:
        return None
    return roles.muon_options(model, **by_name)


def adam_arguments(args, spec: OptimizerSpec) -> dict[str, Any]:
    """``betas``/``eps`` from ``args.adam_*`` for rules whose betas and eps are Adam's
    (``Rule.adam_arguments``; other rules give them other meanings: set them in ``optim_args``);
    a warning where the user changed them for a rule that does not take them."""
    rule = spec.rule
    if rule.adam_arguments:
        out = {}
        betas = rule.hyperparams.get("betas")
        if betas is not None and betas.kind == "floats" and (betas.length or 0) >= 2:
            out["betas"] = (args.adam_beta1, args.adam_beta2, *betas.default[2:])
        eps = rule.hyperparams.get("eps")
        if eps is not None and eps.kind == "float":
            out["eps"] = args.adam_epsilon
        return out
    defaults = {f.name: f.default for f in dataclasses.fields(args) if f.name.startswith("adam_")}
    changed = [k for k, v in defaults.items() if getattr(args, k) != v]
    if changed:
        logger.warning(
            "%s: %s not used (%s does not take Adam's betas/eps from the arguments); set them in optim_args",
            spec.name,
            ", ".join(f"{k}={getattr(args, k)}" for k in changed),
            rule.name,
        )
    return {}


def resolve_auto(values: dict, total_steps: int | None, where: str) -> dict:
    """``auto`` values: the total number of steps for :data:`AUTO_TOTAL_STEPS`, the string
    ``"auto"`` for the other options (``state``, ``compile``; :func:`check_plan` allowed them)."""
    values = {k: literal_auto(None, k, v) for k, v in values.items()}
    if not any(v is AUTO for v in values.values()):
        return values
    if not total_steps or total_steps <= 0:
        raise OptimArgsError(
            f"{where}: 'auto' needs the total number of training steps, which is not known yet "
            f"(build the optimizer inside train(), or set max_steps)"
        )
    return {k: (int(total_steps) if v is AUTO else v) for k, v in values.items()}


def _log_overridden_arguments(args, spec: OptimizerSpec, from_args: dict, options: dict) -> None:
    """A warning where ``optim_args`` replace betas / eps the arguments set (``--adam_beta1`` ...)."""
    sources = {"betas": ("adam_beta1", "adam_beta2"), "eps": ("adam_epsilon",)}
    for key, names in sources.items():
        if key not in from_args or key not in options:
            continue
        given = tuple(options[key])[: len(names)] if key == "betas" else (options[key],)
        taken = tuple(getattr(args, n) for n in names)
        if tuple(given) != taken:
            logger.warning(
                "%s: optim_args %s=%r replace %s from the arguments",
                spec.name,
                key,
                options[key],
                ", ".join(f"{n}={v}" for n, v in zip(names, taken)),
            )


def trainer_defaults(spec: OptimizerSpec, options: dict) -> dict[str, Any]:
    """:data:`TRAINER_DEFAULTS` for ``spec``'s rule that neither ``optim_args`` nor the name set;
    a warning says where they differ from the optimizer class's own defaults."""
    defaults = {
        k: v for k, v in TRAINER_DEFAULTS.get(spec.rule.name, {}).items() if k not in options and k not in spec.options
    }
    if defaults:
        own = {k: spec.rule.hyperparams[k].default for k in defaults}
        logger.warning(
            "%s through the Trainer: %s, as transformers' built-in %r, so the learning rate drives the step "
            "(hfoptim.%s's own defaults are %s; set them in optim_args to use those)",
            spec.name,
            ", ".join(f"{k}={v}" for k, v in defaults.items()),
            spec.rule.name,
            spec.rule.class_name,
            ", ".join(f"{k}={v}" for k, v in own.items()),
        )
    return defaults


def optimizer_kwargs(args, spec: OptimizerSpec, options: dict, total_steps: int | None) -> dict[str, Any]:
    """Group defaults for the optimizer: the arguments' lr / weight decay / Adam betas and
    :data:`TRAINER_DEFAULTS`, then ``optim_args`` on top, ``auto`` resolved."""
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    from_args = adam_arguments(args, spec)
    _log_overridden_arguments(args, spec, from_args, options)
    kwargs.update(from_args)
    kwargs.update(trainer_defaults(spec, options))
    kwargs.update(options)
    return resolve_auto(kwargs, total_steps, f"optim={spec.name!r}")


def embedding_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


def build_param_groups(
    model: nn.Module,
    decay_names: set[str] | list[str],
    weight_decay: float,
    overrides: list[Override],
    total_steps: int | None = None,
    by_role: dict[str, dict] | None = None,
) -> list[dict]:
    """Parameter groups: transformers' decay / no-decay split, the options ``by_role`` (per
    parameter name, :func:`role_options`), then the overrides.

    One group per distinct set of options, each with ``param_names``: transformers' decay and
    no-decay groups first, then groups changed by overrides. Only ``requires_grad`` parameters are included."""
    decay = set(decay_names)
    embeddings = embedding_parameter_names(model) if any(o.selector == EMBEDDING_SELECTOR for o in overrides) else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to optimize")
    ordered = [(n, p) for n, p in named if n in decay] + [(n, p) for n, p in named if n not in decay]
    groups: dict[tuple, dict] = {}
    used = set()
    for name, p in ordered:
        options = {"weight_decay": weight_decay if name in decay else 0.0}
        if by_role is not None:
            options.update(by_role.get(name, {"algorithm": "muon" if p.dim() >= 2 else "adamw"}))
        matched = tuple(i for i, o in enumerate(overrides) if o.matches(name, embeddings))
        for i in matched:
            options.update(resolve_auto(overrides[i].options, total_steps, f"override {overrides[i].selector!r}"))
        used.update(matched)
        key = (bool(matched), tuple(sorted((k, repr(v)) for k, v in options.items())))
        group = groups.setdefault(key, {"params": [], "param_names": [], **options})
        group["params"].append(p)
        group["param_names"].append(name)
    for i, o in enumerate(overrides):
        if i not in used:
            logger.warning("optimizer override %r matched no trainable parameter", o.selector)
    # transformers' two groups first (decay, no decay), then the overridden ones, each in order
    return [group for key, group in sorted(groups.items(), key=lambda item: item[0][0])]
