"""DeepSpeed ZeRO: units over the segments of flat fp32 partitions.

DeepSpeed hands its client optimizer flat tensors instead of the parameters:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and the bf16 stage-1 optimizer (``BF16_Optimizer``)
  flatten each parameter group (parameters one after the other, possibly with alignment
  padding between them) and give each process ONE contiguous partition of it
  (``single_partition_of_fp32_groups[i]`` / ``fp32_groups_flat_partition[i]``). A parameter
  may be cut by a partition boundary anywhere, even inside a row.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``) partitions every parameter on its own
  (``ds_tensor``: ``ceil(numel / world)`` elements of the flattened parameter per process, the
  last one padded) and hands the optimizer sub-groups, each the concatenation of its parameters'
  partitions (``fp32_partitioned_groups_flat[k]``), one ``step()`` per sub-group.

:class:`ZeroLayout` recovers, from DeepSpeed's own bookkeeping, where each parameter's owned
elements sit in the flat tensor, and makes one unit per parameter and process (an empty one where
a process owns nothing of it, so every process runs the same collectives). A unit is the run of
whole rows that contains the owned elements: a view of the flat tensor when the owned range starts
and ends on row boundaries, else a padded working copy of the cut rows (``ParamView.valid`` marks
the owned part) that is written back after the update. State is kept per parameter segment in
``optimizer.state[flat]["segments"][index]`` (index: the parameter's position in its DeepSpeed
group), the same tensors from step to step.
"""

from __future__ import annotations

import gc
import logging
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..core.layout import Layout, Unit, check_state_shapes, mean_over
from ..core.optimizer import RuleOptimizer
from ..core.stats import ParamView
from ..state import convert
from .checkpoint import TAG, hfoptim_engine
from .stats import ShardedStats, UnsupportedSharding

logger = logging.getLogger(__name__)

SEGMENTS = "segments"


@dataclass(frozen=True)
class Segment:
    """Parameter ``index`` (shape ``shape``) owns its flat elements ``[start, stop)`` on this
    process, stored from ``pos`` on in the flat tensor; ``cuts``: where ownership changes. One
    matrix of a fused expert tensor (:func:`matrix_segments`) has the index ``"<index>.<e>"``
    and ``param`` the index of the parameter."""

    index: int | str
    shape: torch.Size
    start: int
    stop: int
    pos: int
    cuts: tuple[int, ...]
    param: int | None = None

    @property
    def param_index(self) -> int:
        """The position of the parameter this segment belongs to in its DeepSpeed group."""
        return self.index if self.param is None else self.param


def matrix_segments(segment: Segment, batch: int) -> list[Segment]:
    """The segment of a parameter whose ``batch`` leading axes index independent matrices (a fused
    expert tensor ``(E, out, in)``) cut into one segment per matrix, of the matrix's shape: each
    matrix is then stepped as a parameter of its own, exactly, wherever the partition boundaries
    fall (a matrix this process holds nothing of gets an empty segment, as any parameter)."""
    shape = tuple(segment.shape)
    inner = shape[batch:]
    size = _numel(inner)
    out = []
    for e in range(_numel(shape[:batch])):
        lo = e * size
        start = min(max(segment.start - lo, 0), size)
        stop = min(max(segment.stop - lo, 0), size)
        cuts = tuple(c - lo for c in segment.cuts if lo < c < lo + size)
        pos = segment.pos + lo + start - segment.start if stop > start else 0
        stop = max(stop, start)
        out.append(Segment(f"{segment.index}.{e}", torch.Size(inner), start, stop, pos, cuts, segment.index))
    return out


def segment_key(index) -> int | str:
    """A segment's key in the state as saved (an int, or ``"<index>.<e>"`` for one matrix)."""
    return int(index) if isinstance(index, int) or str(index).isdigit() else str(index)


def flat_group_segments(shapes, offsets, partition_size: int, world: int, rank: int) -> list[Segment]:
    """Segments of parameters laid out at ``offsets`` in a flat buffer split into ``world``
    partitions of ``partition_size`` elements (ZeRO-1/2): this process owns partition ``rank``."""
    lo, hi = rank * partition_size, (rank + 1) * partition_size
    out = []
    for index, (shape, offset) in enumerate(zip(shapes, offsets)):
        numel = _numel(shape)
        start, stop = max(offset, lo), min(offset + numel, hi)
        bounds = (k * partition_size for k in range(1, world))
        cuts = tuple(b - offset for b in bounds if offset < b < offset + numel)
        if stop <= start:
            start = stop = min(max(lo - offset, 0), numel)
            out.append(Segment(index, shape, start, stop, 0, cuts))
        else:
            out.append(Segment(index, shape, start - offset, stop - offset, start - lo, cuts))
    return out


def per_param_segments(shapes, partition_numels, world: int, rank: int) -> list[Segment]:
    """Segments of parameters partitioned one by one (ZeRO-3): parameter ``i`` keeps
    ``partition_numels[i]`` elements per process, this process the ``rank``-th run; the flat
    tensor is the concatenation of the partitions."""
    out, pos = [], 0
    for index, (shape, size) in enumerate(zip(shapes, partition_numels)):
        numel = _numel(shape)
        start, stop = min(rank * size, numel), min((rank + 1) * size, numel)
        cuts = tuple(k * size for k in range(1, world) if k * size < numel)
        out.append(Segment(index, shape, start, stop, pos, cuts))
        pos += size
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Piece:
    """The unit tensors of one segment over one flat tensor (param side cached across steps)."""

    def __init__(self, segment: Segment, flat: torch.Tensor, group):
        shape = torch.Size(segment.shape)
        self.segment = segment
        row_len = _numel(shape[1:]) if len(shape) > 1 else 1
        rows = shape[0] if len(shape) > 0 else 1
        s, e = segment.start, segment.stop
        n = e - s
        if n <= 0:
            r0 = r1 = min(s // row_len, rows)
        else:
            r0, r1 = s // row_len, -(-e // row_len)
        lead = s - r0 * row_len
        self.local_rows = r1 - r0
        self.local_shape = (self.local_rows, *shape[1:]) if len(shape) else (() if self.local_rows else (0,))
        self.range = (lead, lead + n)
        self.padded = n > 0 and (lead != 0 or (r1 - r0) * row_len != n)
        self.view = ParamView(
            global_shape=shape,
            row_start=r0,
            local_rows=self.local_rows,
            valid=self.range if self.padded else None,
            cuts=segment.cuts,
            group=group,
        )
        self.flat = flat
        self.seg = flat.narrow(0, segment.pos, max(n, 0))
        if self.padded:
            self.param = flat.new_zeros(self.local_shape)
        else:
            self.param = self.seg.view(self.local_shape)

    def grad(self, flat_grad: torch.Tensor) -> torch.Tensor:
        g = flat_grad.narrow(0, self.segment.pos, self.seg.numel())
        if not self.padded:
            return g.view(self.local_shape)
        a, b = self.range
        out = flat_grad.new_zeros(self.local_shape)
        out.view(-1)[a:b] = g
        return out

    def refresh(self) -> None:
        """Load the owned elements into the padded working copy (DeepSpeed may have changed them)."""
        if self.padded:
            a, b = self.range
            self.param.zero_()
            self.param.view(-1)[a:b] = self.seg

    def writeback(self) -> None:
        a, b = self.range
        self.seg.copy_(self.param.view(-1)[a:b])


@dataclass
class FlatGroup:
    """One flat tensor DeepSpeed hands the optimizer, and the parameters it stands for."""

    flat: torch.Tensor
    segments: list[Segment]
    group: object  # the process group the parameters are partitioned over
    params: list  # DeepSpeed's parameter objects, by segment index


class ZeroLayout(Layout):
    """Units over the parameter segments of DeepSpeed's flat partitions (see module docstring)."""

    def __init__(self, flat_groups: list[FlatGroup], dp_group, foreach: bool = True, kind: str = "ZeRO"):
        self.foreach = foreach
        self.stats = ShardedStats(foreach=foreach)
        self.kind = kind
        self.dp_group = dp_group
        self.flat_groups = {id(fg.flat): fg for fg in flat_groups}
        self._pieces: dict[int, list[_Piece]] = {}
        # DeepSpeed calls step() once per flat tensor (ZeRO-1/2: per parameter group, ZeRO-3: per
        # sub-group), so a step sees all the parameters only when there is one
        self.steps_all_parameters = len(flat_groups) <= 1
        self.partial_step_reason = (
            f"DeepSpeed {kind} steps its {len(flat_groups)} flat partitions (parameter groups, or ZeRO-3 "
            f"sub-groups) one step() call at a time: give the optimizer one parameter group (and, under ZeRO-3, "
            f"a zero_optimization.sub_group_size above the parameter count)"
        )

    def for_step(self, optimizer) -> Layout:
        return self

    def mean_loss(self, loss: float) -> float:
        return mean_over(loss, self.dp_group)

    def view(self, p: torch.Tensor) -> ParamView:
        fg = self.flat_groups.get(id(p))
        if fg is None or fg.flat is not p:
            return ParamView.of(p)
        return ParamView(global_shape=p.shape)

    def _flat_group(self, flat: torch.Tensor) -> FlatGroup:
        fg = self.flat_groups.get(id(flat))
        if fg is None or fg.flat is not flat:
            raise UnsupportedSharding(
                f"the optimizer was handed a tensor of shape {tuple(flat.shape)} that is none of the {self.kind} "
                f"flat partitions hfoptim.integrations.deepspeed.attach() mapped; DeepSpeed rebuilt its partitions "
                f"(call attach(engine) again after that)"
            )
        return fg

    def pieces(self, flat: torch.Tensor, optimizer=None, group: dict | None = None) -> list[_Piece]:
        """The pieces of ``flat``; with ``optimizer`` and ``group``, the parameters stepped as a
        batch of matrices (fused experts, :meth:`~hfoptim.core.optimizer.RuleOptimizer.stepped_as`) come
        as one piece per matrix."""
        fg = self._flat_group(flat)
        split = self._batched(fg, optimizer, group) if optimizer is not None else {}
        key = (id(flat), tuple(sorted(split.items())))
        cached = self._pieces.get(key)
        if cached is None or (cached and cached[0].flat.data_ptr() != flat.data_ptr()):
            segments = []
            for s in fg.segments:
                segments.extend(matrix_segments(s, split[s.index]) if s.index in split else [s])
            cached = [_Piece(s, flat, fg.group) for s in segments]
            self._pieces[key] = cached
        return cached

    @staticmethod
    def _batched(fg: FlatGroup, optimizer, group: dict) -> dict[int, int]:
        """Segment index -> batch axes, for the parameters of ``fg`` stepped as a batch of matrices
        (not transposed ones: a cut transposed matrix cannot be viewed as ``(out, in)``)."""
        out = {}
        for s in fg.segments:
            layout = optimizer.layout_of(fg.params[s.index])
            if layout.batch and not layout.transposed and optimizer.stepped_as(group, layout, s.shape) is not None:
                out[s.index] = layout.batch
        return out

    def _source(self, flat: torch.Tensor, piece: _Piece) -> torch.Tensor:
        """The model parameter a segment belongs to (its layout is looked up by it)."""
        return self._flat_group(flat).params[piece.segment.param_index]

    def units_without_grad(self, optimizer, group: dict) -> list[Unit]:
        """Every segment's unit, gradient or not (to create state without a step)."""
        units = []
        for flat in group["params"]:
            segments = optimizer.state[flat].setdefault(SEGMENTS, {})
            for piece in self.pieces(flat, optimizer, group):
                piece.refresh()
                state = segments.setdefault(piece.segment.index, {})
                source, one = self._source(flat, piece), piece.segment.param is not None
                units.append(Unit(piece.param, piece.param, state, piece.view, flat, None, source, one))
        return units

    def regroup_transposed(self, units: list[Unit], returns: list | None) -> list[Unit]:
        """Sharded ``Conv1D`` weights over whole output units (:mod:`hfoptim.distributed.transpose`)."""
        from .transpose import regroup

        return regroup(units, self.stats, returns)

    # ------------------------------------------------------------------ checkpoints
    def import_state(self, optimizer, state_dict: dict) -> dict:
        """Check every segment's state against this run's segments (DeepSpeed's own checkpoint
        loads each process's state into the same partitioning) and keep the saved tensors (with
        their dtypes, upgraded to this version's state format) to put back after torch's load,
        which casts nested state to fp32."""
        self._loaded = {}
        tag = state_dict.get(TAG)
        fmt = convert.saved_format(tag) if tag is not None else convert.STATE_FORMAT
        groups = state_dict["param_groups"]
        for saved, group in zip(groups, optimizer.param_groups):
            options = {k: v for k, v in saved.items() if k in optimizer._spec}
            merged = {**group, **options}
            for pid, flat in zip(saved["params"], group["params"]):
                pstate = state_dict["state"].get(pid)
                if pstate is None:
                    continue
                segments = pstate.get(SEGMENTS)
                if segments is None:
                    raise ValueError(
                        f"state_dict entry for the {self.kind} flat partition {pid} has keys {sorted(pstate)}, "
                        f"not per-parameter segments: it was not saved by hfoptim under {self.kind}"
                    )
                by_index = {piece.segment.index: piece for piece in self.pieces(flat, optimizer, merged)}
                for index, seg_state in segments.items():
                    piece = by_index.get(segment_key(index))
                    if piece is None:
                        raise ValueError(
                            f"state_dict has state for segment {index} of flat partition {pid}, which holds "
                            f"{len(by_index)} parameters here (saved with another model or partitioning)"
                        )
                    where = f"{pid} (segment {index}, shape {tuple(piece.view.global_shape)})"
                    # one matrix of a fused tensor is checked as a parameter of its own (no layout)
                    param = self._source(flat, piece) if piece.segment.param is None else None
                    check_state_shapes(optimizer, where, param, seg_state, merged, piece.view)
                views = {index: by_index[segment_key(index)].view for index in segments}
                segments = {
                    index: convert.upgrade_param_state(optimizer.rule, seg, merged, views[index], fmt)
                    for index, seg in segments.items()
                }
                self._loaded[id(flat)] = (flat, segments)
        if tag is not None:
            state_dict = {**state_dict, TAG: {**tag, "format": convert.STATE_FORMAT}}
        return state_dict

    def check_param_state(self, optimizer, pid, p, pstate: dict, group: dict) -> None:
        """Checked per segment in :meth:`import_state`."""

    def after_load(self, optimizer) -> None:
        """Put the saved segment tensors back as they were saved (dtype included)."""
        for flat, segments in getattr(self, "_loaded", {}).values():
            optimizer.state[flat][SEGMENTS] = {
                segment_key(index): {
                    k: v.to(flat.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in seg.items()
                }
                for index, seg in segments.items()
            }
        self._loaded = {}

    def units(self, optimizer, group: dict) -> list[Unit]:
        units = []
        for flat in group["params"]:
            pieces = self.pieces(flat, optimizer, group)
            if flat.grad is None:
                continue
            if flat.grad.numel() != flat.numel():
                raise UnsupportedSharding(
                    f"{self.kind}: flat partition of {flat.numel()} elements has a gradient of {flat.grad.numel()}"
                )
            segments = optimizer.state[flat].setdefault(SEGMENTS, {})
            for piece in pieces:
                piece.refresh()
                state = segments.setdefault(piece.segment.index, {})
                writeback = piece.writeback if piece.padded else None
                grad, source = piece.grad(flat.grad), self._source(flat, piece)
                one = piece.segment.param is not None  # one matrix of a fused tensor: already canonical
                units.append(Unit(piece.param, grad, state, piece.view, flat, writeback, source, one))
        return units


# ---------------------------------------------------------------------- DeepSpeed bookkeeping
def zero12_layout(zero_optimizer, foreach: bool) -> ZeroLayout:
    """The layout for ``DeepSpeedZeroOptimizer`` (ZeRO-1/2) from its partition bookkeeping."""
    zo = zero_optimizer
    groups = []
    for i, flat in enumerate(zo.single_partition_of_fp32_groups):
        pg = zo.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=pg), dist.get_rank(group=pg)
        params = zo.round_robin_bit16_groups[i]
        shapes = [m.shape for m in zo.round_robin_bit16_meta[i]]
        offsets = list(zo.round_robin_bit16_offsets[i])
        partition_size = int(zo.partition_size[i])
        if partition_size * world != zo.bit16_groups_flat[i].numel() or flat.numel() != partition_size:
            raise UnsupportedSharding(
                f"DeepSpeed ZeRO group {i}: unexpected partition layout (flat {zo.bit16_groups_flat[i].numel()}, "
                f"partition {partition_size} x {world}, local {flat.numel()})"
            )
        segments = flat_group_segments(shapes, offsets, partition_size, world, rank)
        # index segments by the parameter's position in DeepSpeed's (un-reordered) group
        position = {id(p): j for j, p in enumerate(zo.bit16_groups[i])}
        segments = [_reindex(s, position[id(p)]) for s, p in zip(segments, params)]
        segments.sort(key=lambda s: s.index)
        groups.append(FlatGroup(flat, segments, pg if world > 1 else None, list(zo.bit16_groups[i])))
    kind = "ZeRO-2" if zo.partition_gradients else "ZeRO-1"
    return ZeroLayout(groups, zo.dp_process_group, foreach=foreach, kind=kind)


def bf16_layout(bf16_optimizer, foreach: bool) -> ZeroLayout:
    """The layout for ``BF16_Optimizer`` (bf16 parameters, fp32 gradient accumulation, stage 1)."""
    bo = bf16_optimizer
    groups = []
    for i, flat in enumerate(bo.fp32_groups_flat_partition):
        pg = bo.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=pg), dist.get_rank(group=pg)
        params = bo.bf16_groups[i]
        shapes = [p.shape for p in params]
        offsets, pos = [], 0
        for p in params:
            offsets.append(pos)
            pos += p.numel()
        partition_size = bo.bf16_groups_flat[i].numel() // world
        segments = flat_group_segments(shapes, offsets, partition_size, world, rank)
        groups.append(FlatGroup(flat, segments, pg if world > 1 else None, list(params)))
    return ZeroLayout(groups, bo.dp_process_group, foreach=foreach, kind="ZeRO-1 (bf16)")


def zero3_layout(zero_optimizer, foreach: bool) -> ZeroLayout:
    """The layout for ``DeepSpeedZeroOptimizer_Stage3``: per-parameter partitions, one flat
    tensor per sub-group."""
    zo = zero_optimizer
    groups = []
    for k, flat in enumerate(zo.fp32_partitioned_groups_flat):
        params = zo.fp16_groups[k]
        pg = zo.sub_group_process_groups[k] if hasattr(zo, "sub_group_process_groups") else zo.dp_process_group
        world, rank = dist.get_world_size(group=pg), dist.get_rank(group=pg)
        shapes = [p.ds_shape for p in params]
        sizes = [p.partition_numel() for p in params]
        if sum(sizes) != flat.numel():
            raise UnsupportedSharding(
                f"DeepSpeed ZeRO-3 sub-group {k}: partitions of {sum(sizes)} elements, flat tensor of {flat.numel()}"
            )
        segments = per_param_segments(shapes, sizes, world, rank)
        groups.append(FlatGroup(flat, segments, pg if world > 1 else None, list(params)))
    return ZeroLayout(groups, zo.dp_process_group, foreach=foreach, kind="ZeRO-3")


def _reindex(segment: Segment, index: int) -> Segment:
    return Segment(index, segment.shape, segment.start, segment.stop, segment.pos, segment.cuts)


# ---------------------------------------------------------------------- attaching to DeepSpeed
def _zero_classes() -> tuple:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer


def attach(engine_or_optimizer, *, foreach: bool | None = None) -> RuleOptimizer:
    """Install the exact ZeRO layout on the hfoptim optimizer that DeepSpeed wraps.

    ``engine_or_optimizer``: the DeepSpeedEngine returned by ``deepspeed.initialize`` or its
    ``.optimizer`` (the ZeRO optimizer). Returns the hfoptim optimizer. Raises
    :class:`~hfoptim.distributed.select.UnsupportedSharding` naming the combination for setups
    that cannot be exact, and ``TypeError`` when DeepSpeed does not wrap an hfoptim optimizer.
    """
    DeepSpeedZeroOptimizer, Stage3, BF16 = _zero_classes()
    zero = engine_or_optimizer
    if not isinstance(zero, (DeepSpeedZeroOptimizer, Stage3, BF16)):
        zero = getattr(engine_or_optimizer, "optimizer", None)
    engine = hfoptim_engine(getattr(zero, "optimizer", None))
    if not isinstance(zero, (DeepSpeedZeroOptimizer, Stage3, BF16)):
        inner = hfoptim_engine(zero) or hfoptim_engine(engine_or_optimizer)
        if inner is not None:
            return inner  # no ZeRO partitioning (stage 0 / DDP): parameters are stepped whole
        raise TypeError(f"attach() needs a DeepSpeed engine or ZeRO optimizer, got {type(engine_or_optimizer)}")
    if engine is None:
        wrapped = type(getattr(zero, "optimizer", None)).__name__
        raise TypeError(f"DeepSpeed's {type(zero).__name__} wraps {wrapped}, not an hfoptim optimizer")
    refuse_unsupported(zero, engine)
    fe = engine.foreach if foreach is None else foreach
    if isinstance(zero, DeepSpeedZeroOptimizer):
        layout = zero12_layout(zero, fe)
    elif isinstance(zero, Stage3):
        layout = zero3_layout(zero, fe)
    else:
        layout = bf16_layout(zero, fe)
    engine.layout = layout
    return engine


def refuse_unsupported(zero, engine: RuleOptimizer) -> None:
    name = f"{type(engine).__name__} ({engine.rule.name}) under DeepSpeed {type(zero).__name__}"
    if getattr(zero, "zenflow", False):
        raise UnsupportedSharding(
            f"{name} with ZenFlow: ZenFlow steps part of the parameters with its own CPU optimizer; "
            f"use plain ZeRO-1/2 (zero_optimization without zenflow)"
        )
    if getattr(zero, "swap_optimizer", False):
        raise UnsupportedSharding(
            f"{name} with offload_optimizer.device='nvme': DeepSpeed swaps optimizer state to NVMe by its own "
            f"flat state tensors and would not swap hfoptim's per-parameter state; use offload_optimizer.device='cpu' "
            f"or no optimizer offload"
        )
    if getattr(zero, "backup_optimizer", None) is not None:
        raise UnsupportedSharding(
            f"{name} with offload_optimizer.ratio < 1: DeepSpeed steps the GPU sub-groups with its own AdamW; "
            f"use ratio 1.0 (full CPU offload) or no offload"
        )
    if getattr(zero, "elastic_checkpoint", False):
        raise UnsupportedSharding(
            f"{name} with zero_optimization.elastic_checkpoint=true: elastic checkpoints merge state tensors "
            f"by key across partitions, which does not fit per-parameter state; set elastic_checkpoint=false"
        )
    if getattr(zero, "torch_autocast_gradscaler", None) is not None and engine.rule.needs_loss:
        raise UnsupportedSharding(f"{name}: a loss-driven rule under torch autocast's GradScaler step; use bf16")


def _wraps(obj, classes, engine) -> bool:
    """Whether ``obj`` is a ZeRO optimizer wrapping ``engine``. The heap holds weak proxies too,
    and ``isinstance`` on a proxy whose referent is gone (an earlier DeepSpeed engine of the same
    process) raises ReferenceError: such an object wraps nothing."""
    try:
        return isinstance(obj, classes) and hfoptim_engine(getattr(obj, "optimizer", None)) is engine
    except ReferenceError:
        return False


def find_and_attach(engine: RuleOptimizer) -> ZeroLayout | None:
    """Find the DeepSpeed ZeRO optimizer that wraps ``engine`` and attach it (once, at the first
    step when the engine sees flat partitions it was not told about); None if there is none."""
    if "deepspeed" not in sys.modules:
        return None
    try:
        classes = _zero_classes()
    except ImportError:  # pragma: no cover - deepspeed half-installed
        return None
    with warnings.catch_warnings():  # isinstance() on some lazily imported objects warns
        warnings.simplefilter("ignore")
        owners = [obj for obj in gc.get_objects() if _wraps(obj, classes, engine)]
    if len(owners) != 1:
        return None
    attach(owners[0])
    logger.info("hfoptim: attached to DeepSpeed %s automatically", type(owners[0]).__name__)
    return engine.layout
