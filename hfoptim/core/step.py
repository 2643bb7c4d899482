"""One step of a bucket's tensors after the bookkeeping: the flow the plain path runs for a
bucket and the compiled path (:mod:`hfoptim.core.compiled_step`) traces for one parameter.

Per step: gradient modifiers -> l2 decay -> decode the slots -> ``rule.update`` -> encode ->
update modifiers -> weight decay and ``p <- p - lr u`` -> post modifiers (CPR). Both step paths
import it from here, below them both, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..modifiers import GRAD, MODIFIERS, POST, UPDATE
from ..modifiers.weight_decay import add_l2, apply_update
from ..state import resolve
from ..state.codec import decode_all, encode_all
from .context import StepContext, owns_memory
from .rule import Rule
from .stats import ParamView
from .tensorlist import TensorList


class SlotValues:
    """The decoded slots a rule updates, as attributes (``s.exp_avg``)."""


def advance(
    rule: Rule,
    group: dict,
    ctx: StepContext,
    p_work: TensorList,
    g: TensorList,
    states: list[dict],
    views: list[ParamView],
    dtype: torch.dtype,
    defer: bool = False,
) -> PendingUpdate | None:
    """One step of the tensors of a bucket after the bookkeeping: gradient modifiers -> l2 decay
    -> decode the slots -> ``rule.update`` -> encode -> update modifiers -> weight decay and
    ``p <- p - lr u`` (``p_work`` in place) -> post modifiers (CPR). The plain path calls it for a
    bucket; the compiled path (:mod:`hfoptim.core.compiled_step`) traces it for one parameter. With
    ``defer`` everything up to the update direction runs now and the rest is returned as a
    :class:`PendingUpdate` (stable weight decay: the engine applies it once every bucket has
    its second moment)."""
    for modifier in MODIFIERS:
        if modifier.stage == GRAD and modifier.enabled(group):
            g = modifier.apply(ctx, g, g, p_work)
    if group["weight_decay_mode"] == "l2" and group["weight_decay"] != 0:
        g = add_l2(g, p_work, group["weight_decay"])

    active = rule.active_slots(group)
    stats = ctx.stats
    codecs = {slot.name: [resolve.codec_for(rule, slot, group, v) for v in views] for slot in active}
    slots = SlotValues()  # not SimpleNamespace: torch.compile traces a plain class, not that one
    for slot in active:
        decoded = decode_all(slot, codecs[slot.name], states, views, dtype, stats)  # each codec once
        setattr(slots, slot.name, TensorList(decoded, ctx.foreach))
    stored_early: set[str] = set()
    # the closure below must not capture ``ctx``: ``ctx.store`` holding it would make a reference
    # cycle, and every decoded slot of the step would then wait for the cyclic garbage collector
    # instead of being freed with the step (chunked pieces piled up: 45 -> 142 MiB on one
    # 32000x768 adamw_8bit step, tests/test_chunking.py)
    temporaries = ctx.temporaries
    ctx_encode_later = ctx.encode_later

    def store(values: TensorList, name: str) -> None:  # ctx.stored(): encode now, decode back
        if name in ctx_encode_later:
            raise RuntimeError(
                f"hfoptim internal error: {rule.name} stores {name!r} mid-step but does not name it in stores_early"
            )
        slot = next(x for x in active if x.name == name)
        encode_all(slot, codecs[name], states, list(values), views, stats)
        back = decode_all(slot, codecs[name], states, views, dtype, stats)
        temporary = []
        for i, (codec, stored) in enumerate(zip(codecs[name], back)):
            if not codec.identity:
                values.tensors[i] = stored  # the decoded tensor replaces the old one: no copy pass
            temporary.append(not codec.identity and owns_memory(stored, states[i].values()))
        temporaries[name] = temporary
        stored_early.add(name)

    ctx.store = store
    ctx.slots = slots
    u = rule.update(ctx, p_work, g, slots)
    for slot in active:
        if slot.name in stored_early:
            continue
        if slot.name in ctx.encode_later:  # the compiled kernel writes it out; encoded after the call
            ctx.encoded_later[slot.name] = getattr(slots, slot.name)
            continue
        encode_all(slot, codecs[slot.name], states, list(getattr(slots, slot.name)), views, stats)

    updates = [modifier for modifier in MODIFIERS if modifier.stage == UPDATE and modifier.enabled(group)]
    for modifier in updates:
        ctx.last_update_modifier = modifier is updates[-1]
        u = modifier.apply(ctx, u, g, p_work)
    pending = PendingUpdate(ctx, p_work, u, g)
    if defer:
        return pending
    pending.finish(None)
    return None


class PendingUpdate:
    """The end of a bucket's step: weight decay, ``p <- p - lr u``, post modifiers, then
    ``done`` (the engine's copy back to low-precision parameters and ZeRO write-back)."""

    def __init__(self, ctx: StepContext, p: TensorList, u: TensorList, g: TensorList):
        self.ctx, self.p, self.u, self.g = ctx, p, u, g
        self.done: Callable[[], None] | None = None

    def finish(self, stable) -> None:
        """Apply the update; ``stable`` is ``1/sqrt(mean v_hat)`` over all parameters (stable
        weight decay), or None when no group uses it."""
        ctx, group, p = self.ctx, self.ctx.group, self.p
        posts = [m for m in MODIFIERS if m.stage == POST and m.enabled(group)]
        before = [m.prepare(ctx, p) for m in posts]
        wd, mode = group["weight_decay"], group["weight_decay_mode"]
        if mode == "stable":  # AdamS: decoupled decay scaled by 1/sqrt(mean v_hat)
            wd, mode = wd * stable, "decoupled"
        elif mode in ("l2", "cpr") or (mode == "decoupled" and ctx.decay_applied):
            wd = 0.0  # l2: already in the gradient; cpr: the constraint below replaces the decay; LAMB: in u
        apply_update(p, self.u, ctx.lr, wd, mode, ctx.update_scales)
        for modifier, prepared in zip(posts, before):
            modifier.apply(ctx, prepared, self.g, p)
        if self.done is not None:
            self.done()
