"""From ``TrainingArguments`` to an hfoptim optimizer's keyword arguments and parameter groups.

What the Trainer builds for an hfoptim name:

- ``lr`` is ``args.learning_rate``; ``weight_decay`` is ``args.weight_decay`` on the parameters
  transformers decays (``Trainer.get_decay_parameter_names``: not biases, not norms) and 0 on the
  others; ``betas[:2]`` and ``eps`` come from ``args.adam_beta1/adam_beta2/adam_epsilon`` for the
  rules where they mean Adam's (:data:`ADAM_ARGUMENT_RULES`), and nowhere else;
- every option in ``optim_args`` overrides those (``lr=...``, ``betas=(0.9,0.99,0.9999)``, ...);
- ``auto`` values follow the run: :data:`AUTO_TOTAL_STEPS` become the total number of optimizer
  steps (AdEMAMix's warm-up lengths, as the paper sets them);
- ``<selector>:<option>=<value>`` entries (or the Trainer's ``param_overrides``) set options for
  some parameters: ``selector`` is ``embeddings`` (parameters of ``nn.Embedding`` modules) or a
  regular expression searched in the parameter name, e.g. ``embeddings:state=fp32`` (32-bit
  state for embeddings under an 8-bit name) or ``lm_head:weight_decay=0``. Later entries win.
- ``<selector>:layout=<layout>`` declares the layout of the parameters a selector picks
  (:mod:`hfoptim.core.param_layout`: ``out_in``, ``in_out``, ``batch_out_in``, ``batch_in_out``)
  over the one detected from their modules, e.g. ``c_attn|c_proj|c_fc:layout=out_in`` steps
  GPT-2's Conv1D weights as stored.
- only parameters with ``requires_grad`` are given to the optimizer (peft/LoRA: the adapters).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import nn

from ...core import param_layout
from ...core.hparams import HyperparameterError
from ...core.param_layout import ParamLayout
from ...registry import OptimizerSpec
from .optim_args import AUTO, OptimArgsError

logger = logging.getLogger(__name__)

#: rules whose first two betas are Adam's (first- and second-moment EMAs) and whose eps is Adam's
#: denominator epsilon: they take ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` from the
#: arguments. Other rules give those betas other meanings (Adan, Lion, AdaLo's loss EMA), so the
#: arguments are not applied there; set them in ``optim_args``.
ADAM_ARGUMENT_RULES = frozenset({"adamw", "ademamix", "adanorm", "adapnm", "diffgrad"})

#: options that accept ``auto``: the total number of optimizer steps of the run
AUTO_TOTAL_STEPS = frozenset({"t_alpha", "t_beta3"})

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


def check_plan(spec: OptimizerSpec, options: dict, overrides: list[Override], where: str) -> None:
    """Validate options and overrides without a model: every key known, every value accepted.

    Raises :class:`OptimArgsError` naming the problem and listing the accepted options."""
    overrides, _ = split_layouts(options, overrides, where)
    for bag, label in [(options, "")] + [(o.options, f"{o.selector}:") for o in overrides]:
        for key, value in bag.items():
            if key in RESERVED:
                raise OptimArgsError(f"{where}: {label}{key} is not an optimizer option")
            if value is AUTO and key not in AUTO_TOTAL_STEPS:
                raise OptimArgsError(
                    f"{where}: {label}{key}=auto: 'auto' is accepted for {', '.join(sorted(AUTO_TOTAL_STEPS))} "
                    f"(set from the total number of training steps)"
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
        return {k: (1 if v is AUTO else v) for k, v in values.items()}

    groups = [{"params": [nn.Parameter(torch.zeros(1))]}]
    groups += [{"params": [nn.Parameter(torch.zeros(1))], **probe(o.options)} for o in overrides]
    try:
        spec(groups, **probe(options))
    except (HyperparameterError, TypeError) as error:
        raise OptimArgsError(f"{where}: {error}") from None


def adam_arguments(args, spec: OptimizerSpec) -> dict[str, Any]:
    """``betas``/``eps`` from ``args.adam_*`` for rules in :data:`ADAM_ARGUMENT_RULES`; a warning
    where the user changed them for a rule that does not take them."""
    rule = spec.rule
    if rule.name in ADAM_ARGUMENT_RULES:
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
    if not any(v is AUTO for v in values.values()):
        return values
    if not total_steps or total_steps <= 0:
        raise OptimArgsError(
            f"{where}: 'auto' needs the total number of training steps, which is not known yet "
            f"(build the optimizer inside train(), or set max_steps)"
        )
    return {k: (int(total_steps) if v is AUTO else v) for k, v in values.items()}


def optimizer_kwargs(args, spec: OptimizerSpec, options: dict, total_steps: int | None) -> dict[str, Any]:
    """Group defaults for the optimizer: the arguments' lr / weight decay / Adam betas, then
    ``optim_args`` on top, ``auto`` resolved."""
    kwargs: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    kwargs.update(adam_arguments(args, spec))
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
) -> list[dict]:
    """Parameter groups: transformers' decay / no-decay split, then the overrides.

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
