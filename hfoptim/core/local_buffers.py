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

:func:`unread_users_allow_local_buffers` answers, for such a user, the contiguous index of its
own loop: a user that reads nothing sets no condition on where the buffer lives, so the check
decides on the users that do read it, as it does for a buffer without such users. An 8-bit step
then keeps the values it computes twice per block (the decoded state, the new moments) in
buffers of one block instead of buffers of the tensor's size, and allocates nothing of the
tensor's size. An answer of another index (the buffer kept whole) also compiles, but those
whole buffers were new allocations of every call: in processes whose allocator returned them to
the system, every step faulted them in again (64000-97000 page faults a step of an 8192x4096
tensor, 1.5-2.0x torch AdamW's step instead of 0.7-0.9x; measured on a 2-core Intel Xeon).

It is entered around each of the kit's compilations
(:func:`hfoptim.core.kernel_build.compiling_call`); the process's other compilations keep
inductor's code. An inductor without ``LoopBody.get_read_expr`` gets no change.
"""

from __future__ import annotations

import contextlib


def _contiguous_index(body):
    """The index at which a loop body of ``body.var_ranges`` visits its elements in order."""
    index, stride = 0, 1
    for var, size in reversed(body.var_ranges.items()):
        index += stride * var
        stride *= size
    return index


@contextlib.contextmanager
def unread_users_allow_local_buffers():
    """While inside, inductor's check for local buffers takes a user that does not read the
    buffer as a read at that user's contiguous index (no condition), instead of failing with
    ``KeyError``. Yields whether the change is installed (False for an inductor without the
    method)."""
    try:
        from torch._inductor.loop_body import LoopBody

        inductor_read_expr = LoopBody.__dict__["get_read_expr"]
    except (ImportError, KeyError):
        yield False
        return

    def get_read_expr(self, buffer_name):
        try:
            return inductor_read_expr(self, buffer_name)
        except KeyError:  # not read here: no condition on the buffer
            return _contiguous_index(self)

    LoopBody.get_read_expr = get_read_expr
    try:
        yield True
    finally:
        LoopBody.get_read_expr = inductor_read_expr
