"""Shared pieces of the multi-process equivalence workers (run under torchrun / deepspeed).

Every worker runs many optimizer cases in a loop inside ONE process group: for each case it
builds the same small model twice -- sharded, and as plain tensors stepped by a single-process
optimizer inside the same process (the reference) -- feeds both the SAME gradients (computed
from the reference parameters) for a few steps, and compares parameters and state.
"""

from __future__ import annotations

import faulthandler
import fnmatch
import json
import math
import os
import re
import sys
import time
import traceback

import torch
import torch.distributed as dist

import hfoptim
from hfoptim.modifiers import GRAD, MODIFIERS
from hfoptim.registry import bases
from hfoptim.state.codec import CODECS

_cpu_mesh = None


def fully_shard(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.distributed.fsdp.fully_shard`` over a CPU mesh of every process. The workers run
    over gloo on the CPU, also on a machine with a GPU, where FSDP2's default mesh takes the GPU
    (two processes and one GPU: "invalid device ordinal")."""
    global _cpu_mesh
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as shard

    if _cpu_mesh is None:
        _cpu_mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return shard(module, mesh=_cpu_mesh)


#: (name, shape): sizes divide neither by 2 nor by 3 where it matters; "row1" has one row (the
#: other processes hold none of it under FSDP2); "big" is over 4096 elements (8-bit blocks
#: cut by shard boundaries); "conv" is 4-D; "vec" 1-D
SHAPES = [
    ("emb", (11, 7)),
    ("lin_w", (13, 7)),
    ("lin_b", (13,)),
    ("conv", (5, 3, 2, 2)),
    ("big", (67, 97)),
    ("row1", (1, 9)),
    ("vec", (5,)),
]

#: SHAPES with the rows of every matrix split evenly in two, and a vector of two 8-bit blocks per
#: half (``--shapes rows``): 2 processes of FSDP2 or ZeRO-3 hold whole rows and blocks of them,
#: the shards the compiled kernel steps alone; "row1" and "vec" are still cut inside a row/block
ROW_ALIGNED_SHAPES = [
    ("emb", (12, 7)),
    ("lin_w", (14, 7)),
    ("lin_b", (1024,)),
    ("conv", (6, 3, 2, 2)),
    ("big", (68, 97)),
    ("row1", (1, 9)),
    ("vec", (5,)),
]


#: SHAPES with two matrices whose 2- and 3-process row boundaries end rows of SMMF's square matrix
#: (``--shapes square``): "big" (64, 96) is factored as 96x64 (cuts after 32 rows, or 22 and 44,
#: are after matrix rows 48, or 33 and 66), "emb" (96, 80) as 96x80 (a parameter row is a matrix
#: row). Both are over a 2000-element chunk budget, so their shards are stepped in row pieces.
SQUARE_SHAPES = [
    ("big", (64, 96)),
    ("emb", (96, 80)),
    ("lin_w", (13, 7)),
    ("lin_b", (13,)),
    ("conv", (5, 3, 2, 2)),
    ("row1", (1, 9)),
    ("vec", (5,)),
]


#: SHAPES and 32 matrices of one small shape (``--shapes many``), as LoRA adapters come: under
#: 65536 elements each, so ``compile="auto"`` compiles them only as a shape its group has 32 of
#: (hfoptim.core.compiled_step.AUTO_MIN_SHAPE_COUNT); 16 rows of 256: whole rows and 8-bit
#: blocks on each of 2 FSDP2 processes
MANY_SHAPES = SHAPES + [(f"lora{i}", (16, 256)) for i in range(32)]


def use_shapes(which: str) -> None:
    """Make :class:`Model` build ``which`` shapes: "default" (SHAPES as defined), "rows"
    (:data:`ROW_ALIGNED_SHAPES`), "square" (:data:`SQUARE_SHAPES`) or "many"
    (:data:`MANY_SHAPES`); called once, before any model is built."""
    if which == "rows":
        SHAPES[:] = ROW_ALIGNED_SHAPES
    elif which == "square":
        SHAPES[:] = SQUARE_SHAPES
    elif which == "many":
        SHAPES[:] = MANY_SHAPES
    elif which != "default":
        raise ValueError(f"unknown --shapes {which!r}: default, rows, square or many")


def shard_pieces() -> tuple[int, ...]:
    """Row pieces of shards, shards stepped as one piece of themselves, row pieces of uncut
    parameters stepped by the process holding them, and the units of uncut parameters stepped
    here as held whole and skipped here (hfoptim.core.uncut), that this process's steps planned
    so far (every optimizer)."""
    from hfoptim.core import chunking, uncut

    planned, stepped = chunking.planned, uncut.stepped
    return planned["shard"], planned["shard_whole"], planned["uncut"], stepped["owned"], stepped["elsewhere"]


def count_shard_pieces(before: tuple[int, ...], detail: dict) -> None:
    """Record the counts of :func:`shard_pieces` since the reading ``before``, summed over the
    processes. Collective: every process calls it in every case."""
    total = torch.tensor([float(now - then) for now, then in zip(shard_pieces(), before)])
    dist.all_reduce(total)
    keys = ("shard_pieces", "shards_as_one_piece", "uncut_pieces", "uncut_owned", "uncut_elsewhere")
    detail.update({f"{key}_all_ranks": int(n) for key, n in zip(keys, total)})


#: the fast subset (always run): every storage form and modifier on AdamW, the loss-driven
#: rule, the factored rule, LAMB (trust ratio)
FAST_PATTERNS = ["adamw", "adamw_*", "adalo", "adafactor", "lamb", "smmf", "sm3", "sgdm_am"]


class Leaf(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.weight * g).sum()


class Model(torch.nn.Module):
    """Parameters of SHAPES as leaves of submodules (so FSDP2 / ZeRO-3 handle submodules).

    ``model(grads, scale)`` is ``scale * sum_i <p_i, g_i>``: its gradient is exactly
    ``scale * g_i``, so a backward pass through DeepSpeed delivers chosen gradients."""

    def __init__(self, seed: int = 0, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.parts = torch.nn.ModuleDict()
        for name, shape in SHAPES:
            self.parts[name] = Leaf(torch.randn(shape, generator=gen, dtype=dtype) * 0.5)

    def named_leaves(self):
        return [(name, self.parts[name].weight) for name, _ in SHAPES]

    def forward(self, grads: list[torch.Tensor], scale: float) -> torch.Tensor:
        return scale * sum(self.parts[name](g) for (name, _), g in zip(SHAPES, grads))


def all_cases(scope: str) -> list[str]:
    """Every registered base name with every storage form (and, for "all" and patterns, every
    single-suffix name hfoptim lists); "fast": the FAST_PATTERNS subset; else shell patterns,
    comma-separated. A suffix ":k/n" keeps every n-th case from the k-th (1-based), to spread
    one long scope over several launches."""
    scope, _, part = scope.partition(":")
    names = set()
    for base in bases():
        for form in CODECS:
            name = base if form == "fp32" else f"{base}_{form}"
            try:
                hfoptim.get_optimizer(name)
            except ValueError:
                continue
            names.add(name)
    if scope not in ("fast", "forms"):  # "all", or a pattern over every listed name too
        names.update(n for n in hfoptim.list_optimizers() if not n.endswith("lookahead") or scope == "all")
    out = sorted(names)
    if scope == "fast":
        listed = set(hfoptim.list_optimizers()) | names
        out = sorted(n for n in listed if any(fnmatch.fnmatch(n, p) for p in FAST_PATTERNS))
        out = [n for n in out if not n.endswith("lookahead")]
    elif scope not in ("all", "forms"):
        # comma-separated shell patterns, over every listed name too (modifier suffixes: "*_spectralcap")
        listed = set(hfoptim.list_optimizers()) | names
        out = sorted(n for n in listed if any(fnmatch.fnmatch(n, p) for p in scope.split(",")))
    if part:
        k, n = (int(x) for x in part.split("/"))
        out = out[k - 1 :: n]
    return out


def case_kwargs(name: str) -> dict:
    """Non-default options: weight decay on, every tensor in the requested storage form."""
    spec = hfoptim.get_optimizer(name)
    options = {"state_min_numel": 0}
    if "weight_decay" in spec.rule.hyperparams:
        options["weight_decay"] = 0.05
    if spec.options.get("spectral_cap") is not None:
        # issue 16: a tau small enough that the cap fires at the default lr (step/matrix sigma1 ~ 2e-3
        # here), so the sharded power iteration decides the step, not only its no-op branch
        options["spectral_cap"] = 1e-3
    if spec.rule.name == "adagl":
        # issue 16: the per-tensor mean of |g_t - g_(t-1)| is a statistic (elementwise is shard-safe)
        options.update(step_control="mean", history=4, alpha=0.6)
    if spec.options.get("weight_decay_mode") == "cpr":  # a bound from step 1 that binds at once
        options.update(cpr_kappa_init="dependent", cpr_kappa=0.9)
    if spec.options.get("norm_loss"):  # a pull large enough to be seen in a few steps
        options["norm_loss"] = 0.1
    pre_ns = [m for m in MODIFIERS if m.stage == GRAD and m.switch in spec.options and m.enabled(spec.options)]
    if spec.rule.name == "muon" and pre_ns:
        # a gradient statistic before Newton-Schulz (a norm, row sums) differs from one process's in
        # its last fp32 bit (the order of the sum); bf16 Newton-Schulz turns that into a bf16 ulp
        # (2**-8) where a value sits on a rounding boundary: compare the fp32 iteration
        options["ns_dtype"] = "fp32"
    return options


def grouped(params: list[torch.Tensor], two: bool):
    """The parameters as the HuggingFace Trainer groups them when ``two``: matrices with weight
    decay, vectors without (DeepSpeed flattens each group on its own)."""
    if not two:
        return params
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Deterministic gradients depending on the (reference) parameters."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [0.3 * p.detach() + torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def coarse(grads: list[torch.Tensor], bits: int = 10) -> list[torch.Tensor]:
    """Gradients on a 2**-bits grid (|g| < 2**8; 4 bits and |g| < 8 for bf16 gradients): a sum of
    up to 4 copies and the division by the process count are exact, so data-parallel averaging
    returns them unchanged."""
    limit = 200.0 if bits > 4 else 7.0
    return [torch.round(g.clamp(-limit, limit) * 2**bits) / 2**bits for g in grads]


def step_loss(step: int) -> float:
    return 2.0 / (1.0 + 0.1 * step)


def rank_loss(step: int, rank: int, world: int) -> float:
    """A different loss on every process whose mean over processes is step_loss(step)."""
    return step_loss(step) + 0.25 * (rank - (world - 1) / 2)


def needs_loss(opt) -> bool:
    inner = getattr(opt, "optimizer", opt)
    return bool(getattr(getattr(inner, "rule", None), "needs_loss", False))


def tolerances(dtype) -> dict:
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 2e-5, "atol": 2e-6}


def compare(what: str, got: torch.Tensor, want: torch.Tensor, dtype, failures: list, detail: dict) -> None:
    """Exact for integer (8-bit codes, sign bits), float rounding for floats."""
    if got.shape != want.shape:
        failures.append(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if not got.is_floating_point():
        mismatch = int((got != want).sum())
        if mismatch:
            failures.append(f"{what}: {mismatch}/{got.numel()} codes differ")
        return
    got, want = got.double(), want.double()
    if not bool(torch.isfinite(want).all()):
        failures.append(f"{what}: {NONFINITE} (an optimizer bug, not sharding)")
        return
    if got.numel():
        err = float(((got - want).abs() / (want.abs() + 1e-3)).max())
        detail["max_rel_err"] = max(detail.get("max_rel_err", 0.0), err)
    try:
        torch.testing.assert_close(got, want, **tolerances(dtype))
    except AssertionError as error:
        failures.append(f"{what}: {str(error).splitlines()[0]} {str(error).splitlines()[-3:]}")


def compare_state(what, local_state: dict, ref_state: dict, view, dtype, failures, detail) -> None:
    """Compare the state of one shard with the reference state of the whole parameter.

    Stored tensors whose dim 0 follows the parameter's rows are compared on this process's
    rows; flat per-element tensors on this process's flat range; same-shaped tensors
    (column factors, scalars) whole. Anything else is counted in ``detail['uncompared']``."""
    a, b = view.valid_range
    rows = slice(view.row_start, view.row_start + view.rows)
    for key, want in ref_state.items():
        if not isinstance(want, torch.Tensor):
            continue
        got = local_state.get(key)
        if got is None:
            failures.append(f"{what}: state {key!r} missing (has {sorted(local_state)})")
            continue
        if key == "step":
            compare(f"{what} state step", got, want, dtype, failures, detail)
            continue
        if key.endswith(".sign") and want.dtype == torch.uint8:  # packed sign bits (SMMF): per element
            from hfoptim.state.smmf import unpack_bits

            w = unpack_bits(want, view.global_numel)[view.offset + a : view.offset + b]
            compare(f"{what} state {key!r}", unpack_bits(got, view.local_numel)[a:b], w, dtype, failures, detail)
            continue
        if key.endswith(".packed"):  # 4-bit codes, two per byte: per element
            from hfoptim.core.stats import ParamView
            from hfoptim.state.fourbit import unpack

            w = unpack(want, ParamView(view.global_shape)).reshape(-1)[view.offset + a : view.offset + b]
            g = unpack(got, view).reshape(-1)[a:b]
            compare(f"{what} state {key!r}", g, w, dtype, failures, detail)
            continue
        if re.fullmatch(r".*\.max[1-9][0-9]*", key):  # 4-bit rank-1 maxima along a dim > 0: whole
            compare(f"{what} state {key!r}", got, want, dtype, failures, detail)
            continue
        grows = view.global_rows
        if want.dim() >= 1 and want.shape[0] == grows and got.dim() == want.dim() and got.shape[1:] == want.shape[1:]:
            if got.shape[0] == view.rows:
                w = want[rows]
                if (a, b) == (0, view.local_numel):
                    compare(f"{what} state {key!r}", got, w, dtype, failures, detail)
                elif got.numel() == view.local_numel:  # ZeRO cut rows: the owned elements
                    compare(f"{what} state {key!r}", got.reshape(-1)[a:b], w.reshape(-1)[a:b], dtype, failures, detail)
                else:  # per-row data (8-bit scales, ...) of cut rows: the rows owned whole
                    length = view.row_len
                    i, j = -(-a // length), b // length
                    compare(f"{what} state {key!r}", got[i:j], w[i:j], dtype, failures, detail)
                continue
        if key.endswith(".scale") and len(view.global_shape) <= 1 and want.dim() == 1:
            from hfoptim.state.dynamic_code import BLOCK  # 8-bit scales of a vector: blocks along it
            from hfoptim.state.fourbit import BLOCK4

            block = BLOCK4 if key[: -len(".scale")] + ".packed" in ref_state else BLOCK
            first = view.row_start // block
            compare(f"{what} state {key!r}", got, want[first : first + got.numel()], dtype, failures, detail)
            continue
        if want.numel() == view.global_numel and got.numel() == view.local_numel and want.dim() == 1:
            start = view.offset
            compare(f"{what} state {key!r}", got[a:b], want[start + a : start + b], dtype, failures, detail)
            continue
        partner = ref_state.get(key[: -len(".row")] + ".col") if key.endswith(".row") else None
        if partner is not None and want.dim() == 1 and want.numel() * partner.numel() == view.global_numel:
            # row factor of the flattened tensor seen as a (numel/cols, cols) matrix (SMMF)
            from hfoptim.core.stats import flat_matrix_view

            mview = flat_matrix_view(view, partner.numel())
            w = want[mview.row_start : mview.row_start + mview.rows]
            compare(f"{what} state {key!r}", got, w, dtype, failures, detail)
            continue
        if got.shape == want.shape:
            compare(f"{what} state {key!r}", got, want, dtype, failures, detail)
            continue
        detail.setdefault("uncompared", []).append(key)


def check_whole_matrices(engine, failures: list, detail: dict) -> None:
    """For a rule that maps whole matrices (Muon's orthogonalization): over all processes, every
    matrix of every call was mapped exactly once (on one owner), and rows really crossed
    processes (the sharded exchange engaged). The matrices of shards are listed alike on every
    process (``matrix_runs``: 1 where this process ran the map); a matrix one process holds whole
    (no boundary cuts it: hfoptim.core.uncut) is mapped there alone (``held_matrix_runs``).
    Collective: every process calls it in every case."""
    stats = engine.layout.stats
    runs = torch.tensor([x for call in stats.matrix_runs for x in call] or [0], dtype=torch.long)
    length = torch.tensor([runs.numel()], dtype=torch.long)
    longest = length.clone()
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    held = torch.tensor([getattr(stats, "held_matrix_runs", 0)], dtype=torch.long)
    dist.all_reduce(held)
    same_length = int(longest) == int(length)
    agreed = torch.tensor([int(same_length)], dtype=torch.long)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if not int(agreed):
        failures.append(f"processes listed different numbers of shared matrices ({int(length)} here, {int(longest)})")
        return
    total = runs.clone()
    dist.all_reduce(total)
    sent = torch.tensor([float(getattr(stats, "bytes_sent", 0))])
    dist.all_reduce(sent)
    if not stats.matrix_runs and not int(held):
        return
    detail["matrices_mapped"] = (int(runs.numel()) if stats.matrix_runs else 0) + int(held)
    detail["held_matrices_mapped"] = int(held)
    detail["bytes_sent_all_ranks"] = int(sent)
    if stats.matrix_runs and not bool((total == 1).all()):
        failures.append(f"a matrix was orthogonalized {total.tolist()} times over the processes, not once each")
    if engine.rule.name == "muon" and float(sent) <= 0:
        failures.append("no matrix rows crossed processes: the whole-matrix exchange did not engage")


class KernelOrder:
    """Counts the compiled-kernel calls of this process that came before a collective of the
    same step (the layout's statistics' ``collectives`` counter at each call, against the
    counter at the step's end, or where the step copies its uncut parameters' whole-tensor state
    after every kernel: hfoptim.core.uncut.mirror): 0 when every step reaches its plain-path
    collectives before its kernels (:func:`hfoptim.core.chunking.collectives_first`). Wraps the
    kernel runner while active; :meth:`end_step` after each step."""

    def __init__(self, engine):
        self.engine = engine
        self.late = 0
        self._seen: list[int] = []
        self._mirror_at: int | None = None

    def __enter__(self):
        from hfoptim.core import compiled_step, uncut

        self._original = original = compiled_step._run
        self._original_mirror = mirror = uncut.mirror

        def run(*args):
            self._seen.append(self.engine.layout.stats.collectives)
            return original(*args)

        def mirror_after_kernels(*args):
            self._mirror_at = self.engine.layout.stats.collectives
            return mirror(*args)

        compiled_step._run = run
        uncut.mirror = mirror_after_kernels
        return self

    def __exit__(self, *exc):
        from hfoptim.core import compiled_step, uncut

        compiled_step._run = self._original
        uncut.mirror = self._original_mirror

    def end_step(self) -> None:
        end = self.engine.layout.stats.collectives if self._mirror_at is None else self._mirror_at
        self.late += sum(seen < end for seen in self._seen)
        self._seen.clear()
        self._mirror_at = None

    def record(self, detail: dict) -> None:
        """``detail["kernels_before_collectives_all_ranks"]``, summed over the processes
        (collective: every process calls it)."""
        total = torch.tensor([float(self.late)])
        dist.all_reduce(total)
        detail["kernels_before_collectives_all_ranks"] = int(total)


def kernel_calls() -> int:
    """Parameters stepped by the compiled kernel so far in this process (every key)."""
    from hfoptim.core import compiled_step

    return sum(compiled_step.calls.values())


def staged_calls() -> tuple[int, int]:
    """``(parameter steps, recording calls)`` of the staged kernels (shards whose whole-tensor
    statistics were completed between kernels: hfoptim.core.compiled_step.shard_staged) so far
    in this process."""
    from hfoptim.core import compiled_step

    steps = sum(n for key, n in compiled_step.calls.items() if key[-1] is not None)
    return steps, sum(compiled_step.recorded.values())


def kernel_shapes() -> dict:
    """How many times the compiled kernel stepped a tensor of each shape so far in this process."""
    from hfoptim.core import compiled_step

    counts: dict = {}
    for key, n in compiled_step.calls.items():
        counts[tuple(key[1])] = counts.get(tuple(key[1]), 0) + n
    return counts


def check_compiled(
    sharded_calls: int, failures: list, detail: dict, shapes: set | None = None, staged: tuple = (0, 0)
) -> None:
    """Record how many parameter steps of the SHARDED optimizer took the compiled kernel, here
    and summed over the processes (and, given, the ``shapes`` its kernels stepped, over the
    processes, and the ``staged`` counts of :func:`staged_calls`, summed), and fail when none
    did (the run asked for ``compile='on'``, or ``'auto'`` over shapes it compiles, so the
    compiled path must have engaged under the layout)."""
    total = torch.tensor([float(sharded_calls)])
    dist.all_reduce(total)
    detail["compiled_steps"] = sharded_calls
    detail["compiled_steps_all_ranks"] = int(total)
    staged_total = torch.tensor([float(n) for n in staged])
    dist.all_reduce(staged_total)
    detail["staged_steps_all_ranks"], detail["staged_recordings_all_ranks"] = (int(n) for n in staged_total)
    if shapes is not None:
        gathered: list = [None] * dist.get_world_size()
        # (a kernel of any row count has None for the count: sorted by text)
        dist.all_gather_object(gathered, sorted(shapes, key=repr))
        detail["compiled_shapes_all_ranks"] = sorted({tuple(s) for part in gathered for s in part}, key=repr)
    if int(total) == 0:
        failures.append("the compiled path should have engaged, but no parameter of the sharded optimizer took it")


NONFINITE = "the single-process reference itself is not finite"

#: seconds one case may take before the worker dumps its stacks and exits
CASE_TIMEOUT = 120


def run_cases(cases: list[str], run_one, out_path: str | None) -> int:
    """Run every case (collecting failures, never stopping at the first), gather the results on
    rank 0, write them as JSON and return the exit status."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    t0 = time.time()
    for name in cases:
        failures, detail = [], {}
        start = time.time()
        # a case that hangs (collectives out of step) dumps every thread's stack and exits
        faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
        try:
            run_one(name, failures, detail)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # a crash (DCP raises BaseExceptions) is a failure of this case
            failures.append(traceback.format_exc()[-2500:])
            detail["crashed"] = True
            print(f"[rank {rank}] case {name} crashed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            # the other processes may wait in a collective this one will never join: end the
            # launch now (they fail on the lost peer) instead of waiting for the case timeout
            os._exit(3)
        faulthandler.cancel_dump_traceback_later()
        detail["seconds"] = round(time.time() - start, 3)
        results.append({"case": name, "rank": rank, "failures": failures, "detail": detail})
        if detail.get("crashed"):
            break  # collectives may be out of step after a crash: stop here
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    status = 0
    if rank == 0:
        merged = [r for per_rank in gathered for r in per_rank]
        # a case whose single-process reference is not finite proves nothing about sharding (the
        # optimizer itself is broken there, which its own tests must catch): listed apart
        broken = sorted({r["case"] for r in merged if any(NONFINITE in f for f in r["failures"])})
        bad = [r for r in merged if r["failures"] and r["case"] not in broken]
        summary = {
            "world": world,
            "cases": cases,
            "ran": sorted({r["case"] for r in merged}),
            "failures": bad,
            "nonfinite_reference": broken,
            "seconds": round(time.time() - t0, 2),
            "results": merged,
        }
        if out_path:
            with open(out_path, "w") as f:
                json.dump(summary, f, indent=1, default=str)
        for r in bad[:40]:
            print(f"FAIL [{r['case']} rank {r['rank']}]", *r["failures"][:4], sep="\n  ", file=sys.stderr)
        print(f"{len(cases)} cases, {len(bad)} failing (case x rank), {summary['seconds']} s")
        if broken:
            print(f"single-process reference not finite (not a sharding result): {broken}")
        status = 1 if bad or len(summary["ran"]) != len(cases) else 0
    return status


def finish(status: int) -> None:
    """End a worker once its results are written: wait for every rank, then leave through
    ``os._exit``. A normal interpreter exit runs C++ static destructors while gloo / DCP /
    DeepSpeed threads may still be alive, which sometimes aborts ("terminate called without an
    active exception", SIGABRT) after every case passed; the result would then be a failed
    launch that says nothing about the optimizer."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def setup_threads() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def isclose_loss(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12)
