"""The compiled path: one fused kernel per parameter, for every storage form of the state.

With state stored in 8 bits, the plain path decodes each slot into an fp32 tensor, runs the
rule's ``foreach`` operations over it, and encodes it back: a dozen passes over memory and as
many temporary tensors, several times the cost of AdamW's step. Dense (fp32) state has no decode,
but each ``foreach`` operation of a rule is still one pass over memory with its own temporary
(counted for the plain path: about eight for AdamW, fourteen for diffGrad). Here the engine's per-bucket flow
(:func:`hfoptim.core.step.advance`: gradient modifiers, decode, ``rule.update``, encode, update
modifiers, weight decay and ``p <- p - lr u``) is traced for ONE parameter at a time and compiled
by inductor (torch.compile's compiler), which fuses decode, update and encode into a few loops
over the parameter. The rule's code is the same code the plain path runs; nothing is written
twice. The kit traces the kernels itself (:mod:`hfoptim.core.tracing`: ``make_fx``, then
inductor's ``compile_fx``), not through dynamo, which interpreted the function bytecode by
bytecode in every new process, inductor's disk cache warm or not (a warm first step of
``adamw_8bit`` on the 100M set: 3.5 s with dynamo, 2.2 s without, on a 2-core Intel Xeon).
Where ``make_fx`` cannot trace a kernel (what dynamo would pass with a graph break),
``torch.compile`` traces it instead (logged at info; :data:`traced` counts either).

* One compilation per rule, options and distinct parameter shape (static shapes; a transformer
  has a handful), each a kernel of its own; a step seen as rows of one 8-bit block
  (:func:`block_rows`) has nothing but its row count to tell one tensor from another, and one
  kernel serves any count (:func:`_rows_free`: one compilation for all of a model's 8-bit
  tensors). The learning rate is a traced 0-d tensor input and the step counter the 0-d tensor
  kept in the state (:class:`TracedStepContext`), so neither a
  learning-rate schedule nor the step count recompiles. The traced function never sees the
  parameter group itself: it gets :func:`hyperparameters`, a copy of the group's validated
  options without ``lr`` (and without ``params``, ``initial_lr`` and whatever else a scheduler
  or the Trainer keeps there), so no kernel depends on the learning rate's value. The other
  hyperparameters are baked in (changing one compiles another kernel). The key of a kernel holds
  everything its trace depends on (everything dynamo's guards would check), so a kernel is
  called for its key with nothing checked (a kernel torch.compile traced: :func:`skip_guards`).
* Compiling is announced on the ``hfoptim.core.compiled_step`` logger: a warning before the first
  compilation of the process (the first step is slow), an info line per compiled shape with the
  time it took. Inductor's FX graph cache (on by default) keeps the kernels on disk, so a later
  process skips inductor's code generation (the kit still traces once per shape and process,
  about 0.1 s a kernel). How inductor builds a kernel (its options, the cache's key, the
  instruction set taken from the CPU's flags, the code-generation hooks) is
  :mod:`hfoptim.core.kernel_build`'s.
* A parameter takes this path when its group's ``compile`` option allows it (``"auto"``: tensors of
  at least :data:`AUTO_MIN_NUMEL` elements when every storage form ``auto_compiles`` (all of
  today's forms do), and smaller ones with 8-bit, 4-bit, bf16 or SMMF state of a shape the group
  has :data:`AUTO_MIN_SHAPE_COUNT` or more of (LoRA adapters), or whose 8-bit step runs in rows
  of one block of a length that a tensor of the group takes by its size, whose kernel of any row
  count it shares
  (:func:`auto_takes`), when torch.compile works on this machine;
  ``"on"``: every tensor; ``"off"``: never), every one of its slots is stored by a codec marked
  ``fusable`` (all of them: dense fp32, factored, SMMF, shared, 8-bit, 4-bit and bf16; the codec's
  ``fusable_for(view)`` must agree: 8-/4-bit state needs rows of whole blocks), it is held whole by
  this process, or is a row piece of such a tensor (:mod:`hfoptim.core.chunking`; stepped as rows
  from 0, so only storage forms marked ``offset_free``), or is a shard whose step needs nothing of
  other processes (:func:`shard_local`: FSDP2 rows, a ZeRO segment of whole rows), it is on a CPU or
  CUDA device, and :func:`plain_reason` finds nothing against its group: the exceptions are exactly
  AdaLo (loss-driven), CPR (a per-tensor decision each step), stable weight decay (the engine defers
  every update; see :func:`advance`) and Muon's matrices (orthogonalized whole, outside a
  per-parameter kernel).
* **In place with per-row modifiers too.** With a per-row statistic (AGC, soft clipping,
  gradient centralization, norm loss) inductor's C++ backend runs the statistic's loops and the
  rest of the step under one outer loop over rows and gives the values it keeps per row a
  row-sized buffer; torch 2.13 fails there with a ``KeyError`` on the writes into the parameter
  and the state, which :mod:`~hfoptim.core.local_buffers` mends. Before it, those kernels stepped
  copies of the parameter and of every state tensor and the call copied them back: one more pass
  and the tensor's size in temporaries. In place, one compiled step of 4096x1024 (two threads of
  a 2-core Intel Xeon, both forms in one process, ratio to torch AdamW foreach): ``adamw`` with
  AGC 1.03-1.07x -> 0.57-0.63x, ``adamw_8bit`` with AGC 1.60-1.71x -> 1.47-1.59x,
  ``ademamix_8bit`` with centralization 1.71-1.85x -> 1.42-1.65x.
* Sharded parameters (FSDP2 ``Shard(0)``, DeepSpeed ZeRO-1/2 segments and ZeRO-3 partitions)
  take the kernel on their local piece when the step of that piece needs no statistic of another
  process (:func:`shard_local`): an ``elementwise`` rule, only ``row_local`` modifiers, every
  process boundary on a row boundary (no padded working copy) and storage forms whose stored
  values of a shard are computed from the shard alone (:meth:`~hfoptim.state.codec.Codec.
  shard_local`: dense, bf16, 8-/4-bit blocks that no boundary cuts), or computed from the shard
  and then summed over the processes (factored's column sums: :meth:`~hfoptim.state.codec.Codec.
  shard_sums`). The decision depends only on what every process shares (options, global shape,
  boundaries), so all processes send the same parameters to the plain path and its collectives
  still match. The kernel sees the piece as a tensor of its own, with a statistics backend of
  local rows (:class:`~hfoptim.core.stats.ShardPieceStats`), at its true first row (bf16 draws
  its rounding bits by global index). The partial sums the kernels of a bucket leave are
  completed by one all-reduce per process group after them (:func:`complete_sums`): the
  statistics are gathered once for all the bucket's tensors, and every kernel runs on local
  memory only.
* **Staged shards.** A shard of whole rows whose step needs sums, norms or maxima of the whole
  tensor (the 4-bit second moment's column maxima: :meth:`~hfoptim.state.codec.Codec.shard_staged`;
  rules and modifiers marked ``staged_stats``: LAMB's trust ratio, nSGDA's norm, AGC, ...)
  takes the kernel in stages
  (:func:`shard_staged`, :class:`~hfoptim.core.stats.StagedStats`): a recording kernel returns
  this process's part of each such statistic and writes nothing (inductor keeps only what the
  parts need), one all-reduce per way of combining (sum, max) completes the first part of
  every staged shard of the bucket, and the next kernel runs with the completed values as
  inputs -- the writing one when all are known (one recording kernel per statistic: a later
  part may depend on an earlier one). The numbers are those of one process: the same traced
  code, with the statistic completed before it is used. A process holding no row of the
  parameter runs the stages uncompiled on its empty shard (zero parts; it stores its copy of
  the column maxima). Before, such a shard took the plain path (adamw_4bit under FSDP2: 17-19x
  torch AdamW's step, 7-36 bytes of temporaries per parameter). The row pieces of one 4-bit
  tensor or shard over the chunk budget run the same stages with their parts combined over
  the pieces first (:func:`step_staged_pieces`; :mod:`hfoptim.core.chunking`). A staged kernel
  whose compilation fails runs its stages uncompiled, so the other processes still get its parts.
* If compiling fails (no C++ compiler, an unsupported platform) the failure is reported once
  with a warning and every parameter runs the plain path from then on.

The compiled and plain paths compute the same formulas; they differ by floating-point rounding
(inductor may contract ``a*b+c``), which with 8-bit state can flip a value sitting on a code
midpoint to the neighbouring code. ``tests/test_state_compiled.py`` bounds the difference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import time
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist

from ..modifiers import MODIFIERS
from ..state import resolve
from . import kernel_build
from .context import StepContext
from .stats import MAX, SUM, LocalStats, ParamView, PieceStats, ShardPieceStats, StagedPieceStats, StagedStats
from .step import advance
from .tensorlist import TensorList
from .tracing import TracedKernel, TraceFailed

#: with ``compile="auto"``, parameters at least this large take the compiled path
AUTO_MIN_NUMEL = 1 << 16
#: with ``compile="auto"``, a smaller parameter whose state a form codes tensor by tensor on the
#: plain path (:attr:`~hfoptim.state.codec.Codec.coded_per_tensor`: 8-bit, 4-bit, bf16, SMMF) takes
#: the compiled path when its group steps at least this many tensors of its shape (LoRA adapters,
#: one or two shapes per target module). The plain path's step of such a tensor is mostly the fixed
#: costs of its operations: on 32 tensors of 128x128 or 8x2048, adamw_8bit 390 us a tensor against
#: 105 us compiled, ademamix_8bit and adan_8bit 530-610 us against 120-135 us, torch AdamW foreach
#: 70 us (2-core Intel Xeon with AMX, two threads). One compilation serves every tensor of the
#: shape: 3.7-5.3 s from an empty inductor cache, about 1 s from a warm one, paid back within about
#: 400 steps by 32 tensors (100 from a warm cache). Fewer tensors of a shape stay on the plain
#: path (a short run would not win the compilation back), except where the step runs in rows of
#: one block (8-bit state) as a larger tensor's of the group does: that kernel serves every shape
#: (:func:`auto_takes`, :func:`_rows_free`).
AUTO_MIN_SHAPE_COUNT = 32


def _can_skip_guards() -> bool:
    """Whether this torch has ``set_stance(skip_guard_eval_unsafe=...)`` (torch 2.6 and later; the
    kit supports 2.4, where the guards are evaluated as before)."""
    try:
        return "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters
    except (AttributeError, TypeError, ValueError):
        return False


_CAN_SKIP_GUARDS = _can_skip_guards()

_compiled: dict[tuple, Any] = {}
#: per parameter group (by id): the options last seen and their text in the kernel keys
_settings: dict[int, tuple[list, str]] = {}
_failed: str | None = None
#: whether new kernels are traced by the kit (:class:`~hfoptim.core.tracing.TracedKernel`); False
#: once inductor failed on the kit's graph of a kernel and compiled torch.compile's
#: (:func:`_traced_by_dynamo`)
_kit_traces = True
#: whether the kernels of :func:`block_rows` are traced for any number of rows (one kernel per
#: rule, options and storage forms: :func:`_rows_free`); False once such a trace failed
_any_rows = True
#: per rule, options and storage forms: the options of their kernel for any number of rows, or
#: None where that kernel would resolve other forms (:func:`_rows_free`)
_any_size_options: dict[tuple, dict | None] = {}
#: per group (by id) and device: the step's shape counts and their :func:`large_rows_blocks`
_large_blocks: dict[tuple, tuple] = {}
#: how many parameters took the compiled path, per kernel key (tests and benchmarks read it to
#: check that the compiled path ran): the calls of the kernels that write the step
calls: dict[tuple, int] = {}
#: the calls of the recording kernels of staged shards (:func:`shard_staged`), per kernel key
recorded: dict[tuple, int] = {}
#: kernels compiled in this process, by who traced them: the kit (:class:`~hfoptim.core.tracing.
#: TracedKernel`) or dynamo (``torch.compile``, where the kit's route failed)
traced: dict[str, int] = {"kit": 0, "dynamo": 0}

logger = logging.getLogger(__name__)


class TracedStepContext(StepContext):
    """The context of one parameter on the compiled path: its step ``t`` is a 0-d tensor, and
    :meth:`per_step` returns ``fn(t)`` as it comes (a 0-d tensor, or a number when ``fn`` ignores
    ``t``), so the traced graph takes the step as an input instead of a constant."""

    def per_step(self, fn):
        value = fn(self.steps[0])
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            return computed_once(value)
        return value


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a 0-d tensor), computed once per kernel call instead of once per vector of the
    element loop. Inductor inlines a 0-d pointwise value such as ``1 - beta ** t`` into every
    loop that reads it, and its C++ backend (torch 2.13) evaluates it inside the innermost
    loop: two ``std::pow`` and a ``sqrt`` per 16 elements in AdamW's update, about 4 ms of a
    12M-element step on one AMD EPYC core. The max of ``[x, x]`` (exactly ``x``, NaN
    included) is a reduction, which inductor stores in a buffer of its own computed before the
    loop, so the loop reads one number. Only on CPU: a GPU pays a launch for it and has the
    arithmetic to spare."""
    return torch.stack([x, x]).amax()


def hyperparameters(engine, group: dict) -> dict:
    """What the traced function may read of ``group``: the validated options of the rule,
    modifiers and engine, without ``lr`` (a traced input instead). Dynamo guards on every value
    the traced code reads from a dict it is given (and, for some dicts, on all of them); the
    group itself holds the learning rate a scheduler changes every step, the parameters and
    keys of other libraries, so passing it would recompile at every learning-rate change."""
    return {key: group[key] for key in engine._spec if key != "lr" and key in group}


def _advance_one(
    rule,
    group: dict,
    p,
    grad,
    state: dict,
    stats,
    loss,
    lr: torch.Tensor,
    global_shape: tuple,
    row_start: int = 0,
    known: tuple | None = None,
    record: bool = False,
    returned: tuple[str, ...] = (),
    encode_later: tuple[str, ...] = (),
    encoded_into: tuple = (),
):
    """The engine's flow for one parameter held whole, or a row piece of one (traced by
    torch.compile). It updates ``p`` and ``state`` in place and returns None. With ``known`` (a
    staged shard, :func:`shard_staged`) the statistics of the whole tensor come from
    :class:`~hfoptim.core.stats.StagedStats` over ``known``; with ``record`` as well, nothing is
    written (the step writes copies) and the kernel returns the parts of the requests past
    ``known``: ``(how each combines, *parts)``. ``group`` is :func:`hyperparameters` (no
    ``lr``); ``lr`` comes as a 0-d tensor, an input of the graph (a float would be baked in and
    recompile with every learning-rate change). ``global_shape`` is the whole parameter's shape
    (storage forms are chosen by it); a piece is seen as rows starting at 0, which its
    ``offset_free`` storage forms cannot tell from its true place (one kernel for all the pieces
    of one shape); a shard whose forms are not ``offset_free`` is seen at its first row
    ``row_start``. The entries of ``state`` named in ``returned`` (:func:`block_rows`) are
    stepped as copies and their new values returned, in that order, for the caller to write.
    The new values of the slots named in ``encode_later``, which the kernel does not encode
    (:attr:`~hfoptim.state.codec.Codec.encodes_after_kernel`: the caller does), are written into
    ``encoded_into`` (:class:`Workspace` buffers of ``p``'s shape), in that order."""
    rows = p.shape[0] if p.dim() else None
    if global_shape is None:  # rows of one block, any number of them (:func:`block_rows`)
        global_shape = tuple(p.shape)
    view = ParamView(global_shape=torch.Size(global_shape), row_start=row_start, local_rows=rows)
    # the step as a tensor of the compute dtype: the counter is kept in fp32, and ``beta ** t``
    # taken in fp32 would round the bias corrections of an fp64 parameter to fp32. On the
    # parameter's device: the counter stays on the CPU (no synchronisation to read it), and a
    # CUDA graph computing with a CPU tensor fails in inductor (an AssertionError, torch 2.11 on
    # an H200), which sent every parameter to the plain path
    step = state["step"].to(device=p.device, dtype=p.dtype)
    if known is not None:
        stats = StagedStats(known, foreach=stats.foreach)
    # the entries stepped as copies (a recording kernel writes nothing: all of them, and the
    # parameter); inductor fuses each copy into its first read
    copied = [key for key, _ in _state_tensors(state)] if record else returned
    if record:
        p = p.clone()
    if copied:
        state = dict(state)
        for key in copied:
            state[key] = state[key].clone()
    ctx = TracedStepContext(group, [step], [view], stats, True, loss, [state], lr=lr)
    ctx.encode_later = frozenset(encode_later)
    g = TensorList([grad], True)
    if group["maximize"]:
        g = -g
    advance(rule, group, ctx, TensorList([p], True), g, [state], [view], p.dtype)
    if record:  # the parts only: inductor drops the rest of the step
        return (tuple(combine for _, combine in stats.partials), *(part for part, _ in stats.partials))
    if known is not None and stats.partials:
        raise RuntimeError("hfoptim internal error: a staged kernel asked for a statistic it was not given")
    for name, buffer in zip(encode_later, encoded_into, strict=True):
        buffer.copy_(ctx.encoded_later[name].tensors[0])
    return tuple(state[key] for key in returned) or None


def encoded_later(engine, group: dict, codecs) -> list[tuple]:
    """``(slot, form)`` of the active slots whose new value a kernel writes out for the plain path's
    encode (:attr:`~hfoptim.state.codec.Codec.encodes_after_kernel`, unless the rule stores the
    slot mid-step: :attr:`~hfoptim.core.rule.Rule.stores_early`), in the slots' order."""
    rule = engine.rule
    return [
        (slot, codec)
        for slot, codec in zip(rule.active_slots(group), codecs, strict=True)
        if codec.encodes_after_kernel and slot.name not in rule.stores_early
    ]


def _slot_keys(state: dict, names) -> frozenset[str]:
    """The entries of ``state`` of the slots ``names`` (a slot's entries are its name, or its
    name and a dot and a part: ``exp_avg.row``)."""
    return frozenset(key for key in state if key.split(".", 1)[0] in names)


def _state_tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``state`` with their keys, in its order."""
    return [(key, value) for key, value in state.items() if isinstance(value, torch.Tensor)]


def _compiled_fn(key: tuple = ()):
    """The compiled kernel for ``key`` (rule, shape, dtypes, device, storage forms, options):
    :func:`_advance_one` traced by the kit (:class:`~hfoptim.core.tracing.TracedKernel`: no
    dynamo, whose interpretation of the function's bytecode was most of a first step with a warm
    cache), or by ``torch.compile`` (:func:`_dynamo_compiled`) where the kit's route failed for it,
    and for every kernel after the kit's graph failed to compile where torch.compile's did
    (:data:`_kit_traces`)."""
    fn = _compiled.get(key)
    if fn is None:
        any_rows = _any_rows_key(key)
        if any_rows or _kit_traces:
            fn = _compiled[key] = TracedKernel(_advance_one, kernel_build.INDUCTOR_OPTIONS, symbolic_rows=any_rows)
        else:
            fn = _compiled[key] = _dynamo_compiled(key)
    return fn


def _any_rows_key(key: tuple) -> bool:
    """Whether ``key`` is of a kernel traced for any number of rows (:func:`_rows_free`): its
    shape's first entry is None."""
    return key[1][:1] == (None,)


class _AnyRowsFailed(Exception):
    """The kit's trace or compilation of a kernel for any number of rows failed: the caller steps
    the unit with a kernel of its own shape (and so every unit from then on)."""


def _dynamo_compiled(key: tuple):
    """:func:`_advance_one` under ``torch.compile`` for ``key``. Each key gets its own copy of the
    function's code object, so that dynamo keeps one cache entry per copy: its recompile limit
    (8 per code object) then never sends a model with many shapes or a second optimizer to
    uncompiled code, and no call evaluates the guards of other shapes."""
    code = _advance_one.__code__.replace(co_name=f"_advance_one_{len(_compiled)}")
    copy = types.FunctionType(code, _advance_one.__globals__, code.co_name, _advance_one.__defaults__)
    # static shapes: one kernel per parameter shape (symbolic shapes get specialised anyway by
    # the broadcasting checks of the foreach ops)
    return torch.compile(copy, dynamic=False, options=kernel_build.INDUCTOR_OPTIONS)


def _run(key: tuple, *args):
    """Call the kernel of ``key`` and return what it returns; the first call of a key compiles
    it, announced on the logger. Counted in :data:`calls`, or :data:`recorded` for a recording
    kernel (its key ends in ``(stage, True)``). Inside a region torch.compile traces (a user
    compiling the whole step) the step is traced into the user's graph instead, as dynamo
    inlines a compiled function it meets."""
    if torch.compiler.is_compiling():
        return _advance_one(*args)
    fn = _compiled_fn(key)
    stage = key[-1]
    counts = recorded if stage is not None and stage[1] else calls
    if key in counts:
        counts[key] += 1
        return fn(*args)
    rule, shape, dtype = key[0].name, key[1], key[2]
    if _any_rows_key(key):
        what = f"{rule} step for {str(dtype).replace('torch.', '')} tensors in rows of one block ({shape[1]} elements)"
    else:
        what = f"{rule} step for a {tuple(shape)} {str(dtype).replace('torch.', '')} tensor"
    if stage is not None:
        what += f" (stage {stage[0] + 1}{', recording' if stage[1] else ''})"
    if not calls and not recorded:
        logger.warning(
            "hfoptim: compiling the fused optimizer step (inductor, once per rule and parameter shape); "
            "the first step is slower, later runs reuse inductor's disk cache. compile='off' skips it."
        )
    logger.info("hfoptim: compiling the fused %s", what)
    start = time.perf_counter()
    if isinstance(fn, TracedKernel):
        try:
            out = kernel_build.compiling_call(fn, args, retry=False)
            traced["kit"] += 1
        except Exception as error:
            if _any_rows_key(key):
                _any_rows_failed(key, what, error)
            out = _traced_by_dynamo(key, args, what, error)
    else:
        with _with_guards(True):
            out = kernel_build.compiling_call(fn, args)
        traced["dynamo"] += 1
    counts[key] = 1
    logger.info("hfoptim: compiled the fused %s in %.1f s", what, time.perf_counter() - start)
    return out


def _any_rows_failed(key: tuple, what: str, error: Exception):
    """After the kernel of ``key`` for any number of rows failed to trace or compile: kernels of
    one row count from now on (:func:`_rows_free`); :class:`_Kernel` then compiles its own."""
    global _any_rows
    _any_rows = False
    del _compiled[key]
    logger.info("hfoptim: the %s failed (%s); kernels of one row count instead", what, error)
    raise _AnyRowsFailed(str(error)) from error


def _traced_by_dynamo(key: tuple, args: tuple, what: str, error: Exception):
    """The first call of ``key``'s kernel traced by ``torch.compile``, after the kit's route
    failed with ``error``: ``make_fx`` could not trace it (:class:`~hfoptim.core.tracing.TraceFailed`:
    this kernel only), or inductor failed on the kit's graph (then every later kernel takes
    torch.compile's route too, if this one compiles there: a platform the kit's route does not
    serve). A failure of this call is the compilation's failure."""
    global _kit_traces
    logger.info("hfoptim: the kit's trace of the %s failed (%s); torch.compile traces it instead", what, error)
    fn = _compiled[key] = _dynamo_compiled(key)
    with _with_guards(True):
        out = kernel_build.compiling_call(fn, args)
    traced["dynamo"] += 1
    if not isinstance(error, TraceFailed):
        _kit_traces = False
        logger.warning(
            "hfoptim: inductor failed on the kit's own trace of the %s (%s) and compiled torch.compile's; "
            "the kit's kernels are traced by torch.compile from now on (a slower first step)",
            what,
            error,
        )
    return out


def settings_of(group: dict, options: dict) -> str:
    """The text of ``options`` (:func:`hyperparameters` of ``group``) in the kernel keys,
    remembered per group: the text of some thirty options is formed once, not at every
    bucket of every step (a ``repr`` cost 75 us a call, about 2 ms a step on a 25M model)."""
    snapshot = [(key, type(value), value) for key, value in options.items()]
    known = _settings.get(id(group))
    if known is not None and known[0] == snapshot:
        return known[1]
    if len(_settings) > 1024:  # groups of optimizers long gone
        _settings.clear()
    text = repr(sorted(options.items()))
    _settings[id(group)] = (snapshot, text)
    return text


def state_signature(state: dict, any_rows: bool = False) -> tuple:
    """What a kernel assumes of a parameter's state: every entry's name with its dtype, shape
    and strides (a tensor) or its value's text. Part of the kernel key, so state of another form (a
    checkpoint restored in other dtypes) gets its own kernel: calls skip dynamo's guards
    (:func:`skip_guards`), which would have caught the difference. ``any_rows``: a kernel for any
    number of rows (:func:`_rows_free`), None for the row count."""
    return tuple(
        (
            name,
            value.dtype,
            (None, *value.shape[1:]) if any_rows and value.dim() else value.shape,
            value.stride(),
            value.device,
        )
        if isinstance(value, torch.Tensor)
        else (name, repr(value))  # (no rule keeps one today; a list would not hash)
        for name, value in state.items()
    )


def skip_guards():
    """A context in which the kernels run without evaluating dynamo's guards. Each kernel key
    has its own copy of the traced code (:func:`_compiled_fn`), so dynamo holds one compiled
    entry per code object and its guards can only confirm that entry; the key holds everything
    they check (rule, options, shapes, strides, dtypes and devices of the parameter, gradient
    and state, statistics backend), so a call whose guards would fail has another key and
    compiles its own kernel. Evaluating them cost 30-60 us a call, 1-2 ms a step on a 25M
    model (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``). Inside a region that
    torch.compile traces (a user compiling the whole step) nothing changes."""
    return _with_guards(False)


def _with_guards(evaluate: bool):
    """The current dynamo stance (a user's ``force_eager`` stays) with guard evaluation on or off;
    a no-op inside a region torch.compile traces. Compiling a new key needs them on: dynamo
    refuses to compile under the skipping stance."""
    if not _CAN_SKIP_GUARDS or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    current = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    stance = getattr(current, "stance", "default")
    backend = getattr(current, "backend", None)
    return torch.compiler.set_stance(stance, skip_guard_eval_unsafe=not evaluate, force_backend=backend)


def compile_available(device: torch.device) -> bool:
    """Whether torch.compile can be tried for ``device`` in this process."""
    if _failed is not None or device.type not in ("cpu", "cuda"):
        return False
    try:
        import torch._dynamo  # noqa: F401
    except Exception:  # pragma: no cover - builds without dynamo
        return False
    return torch._dynamo.is_dynamo_supported()


def shard_local(engine, group: dict, view: ParamView, slots, codecs) -> bool:
    """Whether the step of a shard ``view`` needs no statistic of another process, so the
    kernel may step the local piece alone: the rule is elementwise for this group (adaptive
    memory adds inner products of whole tensors), every enabled modifier ``row_local``, no
    weight-decay form with a statistic of the tensor (CPR) or of every tensor (stable), every
    process boundary falls on a row boundary (whole rows everywhere: no ZeRO padding, row
    statistics local) and every storage form computes a shard's stored values from the shard
    alone, or its partial sums (:meth:`~hfoptim.state.codec.Codec.shard_local`). Only what all
    processes share decides (options, global shape, ``view.cuts``): they agree on which
    parameters take the plain path, whose collectives then match."""
    if not _rows_alone(engine, group, view):
        return False
    return all(codec.shard_local(slot, view) for slot, codec in zip(slots, codecs))


def _rows_alone(engine, group: dict, view: ParamView, staged: bool = False) -> bool:
    """The gates :func:`shard_local` and :func:`shard_staged` share: the rule and every enabled
    modifier need no statistic of the whole tensor (``staged``: or only those marked
    ``staged_stats``, sums and maxima a staged kernel completes), no weight decay needs one (CPR)
    or one of every tensor (stable), and every process boundary falls on a row boundary."""
    rule = engine.rule
    if not (rule.is_elementwise(group) or (staged and rule.staged_stats)):
        return False
    if group["weight_decay_mode"] in ("stable", "cpr"):
        return False
    shape = view.global_shape
    if any(m.enabled(group) and not (m.rows_apart(shape) or (staged and m.staged_stats)) for m in MODIFIERS):
        return False
    return not any(cut % view.row_len for cut in view.cuts)


def shard_staged(engine, group: dict, view: ParamView, slots, codecs) -> bool:
    """Whether a shard ``view`` that is not :func:`shard_local` may take the kernel in stages
    (:class:`~hfoptim.core.stats.StagedStats`): its step is row-local but for sums, norms and
    maxima of the whole tensor asked of the statistics backend -- by the rule
    (:attr:`~hfoptim.core.rule.Rule.staged_stats`: nSGDA's norm, adaptive memory's inner
    products, SM3's maxima), by modifiers (:attr:`~hfoptim.modifiers.base.Modifier.staged_stats`:
    AGC, soft clipping and norm loss on vectors, the trust ratio, the cautious mask's mean) or by
    storage forms (:meth:`~hfoptim.state.codec.Codec.shard_staged`: the 4-bit second moment's
    column maxima) -- and every process boundary falls on a row boundary.
    Every process of the group takes part, one holding no row of the parameter too (it sends
    zero parts and keeps its copy of the whole-tensor state, the column maxima, as the plain
    path does). Only what all processes share decides (options, global shape, boundaries)."""
    if not _rows_alone(engine, group, view, staged=True):
        return False
    return all(codec.shard_local(slot, view) or codec.shard_staged(slot, view) for slot, codec in zip(slots, codecs))


def shard_kernel(engine, group: dict, view: ParamView, slots, codecs) -> bool:
    """Whether the compiled kernel may step the shard ``view``: its step needs nothing of another
    process (:func:`shard_local`), or only sums and maxima it can complete between stages
    (:func:`shard_staged`)."""
    return shard_local(engine, group, view, slots, codecs) or shard_staged(engine, group, view, slots, codecs)


def kernel_stats(stats, view: ParamView):
    """The statistics backend the traced step uses for a unit of ``view`` stepped with the
    layout's ``stats``: as given for tensors held whole and row pieces; for a sharding backend
    (a subclass of LocalStats whose statistics of tensors held whole are local), LocalStats for
    a tensor held whole and ShardPieceStats (local rows and blocks, this process's part of column
    sums, nothing else of the whole tensor) for a shard that :func:`shard_kernel` allows (a
    staged one's kernel wraps it in :class:`~hfoptim.core.stats.StagedStats`). None: no kernel
    for this backend."""
    if type(stats) in (LocalStats, PieceStats):
        return stats
    if isinstance(stats, StagedPieceStats):  # a piece's kernel: its rows, the rest in stages
        return ShardPieceStats(foreach=stats.foreach) if view.sharded else PieceStats(foreach=stats.foreach)
    if not isinstance(stats, LocalStats):
        return None
    return ShardPieceStats(foreach=stats.foreach) if view.sharded else LocalStats(foreach=stats.foreach)


def auto_takes(engine, group: dict, view: ParamView, codecs, device: torch.device) -> bool:
    """Whether ``compile="auto"`` gives the parameter of ``view`` (stored by ``codecs``, on
    ``device``) the kernel: a tensor of at least :data:`AUTO_MIN_NUMEL` elements when every form
    :attr:`~hfoptim.state.codec.Codec.auto_compiles`; a smaller one when a form codes it tensor
    by tensor (:attr:`~hfoptim.state.codec.Codec.coded_per_tensor`), the others compile, and
    either ``group`` steps at least :data:`AUTO_MIN_SHAPE_COUNT` tensors of its shape, or its step
    runs in rows of one block
    (:func:`rows_block`: 8-bit state, two blocks or more) of a length that a tensor of
    :data:`AUTO_MIN_NUMEL` elements or more of the group takes too (:func:`large_rows_blocks`):
    the kernel of any row count they share is compiled anyway (:func:`_rows_free`). The demo's
    model (hidden size 128): its 24 matrices of 128x128 and 352x128 join its embedding's kernel,
    an ``adamw_8bit`` step of 10 ms instead of 20-24 (torch AdamW foreach 4.5-7 ms; 2-core Intel
    Xeon with AMX, interleaved in one process). A group of small tensors only stays plain: a
    short run would not win a compilation back. Global sizes and counts: the same answer on
    every process."""
    if view.global_numel >= AUTO_MIN_NUMEL:
        if not all(c.auto_compiles for c in codecs):
            return False
        # SMMF's kernel is fast only over its square matrix (rows of its row_block)
        if not any(c.auto_compiles_as_rows for c in codecs):
            return True
        return _whole_rows_block(engine, group, view, codecs, device) is not None
    if not all(c.auto_compiles or c.coded_per_tensor for c in codecs):
        return False
    if not any(c.coded_per_tensor for c in codecs):
        return False
    if engine.tensors_of_shape(group, view.global_shape) >= AUTO_MIN_SHAPE_COUNT:
        return True
    block = _whole_rows_block(engine, group, view, codecs, device)
    return block is not None and view.global_numel // block >= 2 and block in large_rows_blocks(engine, group, device)


def _whole_rows_block(engine, group: dict, view: ParamView, codecs, device: torch.device) -> int | None:
    """:func:`rows_block` for the whole parameter of ``view``, as every process sees it."""
    whole = dataclasses.replace(view, row_start=0, local_rows=None, valid=None)
    return rows_block(engine, group, whole, codecs, device)


def large_rows_blocks(engine, group: dict, device: torch.device) -> frozenset:
    """The block lengths of the kernels of any row count (:func:`_rows_free`) that the tensors of
    :data:`AUTO_MIN_NUMEL` elements or more of ``group`` take this step under ``compile="auto"``:
    a smaller tensor whose step runs in rows of one of them shares that kernel, compiled anyway
    (:func:`auto_takes`). From the global shapes the step counted (the same on every process),
    remembered for the step (:meth:`~hfoptim.core.optimizer.RuleOptimizer.shape_counts` is a new
    object at each)."""
    counts = engine.shape_counts(group)
    key = (id(group), device)
    found = _large_blocks.get(key)
    if found is not None and found[0] is counts:
        return found[1]
    blocks = set()
    for shape in counts:
        if math.prod(shape) < AUTO_MIN_NUMEL:
            continue
        view = ParamView(global_shape=torch.Size(shape))
        codecs = [resolve.codec_for(engine.rule, slot, group, view) for slot in engine.rule.active_slots(group)]
        if all(c.auto_compiles and c.any_rows and c.fusable and c.fusable_for(view) for c in codecs):
            blocks.add(rows_block(engine, group, view, codecs, device))
    if len(_large_blocks) > 1024:  # groups of optimizers long gone
        _large_blocks.clear()
    _large_blocks[key] = (counts, frozenset(blocks - {None}))
    return _large_blocks[key][1]


def _eligible(engine, group: dict, unit, codecs) -> bool:
    """Whether ``unit`` (its slots stored by ``codecs``) takes the kernel, under the group's
    ``compile`` option; an empty shard answers as the shards of its parameter that hold rows
    (it is consumed without a kernel: nothing to step here, nothing to share)."""
    p, view = unit.param, unit.view
    # a write-back of a working copy (a ZeRO row cut by a partition boundary) keeps the plain
    # path; one of the state alone (chunking.StoreSums) runs after the kernel as after it
    copies_back = unit.writeback is not None and not getattr(unit.writeback, "state_only", False)
    if copies_back or p.device.type not in ("cpu", "cuda"):
        return False
    if view.sharded and not shard_kernel(engine, group, view, engine.rule.active_slots(group), codecs):
        return False
    if group.get("compile", "off") == "auto" and not auto_takes(engine, group, view, codecs, p.device):
        return False
    if _empty_shard(unit):  # the forms' answers for the shards of this parameter (SMMF: none take it)
        if len(view.global_shape) >= 2:
            # as the processes holding rows answer: for a matrix the forms read the row length,
            # not the number of rows (the 4-bit short last block of a (1, 9) tensor, held by one
            # process: the others must agree it takes the kernel, or their plain path would
            # issue collectives the owner does not)
            view = dataclasses.replace(view, row_start=0, local_rows=None, valid=None)
        return all(c.fusable and c.fusable_for(view) for c in codecs)
    if tuple(view.local_shape) != tuple(p.shape):
        return False
    if not view.sharded and view.local_rows is not None and not all(c.offset_free for c in codecs):
        return False  # a row piece whose stored form depends on its place (bf16 rounding bits)
    # every slot's storage form must trace (dense fp32, factored, SMMF, shared, and the 8-bit,
    # 4-bit and bf16 forms where their blocks fit the rows); a rule without slots traces too
    return all(c.fusable and c.fusable_for(view) for c in codecs)


def _empty_shard(unit) -> bool:
    return unit.view.sharded and unit.param.numel() == 0


def _group_takes(engine, group: dict, unit, stats) -> bool:
    """The gates of a call's units as a whole, read from its first ``unit`` (they share the
    statistics backend, the group and the device): a kernel exists for the backend
    (:func:`kernel_stats`), :func:`plain_reason` finds nothing against the group and torch.compile
    is available (no failure so far). The one place :func:`step_compiled`, :func:`kernel_split`
    and :func:`takes` read them, so the split agrees with the step."""
    device = unit.param.device
    if kernel_stats(stats, unit.view) is None or plain_reason(engine, group, device) is not None:
        return False
    return compile_available(device)


def kernel_split(engine, group: dict, units: list, stats) -> tuple[list, list]:
    """``units`` as ``(those step_compiled takes, the others)``, with the same gates and in order:
    the first never issue a collective but the sums of :func:`complete_sums`, the others go to
    the plain path, whose statistics under sharding are collectives."""
    if not units or not _group_takes(engine, group, units[0], stats):
        return [], list(units)
    slots = engine.rule.active_slots(group)
    settings = settings_of(group, hyperparameters(engine, group))
    kernel, plain = [], []
    for unit in units:
        (kernel if unit_plan(engine, group, unit, slots, settings)[1] else plain).append(unit)
    return kernel, plain


def takes(engine, group: dict, unit, stats) -> bool:
    """Whether ``unit`` would take the compiled path with the statistics backend ``stats``: the
    same gates as :func:`step_compiled` (:func:`plain_reason` for the group, then the unit's)."""
    if not _group_takes(engine, group, unit, stats):
        return False
    settings = settings_of(group, hyperparameters(engine, group))
    return unit_plan(engine, group, unit, engine.rule.active_slots(group), settings)[1]


def block_rows_bytes(engine, group: dict, units: list, stats) -> list[int | None]:
    """For each of ``units`` (of one bucket, with the statistics backend ``stats``), the bytes of
    temporaries per element that its compiled step holds when the kernel steps it in rows of one
    block (:func:`block_rows`), else None.

    Such a kernel keeps what it computes in buffers of one block per thread
    (:mod:`~hfoptim.core.local_buffers`) and allocates only what it returns, one value per block
    and 8-bit slot (the new scales: at most ``4 * slots / block`` bytes per element), plus the
    fp32 copies of a parameter or gradient of another dtype it steps (:class:`_Kernel`), and
    what a slot encoded after the kernel (:func:`encoded_later`: SMMF) takes: its new value, which
    the kernel writes into the step's :class:`Workspace`, and during its encode the signs' mask
    and their packed bytes. A whole
    ``ademamix_8bit`` step of a 32000x768 tensor allocated 0.047 bytes per element (the profiler's
    memory events; ``tests/test_chunking.py`` checks the bound on three rules).

    A shard answers from what every process shares, so that every process cuts the same calls:
    a shard of whole rows that :func:`shard_local` steps alone, the view of the whole parameter,
    and the dtypes (the local tensors of FSDP2's and ZeRO's shards are contiguous, which
    :func:`block_rows` needs too)."""
    if not units or not _group_takes(engine, group, units[0], stats):
        return [None] * len(units)
    slots = engine.rule.active_slots(group)
    settings = settings_of(group, hyperparameters(engine, group))
    out: list[int | None] = []
    for unit in units:
        codecs, takes_kernel, in_stages, rows = unit_plan(engine, group, unit, slots, settings)
        view = unit.view
        if view.sharded and takes_kernel and not in_stages:
            # a shard the kernel steps alone (not in stages: shard_local): the whole view decides
            rows = _whole_rows_block(engine, group, view, codecs, unit.param.device)
        later = encoded_later(engine, group, codecs) if takes_kernel and not in_stages else []
        if not view.sharded and rows is not None:
            keys = _slot_keys(unit.state, {slot.name for slot, _ in later})
            rows = block_rows(rows, unit, (unit.param, unit.grad), keys)
        if not takes_kernel or rows is None:
            out.append(None)
            continue
        dtype = engine.compute_dtype(unit.param)
        copies = (unit.param.dtype != dtype) + (unit.grad.dtype != dtype)
        # the slots encoded after the kernel: their new values in the workspace (up to twice their
        # size: it grows in powers of two), then one encode's mask of signs and packed bytes (SMMF;
        # the encodes run one after the other): 18 bytes per element in fp32 (two slots). Counted
        # as 28, which bounded the fresh tensors each piece allocated before the workspace: the
        # smaller pieces keep the step's high-water mark near a quarter of chunk_bytes (15.5 MiB
        # on the 100M set), within 1 byte per parameter of a ZeRO-2 process's half of it
        encoding = (len(later) + 4) * dtype.itemsize + 4 if later else 0
        out.append(max(1, math.ceil(4 * len(slots) / rows)) + copies * dtype.itemsize + encoding)
    return out


def unit_plan(engine, group: dict, unit, slots, settings: str) -> tuple[list, bool, bool, int | None]:
    """``(the storage forms of unit's slots, whether it takes the kernel, whether in stages, the
    block length of its rows as far as :func:`rows_block` decides it)``: :func:`_eligible`,
    :func:`shard_local` and :func:`rows_block` for ``unit``, remembered per optimizer
    (``engine.kernel_plans``) by what they read: the group's options (``settings``, the text of
    :func:`settings_of`), the unit's view, device, local shape and write-back, and whether its
    group has :data:`AUTO_MIN_SHAPE_COUNT` tensors of its shape. Every step asks for the same
    units, twice under sharding (:func:`kernel_split`, then :func:`step_compiled`): the checks
    of the forms and the sharding cost about 20 us a unit, 10 ms a step of a LoRA set's 224
    shards under FSDP2."""
    view, p = unit.view, unit.param
    many = engine.tensors_of_shape(group, view.global_shape) >= AUTO_MIN_SHAPE_COUNT
    shared = large_rows_blocks(engine, group, p.device) if group.get("compile") == "auto" else None
    key = (settings, view, p.device, tuple(p.shape), unit.writeback is None, many, shared)
    plans = engine.kernel_plans
    found = plans.get(key)
    if found is None:
        codecs = [resolve.codec_for(engine.rule, slot, group, view) for slot in slots]
        takes_kernel = _eligible(engine, group, unit, codecs)
        in_stages = takes_kernel and view.sharded and not shard_local(engine, group, view, slots, codecs)
        if len(plans) > 1 << 16:  # options that changed often: the old answers are of no use
            plans.clear()
        rows = rows_block(engine, group, view, codecs, p.device) if takes_kernel and not in_stages else None
        found = plans[key] = (codecs, takes_kernel, in_stages, rows)
    return found


def plain_reason(engine, group: dict, device: torch.device) -> str | None:
    """Why no parameter of ``group`` on ``device`` takes the compiled path, or None when its
    parameters may (each then still by :func:`_eligible`: size, storage form, sharding)."""

    rule = engine.rule
    if group.get("compile", "off") == "off":
        return "compile='off'"
    if rule.needs_loss:
        return f"{rule.name} sets its step size from the training loss, a new Python number each step"
    if group["weight_decay_mode"] == "cpr":
        return "CPR decides per tensor each step whether its bound holds (a Python branch on a tensor)"
    if group["weight_decay_mode"] == "stable":
        return "stable weight decay needs every tensor's second moment before any update (deferred updates)"
    if not rule.compiles(group):
        return f"{rule.name} updates this group's matrices whole (Muon's Newton-Schulz orthogonalization)"
    return None


class Workspace:
    """Where kernels leave the new values of the slots the plain path's encode stores
    (:func:`encoded_later`: SMMF), which the encode may overwrite (``Codec.encode_spent``): one
    buffer per dtype and device, shared by the kernels of one optimizer step and dropped after
    it. Fresh tensors of each piece's size, freed after its encode, left the process's heap in
    pieces that kernels of another size could not reuse: 31-62 MiB of high-water mark over an
    ``adamw_smmf`` step of the 100M set whose tensors at no time held more than 18 MiB
    (profiler's memory events; one process, 2-core AMD EPYC); with this buffer, 15.5 MiB."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def take(self, count: int, shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
        """``count`` tensors of ``shape`` in the buffer of ``dtype`` on ``device``, each starting
        on a multiple of 64 bytes (a kernel compiled for aligned inputs, as Triton's are, gets
        aligned ones). The buffer grows in powers of two (at least 2**20 elements): a step of
        pieces of several sizes allocates it a few times at most."""
        numel = math.prod(shape)
        align = max(1, 64 // dtype.itemsize)
        stride = -(-numel // align) * align
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < count * stride:
            self._buffers.pop((dtype, device), None)  # freed before the larger one is allocated
            size = 1 << max(20, (count * stride - 1).bit_length())
            buffer = self._buffers[(dtype, device)] = torch.empty(size, dtype=dtype, device=device)
        return tuple(buffer[i * stride : i * stride + numel].view(shape) for i in range(count))


def step_compiled(engine, group: dict, units: list, loss: Any, stats, workspace: Workspace | None = None) -> list:
    """Step the units of a bucket that take the compiled path (their state is initialised and
    their step counters already advanced) with the statistics backend ``stats``; return the
    others, for the plain path. ``loss`` is not passed on: the rules that read it take the plain
    path (:func:`plain_reason`). ``workspace``: the optimizer step's (a new one by default)."""
    if units and isinstance(stats, StagedPieceStats):
        step_staged_pieces(engine, group, units, stats)
        return []
    if not units or not _group_takes(engine, group, units[0], stats):
        return units
    slots = engine.rule.active_slots(group)
    options = hyperparameters(engine, group)
    settings = settings_of(group, options)
    with skip_guards():
        return _step_units(engine, group, units, stats, slots, options, settings, workspace or Workspace())


def _step_units(
    engine, group: dict, units: list, stats, slots, options: dict, settings: str, workspace: Workspace
) -> list:
    rest = []
    partial: list[tuple[torch.Tensor, ParamView]] = []  # sums the kernels leave to complete
    staged: list[_Kernel] = []  # shards whose statistics of the whole tensor come in stages
    lr_value = float(group["lr"])
    lrs: dict[tuple, torch.Tensor] = {}
    for unit in units:
        # in_stages: a shard the kernel takes but not alone (shard_staged)
        codecs, takes_kernel, in_stages, rows = unit_plan(engine, group, unit, slots, settings)
        if _failed is not None or not takes_kernel:
            rest.append(unit)
            continue
        empty = _empty_shard(unit)
        if empty and not in_stages:
            # nothing of it here; its other shards need nothing of this process but its (zero)
            # part of their sums
            for tensor, view in shard_sums(slots, codecs, unit):
                partial.append((tensor.zero_(), view))
            continue
        dtype = engine.compute_dtype(unit.param)
        lr = lrs.get((dtype, unit.param.device))
        if lr is None:
            lr = lrs[(dtype, unit.param.device)] = torch.tensor(lr_value, dtype=dtype, device=unit.param.device)
        kernel = _Kernel(engine, group, unit, codecs, stats, options, settings, lr, in_stages, empty, rows, workspace)
        if in_stages:
            staged.append(kernel)
            continue
        if not kernel.step():
            rest.append(unit)
            continue
        partial.extend(shard_sums(slots, codecs, unit))
    _step_staged([_Staged([kernel], kernel.unit.view) for kernel in staged], stats.all_reduce if staged else None)
    for kernel in staged:
        partial.extend(shard_sums(slots, kernel.codecs, kernel.unit))
    complete_sums(stats, partial)
    return rest


def step_staged_pieces(engine, group: dict, units: list, stats: StagedPieceStats) -> None:
    """Step the row pieces ``units`` of one parameter in stages (see
    :class:`~hfoptim.core.stats.StagedPieceStats`): every piece records its parts, the parts
    are combined over the pieces and completed over the processes, and so on until each piece's
    writing kernel; then ``stats.finish``. :mod:`hfoptim.core.chunking` cuts only parameters the
    kernel takes (:func:`takes`); after a failed compilation the same stages run uncompiled."""
    slots = engine.rule.active_slots(group)
    options = hyperparameters(engine, group)
    settings = settings_of(group, options)
    p = units[0].param
    lr = torch.tensor(float(group["lr"]), dtype=engine.compute_dtype(p), device=p.device)
    kernels = []
    for unit in units:
        codecs = [resolve.codec_for(engine.rule, slot, group, unit.view) for slot in slots]
        eager = _failed is not None or _empty_shard(unit)
        kernel = _Kernel(engine, group, unit, codecs, stats, options, settings, lr, True, eager)
        kernels.append(kernel)
    with skip_guards():
        _step_staged([_Staged(kernels, stats.view, stats.finish)], stats.all_reduce)


def block_rows(block: int, unit, tensors, later: frozenset[str] = frozenset()) -> int | None:
    """The length ``b`` of the rows a CPU kernel sees a parameter as, ``(numel / b, b)``, or None
    to see it in its own shape.

    A step with 8-bit state takes the maximum of each block of 256 elements of every new moment
    (a reduction over ``(blocks, 256)``) and divides the block by it, while its arithmetic runs
    over the parameter's shape. Inductor's C++ backend puts loops under one outer loop (its
    outer-loop fusion) only when they share that loop, so a ``(rows, cols)`` update and
    ``(blocks, 256)`` maxima ran as separate passes over memory: a compiled ``adamw_8bit`` step
    read and wrote each new moment in fp32 between them, 40 bytes of traffic per element. With
    the parameter, its gradient and its state seen as rows of one block each, every loop of the
    step runs over ``(blocks, 256)``, and inductor steps it block by block under one outer loop
    (one pass over the codes, the gradient and the parameter). The scales, one per row in that
    view, are returned by the kernel instead of written into the state (:func:`_advance_one`'s
    ``returned``): a write of a ``(blocks, 1)`` input is a loop over the blocks alone, which
    keeps the others from fusing. What the step computes in one of a block's loops and reads in the
    next (the decoded state, the new moments) inductor keeps in buffers of one block
    (:mod:`~hfoptim.core.local_buffers`), so the kernel allocates nothing of the tensor's size. One
    compiled step, two threads of a 2-core Intel Xeon with AVX-512, both forms interleaved in one
    process, ratio to torch AdamW foreach: of a 8192x4096 tensor, ``adamw_8bit`` 0.81-0.90x ->
    0.71-0.78x, ``adan_8bit`` 0.98-1.12x either way; of 4096x1024, ``adamw_8bit`` 1.15-1.30x ->
    1.10-1.19x, ``adan_8bit`` 1.48-1.60x -> 1.39-1.58x (AVX2 kernels: ``adamw_8bit`` 1.47x ->
    1.36x).

    Taken for ``block``, what :func:`rows_block` found for the options, the storage forms and
    the view (every form allows the view and one asks for it, an elementwise rule with no
    modifier, whose per-row and per-tensor statistics would change meaning with the rows, on CPU:
    the loops are the C++ backend's, a GPU's kernels keep the parameter's shape), when the
    parameter has two or more dimensions, ``tensors`` (the kernel's parameter and gradient, of
    the parameter's shape) are contiguous, and every tensor of the state is contiguous and of
    the parameter's size, of one value per block, or 0-d. The entries ``later`` (of slots the
    kernel decodes but does not encode: :func:`encoded_later`) are read as they are: SMMF's
    factors and sign bits, whose rows of one block are the rows of its square matrix."""
    param = unit.param
    if param.dim() < 2:
        return None
    numel = param.numel()
    if numel % block or not all(t.is_contiguous() for t in tensors):
        return None
    for key, value in _state_tensors(unit.state):
        if key in later:
            continue
        if not value.is_contiguous() or (value.dim() and value.numel() not in (numel, numel // block)):
            return None
    return block


def rows_block(engine, group: dict, view: ParamView, codecs, device: torch.device) -> int | None:
    """The block length of :func:`block_rows` as far as the options, the storage forms and the
    parameter's ``view`` decide it (not its tensors' layout), or None: on CPU, an elementwise rule
    with no modifier, a parameter of two or more dimensions, and storage forms that all allow
    the view and one asks for it (:meth:`~hfoptim.state.codec.Codec.row_block`)."""
    if device.type != "cpu" or len(view.global_shape) < 2:
        return None
    # (CPR and stable weight decay never reach a kernel: plain_reason)
    if not engine.rule.is_elementwise(group) or any(m.enabled(group) for m in MODIFIERS):
        return None
    lengths = {codec.row_block(view) for codec in codecs}
    if None in lengths or len(lengths - {0}) != 1:
        return None
    (block,) = lengths - {0}
    return block


def _as_block_rows(
    block: int, tensors, state: dict, later: frozenset[str] = frozenset()
) -> tuple[list, dict, tuple[str, ...]]:
    """``tensors`` and ``state`` seen as rows of ``block`` elements (:func:`block_rows`): tensors
    of the parameter's size as ``(numel / block, block)``, those of one value per block as
    ``(numel / block, 1)``, 0-d ones as they are; and the keys of the state's values per block
    (the kernel returns them: :func:`_advance_one`'s ``returned``); the entries ``later`` as they
    are. Views: the kernel's writes reach the state."""
    numel = tensors[0].numel()
    rows = numel // block
    seen, per_block = {}, []
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() and key not in later:
            if value.numel() == numel:
                value = value.view(rows, block)
            else:
                value = value.view(rows, 1)
                per_block.append(key)
        seen[key] = value
    return [t.view(rows, block) for t in tensors], seen, tuple(per_block)


def _rows_free(engine, group: dict, codecs, options: dict, settings: str) -> dict | None:
    """The options of a kernel traced for any number of rows for a parameter seen as rows of one
    block (:func:`block_rows`) whose group has ``options`` (:func:`hyperparameters`, whose text
    is ``settings``) and whose slots are stored by ``codecs``, or None for a kernel of its row
    count. In that view nothing but the row count differs between the parameters of a model, so
    one kernel per rule, options and storage forms serves them all, whole tensors, row pieces and
    shards alike (:class:`~hfoptim.core.tracing.TracedKernel`'s ``symbolic_rows``; it asks for
    per-block statistics only, which :class:`PieceStats` gives), where a kernel per row count
    compiled three for ``adamw_8bit`` on the 100M set and more for a model of more shapes: a
    first step from an empty inductor cache of 7.9-8.0 s with three, 4.7-4.8 s with one, and the
    same step time after it (2-core Intel Xeon with AMX). The code is the same code with the row
    count read at the call, the same numbers bit for bit.

    None once such a kernel failed to trace or compile (:data:`_any_rows`); the caller keeps a
    single row to its own kernel (a traced row count is never 0 or 1). Inside, the kernel sees its
    own rows only and resolves its storage forms by their count, a symbol; with
    ``state_min_numel`` 0 it resolves the forms that the whole parameter's size chose here, which
    the key names: taken only when they agree. Remembered per rule, options and forms (the
    check and the copy cost about 10 us, a tenth of a small tensor's kernel call)."""
    if not (_any_rows and _kit_traces) or not all(c.any_rows for c in codecs):
        return None
    key = (type(engine.rule), settings, tuple(c.name for c in codecs))
    if key not in _any_size_options:
        any_size = dict(options, state_min_numel=0)
        view = ParamView(global_shape=torch.Size((2, 1)))  # any size: the threshold is 0
        slots = engine.rule.active_slots(group)
        same = all(resolve.codec_for(engine.rule, s, any_size, view).name == c.name for s, c in zip(slots, codecs))
        if len(_any_size_options) > 1024:  # options that changed often
            _any_size_options.clear()
        _any_size_options[key] = any_size if same else None
    return _any_size_options[key]


class _Kernel:
    """One unit's compiled step: its inputs, its kernel keys, and the calls (see
    :func:`_advance_one`). A staged shard (:func:`shard_staged`) collects the completed
    statistics in ``known``, one recording call per request, before the call that writes."""

    def __init__(
        self,
        engine,
        group,
        unit,
        codecs,
        stats,
        options,
        settings,
        lr,
        staged: bool,
        eager: bool,
        rows=None,
        workspace: Workspace | None = None,  # needed where a slot is encoded after the kernel
    ):
        self.engine, self.unit, self.codecs, self.options, self.lr = engine, unit, codecs, options, lr
        #: whether its statistics of the whole tensor come in stages (:func:`shard_staged`)
        self.staged = staged
        #: run the traced function as Python, uncompiled: an empty shard of a staged parameter
        #: (it sends zero parts and stores the completed whole-tensor state; no kernel to compile)
        self.eager = eager
        p = unit.param
        dtype = engine.compute_dtype(p)
        # a plain tensor, not the Parameter: dynamo keeps Parameter shapes static (one compilation
        # per shape); in-place updates of the detached alias reach the parameter
        self.work = p.to(dtype) if p.dtype != dtype else p.detach()
        self.grad = unit.grad if unit.grad.dtype == dtype else unit.grad.to(dtype)
        self.global_shape = tuple(unit.view.global_shape)
        #: the state the kernel steps: the unit's, or views of it (:func:`block_rows`)
        self.state = unit.state
        #: entries of :attr:`state` the kernel returns for :meth:`step` to write (:func:`block_rows`)
        self.returned: tuple[str, ...] = ()
        #: the slots whose new value the kernel writes out for :meth:`step` to encode with the plain
        #: path's code and the bucket's statistics ``stats`` (:func:`encoded_later`), with their forms
        self._later = [] if staged or eager else encoded_later(engine, group, codecs)
        self.encode_later: tuple[str, ...] = tuple(slot.name for slot, _ in self._later)
        self._bucket_stats = stats
        # rows: the block length of rows_block (unit_plan), which block_rows confirms for the tensors
        later = _slot_keys(unit.state, self.encode_later) if self._later else frozenset()
        block = None if staged or eager or rows is None else block_rows(rows, unit, (self.work, self.grad), later)
        if block is not None:
            (self.work, self.grad), self.state, self.returned = _as_block_rows(
                block, (self.work, self.grad), unit.state, later
            )
            self.global_shape = (unit.view.global_numel // block, block)
        #: where the kernel writes the new values of :attr:`_later`, for :meth:`step` to encode
        self.encoded_into: tuple[torch.Tensor, ...] = ()
        if self._later:
            self.encoded_into = workspace.take(len(self._later), self.work.shape, self.work.dtype, self.work.device)
        # a shard is stepped as rows from 0 when its forms cannot tell (one kernel per shape),
        # else at its true first row (one kernel per shape and first row)
        offset_free = p.dim() >= 2 and all(c.offset_free for c in codecs)
        self.row_start = 0 if offset_free else unit.view.row_start
        self.stats = kernel_stats(stats, unit.view)
        self.known: list[torch.Tensor] = []
        self.requests: int | None = None  # how many statistics a staged step asks for
        self.parts: list[tuple[torch.Tensor, str]] = []
        self.settings = settings
        #: what the kernel of one row count takes, where :func:`_rows_free` gave it another
        self._shaped: tuple | None = None
        if block is not None and self.work.shape[0] >= 2:
            any_size = _rows_free(engine, group, codecs, options, settings)
            if any_size is not None:
                self._shaped = (self.global_shape, self.options, self.stats)
                self.global_shape, self.options = None, any_size
                self.stats = PieceStats(foreach=self.stats.foreach)
        self.key = self._key()

    def _key(self) -> tuple:
        """The kernel's key: everything its trace depends on (see :func:`_compiled_fn`). The
        options and storage forms are part of it: two optimizers of one rule (adamw and
        adamw_factored, two learning setups in one process) get their own kernels. A kernel for
        any number of rows (:func:`_rows_free`) has None for the row count in its shapes."""
        any_rows = self.global_shape is None
        return (
            type(self.engine.rule),
            (None, *self.work.shape[1:]) if any_rows else tuple(self.work.shape),
            self.work.dtype,
            self.grad.dtype,
            self.work.device,
            self.work.stride(),
            self.grad.stride(),
            self.global_shape,
            self.row_start,
            (tuple(c.name for c in self.codecs), self.settings),
            type(self.stats),
            self.stats.foreach,
            state_signature(self.state, any_rows),
        )

    def _call(self, record: bool = False) -> tuple[bool, Any]:
        """``(True, what the kernel returned)``, or ``(False, None)`` when compiling failed
        (reported once; the unit then takes the plain path). A failure of an uncompiled call
        (``eager``) is raised: not a compilation but a bug, and the other processes wait for
        its parts."""
        known = tuple(self.known) if self.staged else None
        stage = (len(self.known), record) if self.staged else None
        run = _advance_one if self.eager else functools.partial(_run, (*self.key, stage))
        try:
            out = run(
                self.engine.rule,
                self.options,
                self.work,
                self.grad,
                self.state,
                self.stats,
                None,  # no loss: the rules that read it take the plain path (plain_reason)
                self.lr,
                self.global_shape,
                self.row_start,
                known,
                record,
                self.returned,
                self.encode_later,
                self.encoded_into,
            )
        except _AnyRowsFailed:
            self.global_shape, self.options, self.stats = self._shaped
            self.key = self._key()
            return self._call(record)
        except Exception as error:
            if self.eager:
                raise
            _compile_failed(error)
            return False, None
        return True, out

    def record(self) -> bool:
        """A recording call (staged): the parts of the requests not known yet; False when
        compiling failed (reported; :class:`_Staged` then runs the stages uncompiled)."""
        ok, out = self._call(record=True)
        if not ok:
            return False
        combine, *parts = out
        if self.requests is None:
            self.requests = len(parts)
        self.parts = list(zip(parts, combine))
        return True

    def step(self) -> bool:
        """The call that writes the step (all statistics known when staged); False when
        compiling failed (reported; the unit then takes the plain path, or for a staged one
        :class:`_Staged` the uncompiled stages)."""
        ok, stepped = self._call()
        if not ok:
            return False
        for key, new in zip(self.returned, stepped or (), strict=True):
            self.state[key].copy_(new)
        for (slot, codec), new in zip(self._later, self.encoded_into, strict=True):
            codec.encode_spent(slot, self.unit.state, new, self.unit.view, stats=self._bucket_stats)
        if self.unit.param.dtype != self.work.dtype:
            self.unit.param.copy_(self.work.view(self.unit.param.shape))
        return True


class _Staged:
    """Staged kernels whose parts make one value per request: a shard's kernel, or the row
    pieces of one parameter (their parts combined over the pieces first), with the view whose
    process group completes the values and what to run once every kernel has written."""

    def __init__(self, kernels: list[_Kernel], view: ParamView, finish=None):
        self.kernels, self.view, self.finish = kernels, view, finish

    def record(self) -> None:
        """A recording call of each kernel; a kernel whose compilation fails (reported once)
        runs its stages uncompiled: the other processes wait for its parts."""
        for k in self.kernels:
            if not k.record():
                self._uncompiled()
                k.record()

    def _uncompiled(self) -> None:
        for k in self.kernels:  # the family's other kernels would try (and fail) to compile too
            k.eager = True

    def combine(self) -> str | None:
        """How the first part not known yet combines (SUM or MAX); None when there is none."""
        parts = self.kernels[0].parts
        return parts[0][1] if parts else None

    def part(self) -> torch.Tensor:
        """The first part, combined over the kernels."""
        parts = [k.parts[0][0] for k in self.kernels]
        if len(parts) == 1:
            return parts[0]
        stacked = torch.stack(parts)
        return stacked.amax(dim=0) if self.combine() == MAX else stacked.sum(dim=0)

    def learn(self, total: torch.Tensor) -> None:
        for k in self.kernels:
            k.known.append(total)

    def complete(self) -> bool:
        k = self.kernels[0]
        return len(k.known) >= k.requests

    def step(self) -> None:
        """The writing call of each kernel (uncompiled where compiling fails), then ``finish``."""
        for k in self.kernels:
            if not k.step():
                self._uncompiled()
                k.step()
        if self.finish is not None:
            self.finish(self.kernels[-1].unit)


def _step_staged(families: list[_Staged], all_reduce) -> None:
    """Step staged kernels (:class:`~hfoptim.core.stats.StagedStats`): a recording call each,
    then, until every family has all its statistics, one all-reduce per way of combining for
    the first part of every family still recording (``all_reduce``: the layout's; None when
    every family is held whole) and the next call of each (recording, or the writing one once
    all are known). Every process runs the same families (the decision reads only what they
    share) and the same traced code, so the parts and collectives match."""
    for family in families:
        family.record()
    pending = list(families)
    while pending:
        for combine, op in ((SUM, dist.ReduceOp.SUM), (MAX, dist.ReduceOp.MAX)):
            waiting = [f for f in pending if f.combine() == combine]
            if not waiting:
                continue
            parts = [f.part() for f in waiting]
            totals = all_reduce(parts, [f.view for f in waiting], op=op) if all_reduce else parts
            for family, total in zip(waiting, totals):
                family.learn(total)
        still = []
        for family in pending:
            if family.complete():
                family.step()
            else:
                family.record()
                still.append(family)
        pending = still


def _compile_failed(error: Exception) -> None:
    """Report a failed compilation once; every parameter runs the plain path from then on."""
    global _failed
    _failed = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    message = (
        f"hfoptim: the fused optimizer step failed to compile ({_failed}); the optimizer step runs the plain "
        f"(slower) path from now on. Set compile='off' to skip the attempt."
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def shard_sums(slots, codecs, unit) -> list[tuple[torch.Tensor, ParamView]]:
    """The stored tensors that the kernel of the shard ``unit`` leaves as this process's partial
    sums (:meth:`~hfoptim.state.codec.Codec.shard_sums`), each with the shard's view."""
    if not unit.view.sharded:
        return []
    return [(unit.state[key], unit.view) for slot, c in zip(slots, codecs) for key in c.shard_sums(slot, unit.view)]


def complete_sums(stats, partial: list[tuple[torch.Tensor, ParamView]]) -> None:
    """Sum each partial tensor over its view's process group, in place: one all-reduce per group
    for all the bucket's kernels. Every process calls it with the same tensors in the same order:
    which shards take the kernel depends only on what all processes share (:func:`shard_local`),
    an empty shard included (it sends zeros)."""
    if not partial:
        return
    tensors = [t for t, _ in partial]
    for tensor, total in zip(tensors, stats.all_reduce(tensors, [v for _, v in partial])):
        if total is not tensor:
            tensor.copy_(total)


def reset() -> None:
    """Forget compiled kernels and a past failure (tests)."""
    global _failed, _kit_traces, _any_rows
    _kit_traces = _any_rows = True
    kernel_build.reset()
    _any_size_options.clear()
    _large_blocks.clear()
    _compiled.clear()
    _settings.clear()
    calls.clear()
    recorded.clear()
    traced.update(kit=0, dynamo=0)
    _failed = None
    torch._dynamo.reset()
