"""Which optimizer an ``optim`` value names: an hfoptim one or a transformers built-in.

Rules, in order:

1. ``"transformers:<name>"`` is the transformers built-in ``<name>``, ``"hfoptim:<name>"`` the
   hfoptim optimizer ``<name>``; an ``OptimizerNames`` member is always the built-in.
2. A plain name that hfoptim knows is hfoptim's (also where transformers has the same name:
   ``"ademamix"``, ``"adafactor"``, ... name hfoptim's optimizers here; their transformers
   versions stay reachable as ``"transformers:ademamix"``, ``"transformers:adafactor"``).
3. Any other plain name must be a transformers built-in, which then behaves exactly as in
   transformers.

How a choice is stored in ``TrainingArguments.optim`` (:attr:`OptimChoice.stored`): an hfoptim
name as the plain string; a built-in as its ``OptimizerNames`` member, exactly as transformers
stores it, except a built-in whose name hfoptim also uses, kept as ``"transformers:<name>"`` so a
JSON round trip cannot turn it into hfoptim's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from transformers.training_args import OptimizerNames

from ...registry import LOOKAHEAD_SUFFIX, OptimizerSpec, bases, get_optimizer, list_optimizers, suffixes

HFOPTIM_PREFIX = "hfoptim:"
TRANSFORMERS_PREFIX = "transformers:"


@dataclass(frozen=True)
class OptimChoice:
    """A resolved ``optim``: ``kind`` is ``"hfoptim"`` or ``"transformers"``."""

    kind: str
    name: str
    spec: OptimizerSpec | None = None
    builtin: OptimizerNames | None = None

    @property
    def is_hfoptim(self) -> bool:
        return self.kind == "hfoptim"

    @property
    def stored(self) -> Any:
        """The value kept in ``TrainingArguments.optim``."""
        if self.is_hfoptim:
            return self.name
        if _hfoptim_knows(self.name):
            return TRANSFORMERS_PREFIX + self.name
        return self.builtin


def builtin_names() -> list[str]:
    return [m.value for m in OptimizerNames]


def _hfoptim_knows(name: str) -> bool:
    try:
        get_optimizer(name)
    except ValueError:
        return False
    return True


def resolve_optim(value: Any) -> OptimChoice:
    """Resolve an ``optim`` value, or raise ``ValueError`` listing what is accepted."""
    if isinstance(value, OptimizerNames):
        return OptimChoice("transformers", value.value, builtin=value)
    if isinstance(value, Enum):
        value = value.value
    if not isinstance(value, str):
        raise ValueError(f"optim must be an optimizer name (a string), got {value!r}")
    if value.startswith(TRANSFORMERS_PREFIX):
        name = value[len(TRANSFORMERS_PREFIX) :]
        if name not in builtin_names():
            raise ValueError(_unknown(value, hfoptim=False))
        return OptimChoice("transformers", name, builtin=OptimizerNames(name))
    if value.startswith(HFOPTIM_PREFIX):
        name = value[len(HFOPTIM_PREFIX) :]
        return OptimChoice("hfoptim", name, spec=_hfoptim_spec(name, value))
    try:
        return OptimChoice("hfoptim", value, spec=get_optimizer(value))
    except ValueError as error:
        hfoptim_error = str(error)
    if value in builtin_names():
        return OptimChoice("transformers", value, builtin=OptimizerNames(value))
    if "not a valid combination" in hfoptim_error:
        raise ValueError(f"optim={value!r}: {hfoptim_error}") from None
    raise ValueError(_unknown(value))


def _hfoptim_spec(name: str, value: str) -> OptimizerSpec:
    try:
        return get_optimizer(name)
    except ValueError as error:
        raise ValueError(f"optim={value!r}: {error}") from None


def _unknown(value: str, hfoptim: bool = True) -> str:
    builtins = builtin_names()
    pool = list(dict.fromkeys(list(builtins) + (list_optimizers() if hfoptim else [])))
    close = difflib.get_close_matches(value.split(":")[-1], pool, n=6, cutoff=0.6)
    msg = f"unknown optim={value!r}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    if hfoptim:
        all_suffixes = sorted([*suffixes(), LOOKAHEAD_SUFFIX])
        msg += (
            f" hfoptim names are <base>[_<suffix>...] with bases {', '.join(sorted(bases()))} and suffixes "
            f"{', '.join(all_suffixes)} (every valid combination: hfoptim.list_optimizers())."
        )
    msg += f" transformers built-ins: {', '.join(builtins)}"
    if hfoptim:
        msg += f" (a built-in whose name hfoptim also uses: '{TRANSFORMERS_PREFIX}<name>')."
    return msg
