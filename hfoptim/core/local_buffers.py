"""Inductor's outer-loop fusion with local buffers, for buffers that one of their users does not read.

Inductor's C++ backend (torch 2.13) runs nodes that share their outer loops under one outer
loop (its outer-loop fusion: the block maxima of an 8-bit slot, then the codes made with them,
block by block), and gives a buffer whose users all run inside that loop a buffer of one
iteration's size instead of the tensor's (a local buffer), when every user reads it at its own
contiguous index. To check that, it asks each user's loop body for the index it reads the buffer
at (``LoopBody.get_read_expr``). A user that does not read it at all raises ``KeyError``, and
the whole kernel fails to compile: the nodes that write into a graph input (a state tensor the
step updates in place) depend on the nodes that read that input before, by an ordering-only
dependency, so they count as users of those nodes' buffers without reading them.

:func:`unread_buffers_stay_whole` answers None for such a user instead, which the check takes as
a read at another index: that one buffer keeps its full size, and the rest of the fusion goes on
as inductor decides it. The kernels it affects are exactly those that would fail.

It is entered around each of the kit's compilations
(:func:`hfoptim.core.compiled_step._compiling_call`); the process's other compilations keep
inductor's code. An inductor without ``LoopBody.get_read_expr`` gets no change.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def unread_buffers_stay_whole():
    """While inside, inductor's check for local buffers takes a user that does not read the
    buffer as a read at another index, instead of failing with ``KeyError``. Yields whether the
    change is installed (False for an inductor without the method)."""
    try:
        from torch._inductor.loop_body import LoopBody

        inductor_read_expr = LoopBody.__dict__["get_read_expr"]
    except (ImportError, KeyError):
        yield False
        return

    def get_read_expr(self, buffer_name):
        try:
            return inductor_read_expr(self, buffer_name)
        except KeyError:
            return None  # not read here: not "the contiguous index", so the buffer stays whole

    LoopBody.get_read_expr = get_read_expr
    try:
        yield True
    finally:
        LoopBody.get_read_expr = inductor_read_expr
