"""Per-tensor statistics: the one place where rules and modifiers reduce over a tensor.

Every norm, mean, row or column sum that a rule or modifier needs is computed here, over the
*whole* parameter. On one process that is the local tensor. The sharding layer replaces
:class:`LocalStats` with a backend that combines the partial sums of all shards in one batched
all-reduce, so no statistic is ever computed on a shard as if it were the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .tracing import is_traced


@dataclass(frozen=True)
class ParamView:
    """What this process holds of one parameter.

    The local tensor a rule works on is always a run of whole rows (indices along dim 0; the
    elements of a 0-/1-D tensor count as rows) of the global parameter: shape
    ``(rows, *global_shape[1:])``, starting at global row ``row_start``. On one process, and for
    FSDP2 row shards, every element of it belongs to this process. A ZeRO flat partition can cut
    a parameter inside a row; the sharding layer then pads the cut rows, and ``valid`` is the
    flat range of the local tensor that is really this process's (the padding is never used by a
    statistic nor written back).

    ``cuts`` are the global flat offsets (0 < c < numel) at which ownership passes from one
    process to the next, the same on every process; ``group`` is the process group that shares
    the parameter (None: held whole). Defaults describe a parameter held whole.
    """

    global_shape: torch.Size
    row_start: int = 0
    #: rows of the local tensor; None: all rows of the parameter
    local_rows: int | None = None
    #: flat range [start, stop) of the local tensor owned by this process; None: all of it
    valid: tuple[int, int] | None = None
    cuts: tuple[int, ...] = ()
    group: Any = None

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def row_len(self) -> int:
        """Elements per row: ``prod(global_shape[1:])`` (1 for 0-/1-D tensors)."""
        return math.prod(self.global_shape[1:]) if len(self.global_shape) > 1 else 1

    @property
    def global_rows(self) -> int:
        return self.global_shape[0] if len(self.global_shape) > 0 else 1

    @property
    def rows(self) -> int:
        """Rows of the local tensor."""
        return self.global_rows if self.local_rows is None else self.local_rows

    @property
    def local_numel(self) -> int:
        return self.rows * self.row_len

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of the local tensor: ``(rows, *global_shape[1:])`` (``()`` for a scalar, ``(0,)``
        for a scalar held by another process)."""
        if len(self.global_shape) == 0:
            return () if self.rows else (0,)
        return (self.rows, *self.global_shape[1:])

    @property
    def offset(self) -> int:
        """Global flat index of the local tensor's first element."""
        return self.row_start * self.row_len

    @property
    def valid_range(self) -> tuple[int, int]:
        """``valid``, or the whole local tensor."""
        return self.valid if self.valid is not None else (0, self.local_numel)

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @classmethod
    def of(cls, p: torch.Tensor) -> ParamView:
        return cls(global_shape=p.shape)


def flat_matrix_view(view: ParamView, cols: int) -> ParamView:
    """The view of the same process's elements when the WHOLE parameter, flattened, is seen as a
    matrix ``(numel // cols, cols)`` (SMMF's square matricization): the rows of that matrix this
    process touches, and which of their elements it owns. On one process: the whole matrix, or
    for a row piece of the parameter (:mod:`hfoptim.core.chunking`, cut only where the matrix's
    rows are cut too: :meth:`~hfoptim.state.smmf.SMMF.rows`) the matrix rows it holds."""
    numel = view.global_numel
    rows = numel // cols if cols else 0
    a, b = view.valid_range
    start, stop = view.offset + a, view.offset + b
    first = start // cols if cols else 0
    last = -(-stop // cols) if stop > start else first
    if not view.sharded:
        if view.local_rows is None:
            return ParamView(global_shape=torch.Size((rows, cols)))
        return ParamView(global_shape=torch.Size((rows, cols)), row_start=first, local_rows=last - first)
    return ParamView(
        global_shape=torch.Size((rows, cols)),
        row_start=first,
        local_rows=last - first,
        valid=(start - first * cols, stop - first * cols),
        cuts=view.cuts,
        group=view.group,
    )


def to_flat_matrix(t: torch.Tensor, view: ParamView, cols: int) -> torch.Tensor:
    """The owned elements of the local tensor ``t`` placed in the rows of
    :func:`flat_matrix_view` (zeros where this process owns nothing)."""
    mview = flat_matrix_view(view, cols)
    if not view.sharded:
        return t.reshape(mview.rows, cols)
    a, b = view.valid_range
    ma, mb = mview.valid_range
    out = t.new_zeros(mview.rows * cols)
    out[ma:mb] = t.reshape(-1)[a:b]
    return out.view(mview.rows, cols)


def from_flat_matrix(m: torch.Tensor, view: ParamView, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_flat_matrix`: the local tensor (``view.local_shape``) holding the
    owned elements of ``m`` (zeros in the padding of cut rows)."""
    if not view.sharded:
        return m.reshape(view.local_shape)
    mview = flat_matrix_view(view, cols)
    a, b = view.valid_range
    ma, mb = mview.valid_range
    out = m.new_zeros(view.local_numel)
    out[a:b] = m.reshape(-1)[ma:mb]
    return out.view(view.local_shape)


class LocalStats:
    """Statistics for tensors that are held whole by this process."""

    def __init__(self, foreach: bool = True):
        self.foreach = foreach
        #: one entry per :meth:`matrix_map` call: for each of its tensors, 1 where this process
        #: ran ``fn`` on the whole matrix, else 0 (summed over processes: 1 each, tests check it)
        self.matrix_runs: list[list[int]] = []

    def matrix_map(
        self, fn: Callable[[torch.Tensor], torch.Tensor], tensors: list[torch.Tensor], views: list[ParamView]
    ) -> list[torch.Tensor]:
        """``fn`` applied ONCE to each WHOLE parameter seen as the matrix ``(rows, row_len)``
        (a 4-D convolution kernel as ``(out, in*k*k)``), returning for each tensor the part of
        ``fn``'s result that the local tensor holds, in the local shape.

        ``fn`` is a whole-matrix operation that no shard can compute (Muon's Newton-Schulz
        orthogonalization); it must return a matrix of the input's shape and dtype. Here every tensor is
        held whole. A sharding backend gathers each matrix on one owner process, runs ``fn``
        there once, and sends every process its rows of the result."""
        out = [fn(t.reshape(v.global_rows, v.row_len)).reshape(t.shape) for t, v in zip(tensors, views)]
        self.matrix_runs.append([1] * len(tensors))
        return out

    def sum_sq(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[torch.Tensor]:
        """Sum of squares of each tensor, as 0-d tensors."""
        if self.foreach and tensors and not is_traced():
            norms = torch._foreach_norm(tensors)
            return [n * n for n in norms]
        return [t.square().sum() for t in tensors]

    def norm(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[torch.Tensor]:
        """L2 norm of each tensor, as 0-d tensors. Traced (the compiled path), each a reduction
        inductor fuses into the loop that produces the tensor; ``torch._foreach_norm`` has no
        lowering there and would run as a separate library call reading the tensor again."""
        if self.foreach and tensors and not is_traced():
            return list(torch._foreach_norm(tensors))
        return [torch.linalg.vector_norm(t) for t in tensors]

    def sum(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[torch.Tensor]:
        """Sum of each tensor, as 0-d tensors."""
        return [t.sum() for t in tensors]

    def row_sum(self, tensor: torch.Tensor, view: ParamView) -> torch.Tensor:
        """Sums over every dimension but the first: shape ``(rows,)`` (zeros for an empty shard)."""
        return tensor.flatten(1).sum(dim=1)

    def row_sum_sq(self, tensor: torch.Tensor, view: ParamView) -> torch.Tensor:
        """Sums of squares over every dimension but the first: shape ``(rows,)``."""
        return tensor.flatten(1).square().sum(dim=1)

    def col_sum(self, matrix: torch.Tensor, view: ParamView) -> torch.Tensor:
        """Sums over the first dimension of a 2-D view: shape ``(cols,)``."""
        return matrix.sum(dim=0)

    def any_nonfinite(self, tensors: list[torch.Tensor], views: list[ParamView]) -> torch.Tensor:
        """A 0-d bool tensor: True when some element of some tensor is NaN or infinite. Computed
        from each tensor's extremes (NaN propagates through both), so no full-size temporary is
        made: on CPU ``torch.aminmax`` of each tensor, one vectorized pass (torch's CPU
        infinity-norm kernel, ``_foreach_norm(inf)``, took 16x as long on a (16000, 768) fp32
        gradient, 34 ms against 2 ms on one AMD EPYC core: more than the whole compiled 8-bit
        step, whose default ``skip_nonfinite`` runs this every step); elsewhere, with
        ``foreach``, the infinity norms of the list in one launch."""
        tensors = [t for t in tensors if t.numel()]  # the extremes of an empty tensor are an error
        if not tensors:
            return torch.tensor(False)
        if self.foreach and tensors[0].device.type != "cpu":
            extremes = torch._foreach_norm(tensors, float("inf"))
        else:
            extremes = [x for t in tensors for x in torch.aminmax(t)]
        # finiteness in each tensor's own dtype (a finite fp64 value past 3.4e38 is no overflow):
        # one check per dtype and device, not per tensor (224 LoRA tensors: 5-6.5 -> 3.3 ms)
        alike: dict = {}
        for m in extremes:
            alike.setdefault((m.dtype, m.device), []).append(m)
        finite = [torch.stack(ms).isfinite().all().to(extremes[0].device) for ms in alike.values()]
        return ~(finite[0] if len(finite) == 1 else torch.stack(finite).all())

    # the list forms: a sharding backend combines the statistics of all the tensors in one
    # collective, so code that needs a statistic of many tensors (codecs) should call these
    def row_sums(self, tensors: list[torch.Tensor], views: list[ParamView], square: bool = False) -> list:
        """:meth:`row_sum` (``square=True``: :meth:`row_sum_sq`) of each tensor."""
        fn = self.row_sum_sq if square else self.row_sum
        return [fn(t, v) for t, v in zip(tensors, views)]

    def col_sums(self, matrices: list[torch.Tensor], views: list[ParamView]) -> list:
        """:meth:`col_sum` of each matrix."""
        return [self.col_sum(m, v) for m, v in zip(matrices, views)]

    def block_absmax(self, tensors: list[torch.Tensor], views: list[ParamView], block: int) -> list[torch.Tensor]:
        """Max of ``|x|`` over each block of the 8-bit state layout (see
        :func:`block_layout`): ``block`` consecutive elements of a row of the 2-D view
        ``(shape[0], prod(shape[1:]))`` for tensors of two or more dimensions (a block never
        crosses a row, a row's last block may be shorter), ``block`` consecutive elements of the
        vector for 0-/1-D tensors. Returns, per tensor, a 1-D tensor of the maxima of the blocks
        the local tensor holds, in order (row by row). A shard of whole rows holds whole blocks of
        a 2+-D tensor; a sharding backend completes blocks cut by a process boundary."""
        out = []
        for t, v in zip(tensors, views):
            if ends_in_short_block(v, block):
                # the whole blocks and the short ones reduced apart, without the zero padding
                # inductor 2.13 miscompiles when fused
                head, tail = split_lines(t.abs(), v, block)
                parts = [tail.amax(dim=1, keepdim=True)]
                if head is not None:
                    parts.insert(0, head.amax(dim=2))
                out.append(torch.cat(parts, dim=1).reshape(-1))
                continue
            blocks = blocked(t, v, block)
            if blocks.numel() == 0:
                out.append(blocks.new_zeros(blocks.shape[0]))
                continue
            out.append(blocks.abs().amax(dim=1))
        return out

    def dim_absmax(self, tensors: list[torch.Tensor], views: list[ParamView]) -> list[list[torch.Tensor]]:
        """Per-dimension maxima of ``|x|`` of tensors of two or more dimensions (the rank-1
        normalization of 4-bit second moments, arXiv 2309.01507; SM3's cover, arXiv 1901.11150,
        of its non-negative accumulators): for a tensor of ``d``
        dimensions, ``d`` vectors, the ``k``-th the max over every dimension but ``k`` (of the
        local rows for ``k = 0``, of the whole tensor for the others). A sharding backend
        completes rows cut by a process boundary and the other dimensions with one MAX
        all-reduce for the whole list."""
        return [local_dim_absmax(t, v) for t, v in zip(tensors, views)]


def local_dim_absmax(t: torch.Tensor, view: ParamView) -> list[torch.Tensor]:
    """:meth:`LocalStats.dim_absmax` of one local tensor (zeros along an empty dimension)."""
    if len(view.global_shape) < 2:
        raise ValueError(
            f"per-dimension maxima are kept for tensors of two or more dimensions, not of shape "
            f"{tuple(view.global_shape)}"
        )
    x = t.abs()
    if x.numel() == 0:
        return [x.new_zeros(size) for size in x.shape]
    return [x.amax(dim=[d for d in range(x.dim()) if d != k]) for k in range(x.dim())]


def ends_in_short_block(view: ParamView, block: int) -> bool:
    """Whether the local lines of ``view`` (see :func:`block_layout`) start on a block boundary
    and end in a block shorter than ``block`` (rows of 300 elements, a vector of 3000)."""
    lines, length, lead = block_layout(view, block)
    return lead == 0 and length % block != 0 and lines * length > 0


def split_lines(x: torch.Tensor, view: ParamView, block: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The lines of the local tensor ``x`` of a view that :func:`ends_in_short_block`, cut into
    their whole blocks, ``(lines, whole, block)`` (``None`` when a line is shorter than one
    block), and their short last blocks, ``(lines, rest)``: two parts that broadcast against
    per-block values without zero padding or per-element index arithmetic."""
    lines, length, _ = block_layout(view, block)
    whole = length // block
    x = x.reshape(lines, length)
    tail = x[:, whole * block :]
    return (x[:, : whole * block].reshape(lines, whole, block) if whole else None), tail


def block_layout(view: ParamView, block: int) -> tuple[int, int, int]:
    """How the local tensor of ``view`` is cut into blocks of ``block`` elements:
    ``(lines, line_len, lead)``. The local tensor is ``lines`` lines of ``line_len`` elements (the
    rows of the 2-D view for 2+-D tensors; one line, the vector, for 0-/1-D tensors); each line
    is cut into ``ceil((lead + line_len) / block)`` blocks, where ``lead`` elements before the
    line's first element belong to its first block (non-zero only for a 0-/1-D shard that
    starts inside a block)."""
    if len(view.global_shape) >= 2:
        return view.rows, view.row_len, 0
    length = view.rows  # a 0-d tensor: 1, or 0 where another process holds it
    return 1, length, view.row_start % block if length else 0


def blocked(t: torch.Tensor, view: ParamView, block: int) -> torch.Tensor:
    """``t`` (the local tensor of ``view``) as a ``(blocks, block)`` matrix per
    :func:`block_layout`, padded with zeros where a block extends past its line (a view of ``t``
    when no padding is needed)."""
    lines, length, lead = block_layout(view, block)
    per_line = -(-(lead + length) // block)
    x = t.reshape(lines, length)
    pad = per_line * block - length - lead
    if lead or pad:
        x = torch.nn.functional.pad(x, (lead, pad))
    return x.reshape(lines * per_line, block)


def unblocked(x: torch.Tensor, view: ParamView, block: int) -> torch.Tensor:
    """Inverse of :func:`blocked`: the ``(blocks, block)`` matrix back in the local shape."""
    lines, length, lead = block_layout(view, block)
    per_line = -(-(lead + length) // block)
    x = x.reshape(lines, per_line * block)
    if lead or per_line * block != length:
        x = x[:, lead : lead + length]
    return x.reshape(view.local_shape)


class PieceStats(LocalStats):
    """Statistics for row pieces: of tensors held whole (the engine's ``chunk_bytes``), or the
    shards of whole rows and whole blocks that the compiled path steps alone
    (:func:`hfoptim.core.compiled_step.shard_local`). Per-row and per-block statistics of a piece are
    those of its rows in the whole tensor, so they are allowed; a statistic of the whole tensor
    (a norm, a sum, column sums, the 4-bit per-dimension maxima) is not in a piece, and asking
    for one is an error (only rules, modifiers and storage forms that need none are stepped in
    pieces)."""

    def _whole(self, *args, **kwargs):
        raise RuntimeError(
            "hfoptim internal error: a statistic of the whole tensor was asked for a row piece; the rule "
            "or a modifier needs whole-tensor statistics and must not be marked elementwise/row_local"
        )

    sum_sq = norm = sum = col_sum = dim_absmax = _whole


class ShardPieceStats(PieceStats):
    """Statistics for the compiled kernel of a shard (:func:`hfoptim.core.compiled_step.shard_local`):
    those of :class:`PieceStats`, and column sums of the shard's own rows -- this process's part
    of the column sums of the whole tensor, which the storage form leaves in a stored tensor
    (:meth:`~hfoptim.state.codec.Codec.shard_sums`) and the compiled path completes with one
    all-reduce after the bucket's kernels."""

    col_sum = LocalStats.col_sum  # this process's part: the sums over the shard's own rows


#: how the processes combine a partial statistic of :class:`StagedStats`
SUM, MAX = "sum", "max"


class StagedStats(ShardPieceStats):
    """Statistics for the compiled kernel of a shard whose step needs statistics of the whole
    tensor that are sums or maxima over its elements (the 4-bit second moment's column maxima;
    :func:`hfoptim.core.compiled_step.shard_staged`). A kernel cannot wait for a collective, so
    the step runs in stages: each request of such a statistic (:meth:`sum_sq`, :meth:`norm`,
    :meth:`sum`, :meth:`dim_absmax`, in the order the step makes them) is answered from
    ``known``, the requests' values already completed over the processes, in order; a request
    past them is answered with this process's part and recorded in :attr:`partials` with how
    the processes combine it (:data:`SUM` or :data:`MAX`). The compiled path runs a recording
    kernel, which returns the parts and writes nothing, completes the first part with one
    all-reduce for the bucket, and repeats until every request is known; then the kernel that
    writes the step runs with all of them as inputs. A part recorded after the first may depend
    on an answer that was not yet complete, so only the first is kept from each stage: a step
    with ``n`` such requests runs ``n`` recording kernels (inductor keeps of each only what its
    parts need) and one writing kernel. Per-row, per-block and column-sum statistics stay those
    of :class:`ShardPieceStats`."""

    def __init__(self, known: tuple = (), foreach: bool = True):
        super().__init__(foreach=foreach)
        self.known = tuple(known)
        #: the recorded parts, ``(tensor, SUM or MAX)``, in request order
        self.partials: list[tuple[torch.Tensor, str]] = []
        self._requests = 0

    def _answer(self, part: torch.Tensor, combine: str) -> torch.Tensor:
        index = self._requests
        self._requests += 1
        if index < len(self.known):
            return self.known[index]
        self.partials.append((part, combine))
        return part

    def sum_sq(self, tensors, views):
        if not tensors:
            return []
        return list(self._answer(torch.stack([t.square().sum() for t in tensors]), SUM).unbind())

    def norm(self, tensors, views):
        return [s.sqrt() for s in self.sum_sq(tensors, views)]

    def sum(self, tensors, views):
        if not tensors:
            return []
        return list(self._answer(torch.stack([t.sum() for t in tensors]), SUM).unbind())

    def dim_absmax(self, tensors, views):
        """Maxima along dimension 0 from the shard's rows (whole rows: complete here), along the
        other dimensions completed over the processes."""
        out = []
        for t, v in zip(tensors, views):
            maxima = local_dim_absmax(t, v)
            others = self._answer(torch.cat(maxima[1:]), MAX)
            out.append([maxima[0], *others.split([m.numel() for m in maxima[1:]])])
        return out


class StagedPieceStats(PieceStats):
    """The statistics backend of a call that steps the row pieces of ONE parameter in stages:
    a tensor (or a shard of whole rows) larger than the call limit whose step is row-local but
    for maxima or sums of the whole tensor that its storage forms ask for (the 4-bit second
    moment's column maxima: :meth:`~hfoptim.state.codec.Codec.shard_staged`). Each piece's
    kernel runs with :class:`StagedStats` as a staged shard's does; the parts of the pieces are
    combined here (MAX or SUM over the pieces), then over the processes of ``view.group``
    through ``all_reduce`` when the parameter is sharded, and every piece's next kernel gets the
    total (:func:`hfoptim.core.compiled_step.step_staged_pieces`). ``finish`` runs after the last
    piece's writing kernel (it stores the whole-tensor values the pieces kept in copies:
    :meth:`~hfoptim.state.codec.Codec.finish_rows`). ``view`` is the parameter's (or shard's)
    view, whose process group the combined parts are completed over; an empty shard is one
    piece of itself, sending zero parts."""

    def __init__(self, view: ParamView, all_reduce, finish, foreach: bool = True):
        super().__init__(foreach=foreach)
        self.view = view
        #: the layout's ``all_reduce`` (None: a parameter held whole; nothing to complete)
        self.all_reduce = all_reduce
        self.finish = finish
