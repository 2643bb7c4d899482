"""The compiled path: one fused kernel per parameter for compressed (8-bit, 4-bit, bf16) state.

With state stored in 8 bits, the plain path decodes each slot into an fp32 tensor, runs the
rule's ``foreach`` operations over it, and encodes it back: a dozen passes over memory and as
many temporary tensors, several times the cost of AdamW's step. Here the engine's per-bucket flow
(:func:`hfoptim.core.step.advance`: gradient modifiers, decode, ``rule.update``, encode, update
modifiers, weight decay and ``p <- p - lr u``) is traced by ``torch.compile`` for ONE parameter
at a time, so inductor fuses decode, update and encode into a few loops over the parameter. The
rule's code is the same code the plain path runs; nothing is written twice.

* One compilation per rule and distinct parameter shape (static shapes; a transformer has a
  handful), each in its own copy of the traced function so dynamo's per-function recompile
  limit never applies across shapes. The learning rate is a traced 0-d tensor input and the
  step counter the 0-d tensor kept in the state (:class:`TracedStepContext`), so neither a
  learning-rate schedule nor the step count recompiles. The traced function never sees the
  parameter group itself: it gets :func:`hyperparameters`, a copy of the group's validated
  options without ``lr`` (and without ``params``, ``initial_lr`` and whatever else a scheduler
  or the Trainer keeps there), so dynamo cannot guard on the learning rate's value. The other
  hyperparameters are baked in (changing one recompiles).
* Compiling is announced on the ``hfoptim.core.fused`` logger: a warning before the first
  compilation of the process (the first step is slow), an info line per compiled shape with the
  time it took. Inductor's FX graph cache (on by default) keeps the kernels on disk, so a later
  process skips inductor's code generation (dynamo still traces once per shape and process).
* A parameter takes this path when its group's ``compile`` option allows it (``"auto"``: tensors
  of at least :data:`AUTO_MIN_NUMEL` elements when torch.compile works on this machine; ``"on"``:
  every tensor; ``"off"``: never), one of its slots is stored by a codec marked ``fusable`` (and
  the codec's ``fusable_for(view)`` agrees: 8-/4-bit state needs rows of whole blocks), it is
  held whole by this process (the sharded statistics backends combine statistics of many tensors
  in one collective, which a per-parameter kernel would split) or is a row piece of such a
  tensor (:mod:`hfoptim.core.chunking`; stepped as rows from 0, so only storage forms marked
  ``offset_free``), it is on a CPU or CUDA device, the rule does not need the loss, the rule
  allows it for the group (``Rule.compiles``: Muon's matrices are orthogonalized whole, outside a
  per-parameter kernel), its group does not use CPR (a per-tensor decision each step) and no group
  uses stable weight decay (the engine then defers every update; see :func:`advance`).
* If compiling fails (no C++ compiler, an unsupported platform) the failure is reported once
  with a warning and every parameter runs the plain path from then on.

The compiled and plain paths compute the same formulas; they differ by floating-point rounding
(inductor may contract ``a*b+c``), which with 8-bit state can flip a value sitting on a code
midpoint to the neighbouring code. ``tests/test_state_compiled.py`` bounds the difference.
"""

from __future__ import annotations

import logging
import time
import types
import warnings
from typing import Any

import torch

from ..state import resolve
from .context import StepContext
from .stats import LocalStats, ParamView, PieceStats
from .step import advance
from .tensorlist import TensorList

#: with ``compile="auto"``, parameters at least this large take the compiled path
AUTO_MIN_NUMEL = 1 << 16

_compiled: dict[tuple, Any] = {}
_failed: str | None = None
#: how many parameters took the compiled path, per kernel key (tests and benchmarks read it to
#: check that the compiled path ran)
calls: dict[tuple, int] = {}

logger = logging.getLogger(__name__)


class TracedStepContext(StepContext):
    """The context of one parameter on the compiled path: its step ``t`` is a 0-d tensor, and
    :meth:`per_step` returns ``fn(t)`` as it comes (a 0-d tensor, or a number when ``fn`` ignores
    ``t``), so the traced graph takes the step as an input instead of a constant."""

    def per_step(self, fn):
        return fn(self.steps[0])


def hyperparameters(engine, group: dict) -> dict:
    """What the traced function may read of ``group``: the validated options of the rule,
    modifiers and engine, without ``lr`` (a traced input instead). Dynamo guards on every value
    the traced code reads from a dict it is given (and, for some dicts, on all of them); the
    group itself holds the learning rate a scheduler changes every step, the parameters and
    keys of other libraries, so passing it would recompile at every learning-rate change."""
    return {key: group[key] for key in engine._spec if key != "lr" and key in group}


def _advance_one(rule, group: dict, p, grad, state: dict, stats, loss, lr: torch.Tensor, global_shape: tuple):
    """The engine's flow for one parameter held whole, or a row piece of one (traced by
    torch.compile). ``group`` is :func:`hyperparameters` (no ``lr``); ``lr`` comes as a 0-d
    tensor, an input of the graph (a float would be baked in and recompile with every
    learning-rate change). ``global_shape`` is the whole parameter's shape (storage forms are
    chosen by it); a piece is seen as rows starting at 0, which its ``offset_free`` storage
    forms cannot tell from its true place (one kernel for all the pieces of one shape)."""
    view = ParamView(global_shape=torch.Size(global_shape), local_rows=p.shape[0] if p.dim() else None)
    ctx = TracedStepContext(group, [state["step"]], [view], stats, True, loss, [state], lr=lr)
    g = TensorList([grad], True)
    if group["maximize"]:
        g = -g
    advance(rule, group, ctx, TensorList([p], True), g, [state], [view], p.dtype)


def _compiled_fn(key: tuple = ()):
    """The compiled kernel for ``key`` (rule, shape, dtypes, device). Each key gets its own copy
    of :func:`_advance_one`'s code object, so that dynamo keeps one cache entry per copy: its
    recompile limit (8 per code object) then never sends a model with many shapes or a
    second optimizer to uncompiled code, and no call evaluates the guards of other shapes."""
    fn = _compiled.get(key)
    if fn is None:
        code = _advance_one.__code__.replace(co_name=f"_advance_one_{len(_compiled)}")
        copy = types.FunctionType(code, _advance_one.__globals__, code.co_name, _advance_one.__defaults__)
        # static shapes: one kernel per parameter shape (symbolic shapes get specialised anyway by
        # the broadcasting checks of the foreach ops); indices into the code tables are in range
        # by construction (uint8 codes, clamped intervals): no bounds checks
        fn = torch.compile(copy, dynamic=False, options={"assert_indirect_indexing": False})
        _compiled[key] = fn
    return fn


def _run(key: tuple, *args) -> None:
    """Call the kernel of ``key``; the first call of a key compiles it, announced on the logger."""
    fn = _compiled_fn(key)
    if key in calls:
        fn(*args)
        calls[key] += 1
        return
    rule, shape, dtype = key[0].name, key[1], key[2]
    what = f"{rule} step for a {tuple(shape)} {str(dtype).replace('torch.', '')} tensor"
    if not calls:
        logger.warning(
            "hfoptim: compiling the fused optimizer step (torch.compile, once per rule and parameter shape); "
            "the first step is slower, later runs reuse inductor's disk cache. compile='off' skips it."
        )
    logger.info("hfoptim: compiling the fused %s", what)
    start = time.perf_counter()
    fn(*args)
    calls[key] = 1
    logger.info("hfoptim: compiled the fused %s in %.1f s", what, time.perf_counter() - start)


def compile_available(device: torch.device) -> bool:
    """Whether torch.compile can be tried for ``device`` in this process."""
    if _failed is not None or device.type not in ("cpu", "cuda"):
        return False
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # pragma: no cover - builds without dynamo
        return False
    return torch._dynamo.is_dynamo_supported()


def _eligible(engine, group: dict, unit, mode: str, codecs) -> bool:
    p, view = unit.param, unit.view
    if unit.writeback is not None or view.sharded or p.device.type not in ("cpu", "cuda"):
        return False
    if mode == "auto" and view.global_numel < AUTO_MIN_NUMEL:
        return False
    if tuple(view.local_shape) != tuple(p.shape):
        return False
    if view.local_rows is not None and not all(c.offset_free for c in codecs):
        return False  # a row piece whose stored form depends on its place (bf16 rounding bits)
    fusing = [c for c in codecs if c.fusable]
    return bool(fusing) and all(c.fusable_for(view) for c in fusing)


def takes(engine, group: dict, unit, stats) -> bool:
    """Whether ``unit`` would take the compiled path with the statistics backend ``stats``."""
    mode = group.get("compile", "off")
    if mode == "off" or engine.rule.needs_loss or type(stats) not in (LocalStats, PieceStats):
        return False
    if _failed is not None or not compile_available(unit.param.device):
        return False
    codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in engine.rule.active_slots(group)]
    return _eligible(engine, group, unit, mode, codecs)


def step_compiled(engine, group: dict, units: list, loss: Any, stats) -> list:
    """Step the units of a bucket that take the compiled path (their state is initialised and
    their step counters already advanced) with the statistics backend ``stats``; return the
    others, for the plain path."""
    global _failed
    mode = group.get("compile", "off")
    if mode == "off" or not units or engine.rule.needs_loss or type(stats) not in (LocalStats, PieceStats):
        return units
    if group["weight_decay_mode"] == "cpr":  # per-tensor decisions on the bound each step
        return units
    if not engine.rule.compiles(group):
        return units
    if not compile_available(units[0].param.device):
        return units
    rest = []
    slots = engine.rule.active_slots(group)
    options = hyperparameters(engine, group)
    lr_value = float(group["lr"])
    for unit in units:
        codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in slots]
        if _failed is not None or not _eligible(engine, group, unit, mode, codecs):
            rest.append(unit)
            continue
        p = unit.param
        dtype = engine.compute_dtype(p)
        # a plain tensor, not the Parameter: dynamo keeps Parameter shapes static (one compilation
        # per shape); in-place updates of the detached alias reach the parameter
        work = p.to(dtype) if p.dtype != dtype else p.detach()
        grad = unit.grad if unit.grad.dtype == dtype else unit.grad.to(dtype)
        global_shape = tuple(unit.view.global_shape)
        key = (type(engine.rule), tuple(work.shape), work.dtype, grad.dtype, work.device, global_shape)
        try:
            lr = torch.tensor(lr_value, dtype=dtype, device=p.device)
            _run(key, engine.rule, options, work, grad, unit.state, stats, loss, lr, global_shape)
        except Exception as error:  # compilation failed: the plain path from now on
            _failed = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            message = (
                f"hfoptim: torch.compile failed ({_failed}); compressed optimizer state runs the plain "
                f"(slower) path from now on. Set compile='off' to skip the attempt."
            )
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            rest.append(unit)
            continue
        if p.dtype != dtype:
            p.copy_(work)
    return rest


def reset() -> None:
    """Forget compiled kernels and a past failure (tests)."""
    global _failed
    _compiled.clear()
    calls.clear()
    _failed = None
    torch._dynamo.reset()
