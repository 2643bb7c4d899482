"""The application built on the library: the demo, its data and the benchmark runner.

* ``python -m hfoptim.app.demo``: a short pretraining run with memory-efficient optimizers next
  to AdamW, with a table and a loss-curve plot (:mod:`hfoptim.app.demo`);
* :mod:`hfoptim.app.corpus`: the Python standard library's source as a corpus, a BPE tokenizer
  trained on it and the datasets the demo, the recipes and the benchmarks use;
* ``python -m hfoptim.app.bench``: runs the scripts in ``benchmarks/`` (:mod:`hfoptim.app.bench`).

It sits on top of the library: it imports ``hfoptim``, nothing in the library imports it. Its
own packages are the ``app`` extra: ``pip install 'hfoptim[app]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: how to install what the application needs beyond the library
INSTALL = "pip install 'hfoptim[app]'"


def require(module: str, purpose: str) -> ModuleType:
    """``module`` imported, or an ImportError that names the ``app`` extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.partition(".")[0]:  # the package is there, something it imports is not
            raise
        raise ModuleNotFoundError(
            f"{purpose} needs the package {module!r}, which the library does not install; "
            f"install the application's extra: {INSTALL}"
        ) from error
