"""Typed ``optim_args``: the string ``TrainingArguments.optim_args`` holds, read with types.

transformers splits ``optim_args`` on ``,`` and ``=`` and keeps every value a string, so
``betas=(0.9,0.99)`` cannot be written. Here the same ``key=value,key=value`` form is read with:

- numbers: ``1e-3`` -> float, ``1000`` -> int (an int is accepted where a float is expected);
- ``true`` / ``false`` -> bool, ``none`` -> None, ``auto`` -> :data:`AUTO` (filled from the run);
- tuples: ``(0.9,0.99)`` or ``[0.9,0.99]`` (commas inside brackets do not split entries);
- anything else -> a string (``state=8bit``); quote it to force a string (``name='1'``).

A key may carry a selector, ``<selector>:<option>=<value>``, for a per-parameter override
(see :mod:`.groups`), e.g. ``embeddings:state=fp32``.

:func:`format_optim_args` writes a dict back in this form, so ``parse(format(d)) == d`` and the
arguments stay one JSON-serializable string.
"""

from __future__ import annotations

import re
from typing import Any

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SELECTOR = re.compile(r"^[^=,:\s]+$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class _Auto:
    """A value that follows the run (e.g. the total number of training steps)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "auto"

    def __reduce__(self):
        return (_Auto, ())


#: the ``auto`` value
AUTO = _Auto()


class OptimArgsError(ValueError):
    """``optim_args`` cannot be read (syntax) or holds an option the optimizer does not take."""


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes; refuse unbalanced brackets."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise OptimArgsError(f"optim_args {text!r}: unbalanced {ch!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if depth != 0 or quote:
        raise OptimArgsError(f"optim_args {text!r}: unbalanced brackets or quotes")
    parts.append("".join(current))
    return parts


def parse_value(text: str) -> Any:
    """One value: number, bool, None, auto, tuple or string."""
    s = text.strip()
    if not s:
        raise OptimArgsError("empty value")
    if s[0] in "([":
        closing = ")" if s[0] == "(" else "]"
        if s[-1] != closing:
            raise OptimArgsError(f"value {s!r}: expected it to end with {closing!r}")
        inner = s[1:-1].strip()
        if not inner:
            return ()
        items = split_top_level(inner)
        if any(not item.strip() for item in items):
            raise OptimArgsError(f"value {s!r}: empty item")
        return tuple(parse_value(item) for item in items)
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if low == "auto":
        return AUTO
    if _INT.match(s):
        return int(s)
    if _FLOAT.match(s) or low in ("inf", "+inf", "-inf", "nan"):
        return float(s)
    return s


def parse_optim_args(value: str | dict | None) -> dict[str, Any]:
    """``optim_args`` (a string, a dict, or None) as a dict of typed values.

    In a dict, string values are read like the string form (so a JSON config may hold
    ``"betas": "(0.9,0.99)"``) and lists become tuples."""
    if value is None:
        return {}
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            _check_key(str(key))
            out[str(key)] = _typed(v)
        return out
    if not isinstance(value, str):
        raise OptimArgsError(f"optim_args must be a string like 'betas=(0.9,0.99),eps=1e-8' or a dict, got {value!r}")
    out: dict[str, Any] = {}
    if not value.strip():
        return out
    for entry in split_top_level(value):
        if not entry.strip():
            raise OptimArgsError(f"optim_args {value!r}: empty entry (a stray comma?)")
        if "=" not in entry:
            raise OptimArgsError(f"optim_args {value!r}: entry {entry.strip()!r} is not key=value")
        key, raw = entry.split("=", 1)
        key = key.strip()
        _check_key(key)
        if key in out:
            raise OptimArgsError(f"optim_args {value!r}: {key!r} given twice")
        try:
            out[key] = parse_value(raw)
        except OptimArgsError as error:
            raise OptimArgsError(f"optim_args {value!r}, {key}: {error}") from None
    return out


def _typed(v: Any) -> Any:
    if isinstance(v, str):
        return parse_value(v)
    if isinstance(v, (list, tuple)):
        return tuple(_typed(x) for x in v)
    return v


def _check_key(key: str) -> None:
    name = key.split(":", 1)[1] if ":" in key else key
    selector = key.split(":", 1)[0] if ":" in key else None
    if not _KEY.match(name) or (selector is not None and not _SELECTOR.match(selector)):
        raise OptimArgsError(
            f"optim_args key {key!r}: expected a name like 'eps' or a per-parameter override like "
            f"'embeddings:state' (<selector>:<option>)"
        )


def format_value(v: Any) -> str:
    if v is AUTO:
        return "auto"
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(format_value(x) for x in v) + ")"
    if isinstance(v, str):
        if v and v.strip() == v and not set(v) & set(",=()[]'\"") and parse_value(v) == v:
            return v
        if "'" in v and '"' in v:
            raise OptimArgsError(f"optim_args value {v!r} holds both quote characters")
        return f'"{v}"' if "'" in v else f"'{v}'"
    raise OptimArgsError(f"optim_args value {v!r} of type {type(v).__name__} cannot be written as text")


def format_optim_args(values: dict[str, Any]) -> str:
    """The canonical string form of ``values`` (``parse_optim_args`` reads it back equal)."""
    return ",".join(f"{key}={format_value(v)}" for key, v in values.items())
