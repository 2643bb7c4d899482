"""The algorithms. Each module defines one :class:`~hfoptim.core.rule.Rule` subclass (or a few
closely related ones); they are collected here by discovery, so adding a rule is adding a module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from ..core.rule import Rule


def _discover() -> dict[str, type[Rule]]:
    found: dict[str, type[Rule]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Rule) and obj is not Rule and obj.name and obj.__module__ == module.__name__:
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two rules named {obj.name!r}: {found[obj.name]} and {obj}")
                found[obj.name] = obj
    return found


#: every rule by its registry name
RULES: dict[str, type[Rule]] = _discover()
