"""Storage forms of optimizer state (codecs) and the choice of form per slot.

Each storage form is a module of this package defining a :class:`Codec` subclass with a ``name``;
modules are discovered, so adding a form is adding a module (as for rules): its instance lands in
``CODECS`` and its name becomes a ``state=`` value and a registry suffix (``adamw_<name>``).
"""

import importlib
import inspect
import pkgutil

from . import resolve
from .codec import CODECS, Codec, Dense, get_codec


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Codec) and obj.name and obj.__module__ == module.__name__:
                known = CODECS.get(obj.name)
                if known is not None and type(known) is not obj:
                    raise RuntimeError(f"two storage forms named {obj.name!r}: {type(known)} and {obj}")
                if known is None:
                    CODECS[obj.name] = obj()


_discover()

__all__ = ["CODECS", "Codec", "Dense", "get_codec", "resolve"]
