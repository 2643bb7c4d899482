"""Hyperparameter declarations and their validation.

Every rule, modifier and the engine declare their hyperparameters as :class:`HP` entries. A value
is checked once, when a parameter group is added, and a bad value raises ``ValueError`` naming the
hyperparameter and the accepted range, so nobody reads an unvalidated ``group.get(...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class HyperparameterError(ValueError):
    """A hyperparameter is missing, unknown or outside its accepted range."""


@dataclass(frozen=True)
class HP:
    """One hyperparameter: its default and what it accepts.

    ``kind`` is one of ``float``, ``int``, ``bool``, ``str``, ``floats`` (a tuple of floats of
    length ``length``), ``optional_float`` (a float or None) or ``optional_int`` (an integer or
    None).
    """

    default: Any
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: value must be > low (else >= low)
    high_open: bool = False  # True: value must be < high (else <= high)
    choices: tuple = ()
    length: int | None = None
    doc: str = ""
    check: Callable[[Any], str | None] | None = field(default=None, compare=False)

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "bool":
            return "True or False"
        lo = "" if self.low is None else f"{self.low} {'<' if self.low_open else '<='} "
        hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high}"
        what = {
            "floats": f"{self.length} numbers, each",
            "optional_float": "None or a number",
            "optional_int": "None or an integer",
        }.get(self.kind, "a number" if self.kind in ("float", "int") else self.kind)
        if self.kind == "int":
            what = "an integer"
        if lo or hi:
            return f"{what} with {lo}x{hi}"
        return what

    def _in_range(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return True

    def validate(self, name: str, value: Any) -> Any:
        """Return the value in canonical form, or raise :class:`HyperparameterError`."""

        def fail(extra: str = "") -> HyperparameterError:
            return HyperparameterError(f"invalid {name}={value!r}: expected {self.describe()}{extra}")

        if self.choices:
            if value not in self.choices:
                raise fail()
        elif self.kind == "bool":
            if not isinstance(value, bool):
                raise fail()
        elif self.kind == "str":
            if not isinstance(value, str):
                raise fail()
        elif self.kind == "optional_float":
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not self._in_range(float(value)):
                    raise fail()
                value = float(value)
        elif self.kind == "optional_int":
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or not self._in_range(value):
                    raise fail()
        elif self.kind == "floats":
            if not isinstance(value, (tuple, list)) or len(value) != self.length:
                raise fail()
            for v in value:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not self._in_range(float(v)):
                    raise fail()
            value = tuple(float(v) for v in value)
        elif self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_range(value):
                raise fail()
        else:  # float; a 0-d tensor learning rate is accepted as torch does
            if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
                checked = float(value.item())
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail()
            else:
                checked = float(value)
                value = checked
            if not self._in_range(checked):
                raise fail()
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise fail(f" ({problem})")
        return value


def betas(default: tuple, doc: str = "") -> HP:
    """Moving-average coefficients, each in [0, 1)."""
    return HP(default, kind="floats", low=0.0, high=1.0, high_open=True, length=len(default), doc=doc)


def validate_all(spec: dict[str, HP], values: dict[str, Any], owner: str) -> dict[str, Any]:
    """Validate ``values`` against ``spec``; fill in defaults; refuse unknown names."""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(spec), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise HyperparameterError(
            f"{owner} got unknown hyperparameter(s) {', '.join(hints)}; accepted: {', '.join(sorted(spec))}"
        )
    out = {}
    for name, hp in spec.items():
        out[name] = hp.validate(name, values.get(name, hp.default))
    return out
