"""Optimizers by name.

A name is a base (a rule such as ``ademamix``, or an alias such as ``lamb``) followed by any
number of suffixes, each setting options: ``ademamix_cautious_8bit`` is AdEMAMix with cautious
masking and 8-bit state. Nothing here creates classes per combination.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch

from . import roles
from .core import param_layout
from .core.hparams import HyperparameterError
from .core.optimizer import RuleOptimizer, validate_options
from .core.rule import Rule
from .lookahead import Lookahead
from .modifiers import MODIFIERS
from .modifiers.spectral import DEFAULT_TAU
from .optimizers import CLASSES
from .rules import RULES
from .state.codec import CODECS

#: names that are a rule with options, as the field knows them
ALIASES: dict[str, tuple[str, dict]] = {
    "adam_atan2": ("adamw", {"denominator": "atan2"}),
    "nadamw": ("adamw", {"nesterov": True}),
    "lamb": ("adamw", {"trust_ratio": True}),
    # issue 16: AdamW^2 (arXiv 2505.21910), the paper's name for AdamW with the spectral step cap
    "adamw2": ("adamw", {"spectral_cap": DEFAULT_TAU}),
    # issue 16 (i16a): AdamW with stable weight decay (its authors' default strength) / with CPR
    "adams": ("adamw", {"weight_decay_mode": "stable", "weight_decay": 1e-4}),
    "adamcpr": ("adamw", {"weight_decay_mode": "cpr", "weight_decay": 1.0}),
}

#: suffix -> the options it sets (codecs give "_<form>": "_8bit", "_factored", ...)
SUFFIXES: dict[str, dict] = {
    **{m.name: dict(m.suffix_kwargs) for m in MODIFIERS},
    "cwd": {"weight_decay_mode": "cautious"},
    "atan2": {"denominator": "atan2"},
    "softplus": {"denominator": "softplus"},
    "nesterov": {"nesterov": True},
    # issue 16 (i16a): stable weight decay (AdamS) on any preconditioned rule
    "swd": {"weight_decay_mode": "stable", "weight_decay": 1e-4},
    # issue 16 (i16): adaptive memory momentum (arXiv 2510.04988): sgdm_am (AM-SGD), adamw_am (AM-AdamW)
    "am": {"adaptive_memory": True},
}

LOOKAHEAD_SUFFIX = "lookahead"


def suffixes() -> dict[str, dict]:
    """Every suffix a name may carry (``cautious``, ``8bit``, ...) -> the options it sets."""
    out = dict(SUFFIXES)
    for form in CODECS:
        if form != "fp32":
            out[form] = {"state": form}
    return out


@dataclass(frozen=True)
class OptimizerSpec:
    """What a name stands for: a rule, the options its suffixes set, and Lookahead or not."""

    name: str
    rule: type[Rule]
    options: dict = field(default_factory=dict)
    lookahead: bool = False

    @property
    def optimizer_class(self) -> type[RuleOptimizer]:
        return CLASSES[self.rule.name]

    def __call__(self, params, **kwargs) -> torch.optim.Optimizer:
        """Build the optimizer; ``kwargs`` override the name's options."""
        lookahead_kwargs = {k: kwargs.pop(k) for k in ("lookahead_k", "lookahead_alpha") if k in kwargs}
        if lookahead_kwargs and not self.lookahead:
            raise HyperparameterError(f"{sorted(lookahead_kwargs)} need a '_lookahead' name, not {self.name!r}")
        optimizer = self.optimizer_class(params, **{**self.options, **kwargs})
        if self.lookahead:
            optimizer = Lookahead(
                optimizer,
                k=lookahead_kwargs.get("lookahead_k", 5),
                alpha=lookahead_kwargs.get("lookahead_alpha", 0.5),
            )
        return optimizer


def bases() -> dict[str, tuple[type[Rule], dict]]:
    """Every name a name may start with (a rule or an alias) -> its rule and the options it sets."""
    bases = {name: (rule, {}) for name, rule in RULES.items()}
    for alias, (rule_name, options) in ALIASES.items():
        if rule_name in RULES:
            bases[alias] = (RULES[rule_name], dict(options))
    return bases


def get_optimizer(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` for ``name`` (lowercase, e.g. ``"ademamix_cautious_8bit"``).

    Raises ``ValueError`` listing the close matches for an unknown name, and naming the problem
    for a combination that cannot work (e.g. a modifier the rule does not support).
    """
    if not isinstance(name, str) or name != name.lower():
        raise ValueError(f"optimizer names are lowercase strings, got {name!r}")
    known_bases = bases()
    known_suffixes = suffixes()
    base = max((b for b in known_bases if name == b or name.startswith(b + "_")), key=len, default=None)
    if base is None:
        raise ValueError(_unknown(name))
    rule, options = known_bases[base]
    options = dict(options)
    lookahead = False
    rest = name[len(base) + 1 :].split("_") if name != base else []
    for token in rest:
        if token == LOOKAHEAD_SUFFIX:
            lookahead = True
            continue
        if token not in known_suffixes:
            raise ValueError(_unknown(name, f"unknown suffix {token!r}; suffixes: {', '.join(sorted(known_suffixes))}"))
        if "state" in known_suffixes[token] and "state" in options:
            raise ValueError(
                f"{name!r} names two storage forms ({options['state']!r} and {known_suffixes[token]['state']!r}); "
                f"a slot is stored one way: keep one suffix"
            )
        options.update(known_suffixes[token])
    spec = OptimizerSpec(name, rule, options, lookahead)
    _check_combination(spec)
    return spec


def _check_combination(spec: OptimizerSpec) -> None:
    """Validate the name's options once, without parameters, so a bad combination fails by name."""
    try:
        validate_options(spec.rule(), spec.options, spec.name)
    except HyperparameterError as error:
        raise ValueError(f"{spec.name!r} is not a valid combination: {error}") from None


def _unknown(name: str, detail: str = "") -> str:
    close = difflib.get_close_matches(name, list_optimizers(), n=5, cutoff=0.6)
    msg = f"unknown optimizer {name!r}"
    if detail:
        msg += f" ({detail})"
    if close:
        msg += f"; did you mean: {', '.join(close)}?"
    return msg + "; see hfoptim.list_optimizers()"


def list_optimizers(pattern: str | None = None) -> list[str]:
    """Names that build an optimizer: every rule and alias, each with each storage form and
    modifier it supports (suffixes also combine: ``adan_cautious_8bit``). ``pattern`` filters with
    shell-style wildcards, e.g. ``"*8bit"``."""
    names = set()
    codecs = {form for form in CODECS if form != "fp32"}
    for base, (rule, options) in bases().items():
        names.add(base)
        for suffix, extra in suffixes().items():
            redundant = all(options.get(k) == v for k, v in extra.items()) or (
                set(rule.default_state.values()) == {extra.get("state")}  # e.g. smmf_smmf
            )
            if base in ALIASES and suffix not in codecs:
                continue  # aliases are listed with storage forms only; other suffixes still parse
            if not redundant and _valid(rule, {**options, **extra}):
                names.add(f"{base}_{suffix}")
        if base in RULES:
            names.add(f"{base}_{LOOKAHEAD_SUFFIX}")
    out = sorted(names)
    if pattern:
        out = [n for n in out if fnmatch.fnmatch(n, pattern)]
    return out


def _valid(rule: type[Rule], options: dict) -> bool:
    try:
        validate_options(rule(), options, rule.name)
    except HyperparameterError:
        return False
    return True


def create_optimizer(model_or_params: Any, name: str, **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for a model (its trainable parameters) or an iterable of
    parameters / parameter groups. ``kwargs`` are the optimizer's hyperparameters and options,
    e.g. ``create_optimizer(model, "ademamix", lr=1e-4, state="8bit")``.

    Muon from a model chooses by role (:mod:`hfoptim.roles`: embeddings, the output head, norms
    and biases take AdamW); ``adamw_params=[regex, ...]`` / ``muon_params=[...]`` move parameters
    by name. From a plain parameter list: >= 2-D Muon, the rest AdamW.

    From a model, the layout of each parameter is detected from its module
    (:func:`hfoptim.core.param_layout.detect`: ``Conv1D`` weights, fused experts); ``param_layouts``
    in ``kwargs`` adds to or overrides it (by tensor or name)."""
    spec = get_optimizer(name)
    by_name = {k: kwargs.pop(k) for k in roles.ROLE_OPTIONS if k in kwargs}
    takes_roles = "algorithm" in spec.rule.hyperparams
    if by_name and not takes_roles:
        raise ValueError(f"{', '.join(by_name)} choose Muon's parameter roles; {name!r} has none")
    if not isinstance(model_or_params, torch.nn.Module):
        if by_name:
            raise ValueError(
                f"{', '.join(by_name)} select parameters by name: pass the model, not a list of parameters"
            )
        return spec(model_or_params, **kwargs)
    model = model_or_params
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters())
    keep = {id(p) for p in params}
    declared: dict = {named[n]: layout for n, layout in param_layout.detect(model).items() if id(named[n]) in keep}
    for key, layout in dict(kwargs.pop("param_layouts", None) or {}).items():
        if isinstance(key, str):
            if key not in named:
                raise ValueError(f"param_layouts names {key!r}, which is not a parameter of the model")
            key = named[key]
        declared[key] = layout
    kwargs["param_layouts"] = declared
    if not takes_roles:
        return spec(params, **kwargs)
    groups: dict[tuple, dict] = {}
    for pname, options in roles.muon_options(model, **by_name).items():
        group = groups.setdefault(tuple(sorted(options.items())), {"params": [], "param_names": [], **options})
        group["params"].append(model.get_parameter(pname))
        group["param_names"].append(pname)
    return spec(list(groups.values()), **kwargs)
