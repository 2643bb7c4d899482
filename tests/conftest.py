"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def fresh_dynamo():
    """An empty dynamo cache, and reaching the recompile limit an error instead of a silent run of
    the rest uncompiled (compiled functions defined in one place share a code object, so one test
    compiling them for many shapes would compare eager against eager). ``config.patch``, not
    pytest's monkeypatch: its undo deletes a module attribute it did not find in the module's
    ``__dict__``, and a deleted dynamo option is hidden from every later test of the process."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
