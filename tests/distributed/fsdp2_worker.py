"""FSDP2 equivalence worker: ``torchrun --nproc_per_node N tests/distributed/fsdp2_worker.py``.

For every case: the model's parameters sharded with ``fully_shard`` (DTensor Shard(0), uneven
splits, a parameter with one row so some processes hold none of it) against a single-process
run of the same optimizer inside the same process, with the same gradients. Half the cases build
the optimizer BEFORE ``fully_shard`` and swap the parameter groups' tensors afterwards, as
accelerate does (the layout is then chosen lazily at the first step). Loss-driven rules get a
different loss on every process whose mean is the reference loss.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hfoptim  # noqa: E402
from tests.distributed import common  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    Model,
    all_cases,
    case_kwargs,
    check_compiled,
    check_whole_matrices,
    compare,
    compare_state,
    finish,
    fully_shard,
    gradients,
    grouped,
    kernel_calls,
    kernel_shapes,
    needs_loss,
    rank_loss,
    run_cases,
    setup_threads,
    staged_calls,
    step_loss,
)


def sharded_grad(p: DTensor, g: torch.Tensor) -> DTensor:
    """The DTensor gradient whose global value is ``g``, laid out like ``p``."""
    shape, offset = compute_local_shape_and_global_offset(g.shape, p.device_mesh, p.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    local = g[index].clone() if g.dim() else g.clone()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=g.shape, stride=g.stride())


def shard(model: Model) -> None:
    for part in model.parts.values():
        fully_shard(part)
    fully_shard(model)


def run_case(
    name: str,
    failures: list,
    detail: dict,
    *,
    steps: int,
    dtype,
    build_before: bool,
    compile: str | None = None,
    chunk_bytes: int | None = None,
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = case_kwargs(name)
    if compile is not None:
        kwargs["compile"] = compile
    if chunk_bytes is not None:
        kwargs["chunk_bytes"] = chunk_bytes
    ref_model = Model(dtype=dtype)
    ref_params = [p for _, p in ref_model.named_leaves()]
    two = build_before  # half the cases: the Trainer's two groups (no decay on vectors)
    ref_opt = hfoptim.create_optimizer(grouped(ref_params, two), name, **kwargs)

    model = Model(dtype=dtype)
    if build_before:  # accelerate's order: optimizer first, then the parameters are swapped
        opt = hfoptim.create_optimizer(grouped([p for _, p in model.named_leaves()], two), name, **kwargs)
        before = {id(p): n for n, p in model.named_leaves()}
        shard(model)
        after = dict(model.named_leaves())
        for group in opt.param_groups:
            group["params"] = [after[before[id(p)]] for p in group["params"]]
    else:
        shard(model)
        opt = hfoptim.create_optimizer(grouped([p for _, p in model.named_leaves()], two), name, **kwargs)
    params = [p for _, p in model.named_leaves()]
    if not all(isinstance(p, DTensor) for p in params):
        failures.append("fully_shard did not produce DTensor parameters: the run would prove nothing")
        return
    loss_driven = needs_loss(ref_opt)
    sharded_calls, shapes = 0, set()
    staged_before = staged_calls()
    pieces_before = common.shard_pieces()
    for t in range(1, steps + 1):
        grads = gradients(ref_params, t)
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        for p, g in zip(params, grads):
            p.grad = sharded_grad(p, g)
        ref_opt.step(loss=step_loss(t) if loss_driven else None)
        before, shapes_before = kernel_calls(), kernel_shapes()
        opt.step(loss=rank_loss(t, rank, world) if loss_driven else None)
        sharded_calls += kernel_calls() - before
        shapes |= {shape for shape, n in kernel_shapes().items() if n > shapes_before.get(shape, 0)}
    if compile in ("on", "auto"):
        staged = tuple(n - b for n, b in zip(staged_calls(), staged_before))
        check_compiled(sharded_calls, failures, detail, shapes, staged=staged)
    common.count_shard_pieces(pieces_before, detail)
    engine = getattr(opt, "optimizer", opt)
    layout = engine.layout
    if type(layout).__name__ != "DTensorLayout":
        failures.append(f"the optimizer stepped with {type(layout).__name__}, not the FSDP2 layout")
    detail["collectives"] = layout.stats.collectives
    check_whole_matrices(engine, failures, detail)
    detail["bytes"] = layout.stats.bytes_reduced
    for (pname, p), ref_p in zip(model.named_leaves(), ref_params):
        compare(f"param {pname}", p.full_tensor().detach(), ref_p.detach(), dtype, failures, detail)
        view = layout.view(p)
        compare_state(f"{pname}", engine.state[p], ref_opt.state[ref_p], view, dtype, failures, detail)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="fast", help="fast | forms | all | a shell pattern")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", default=None, help="the compile option of every case (on: must engage)")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="the chunk_bytes option of every case")
    parser.add_argument("--shapes", default="default", help="default | rows | square | many (see common.use_shapes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_threads()
    common.use_shapes(args.shapes)
    if args.compile is not None:  # compiling a kernel per shape inside the worker takes minutes under load
        common.CASE_TIMEOUT = 480
    dist.init_process_group("gloo")
    dtype = getattr(torch, args.dtype)
    cases = all_cases(args.cases)
    counter = iter(range(10**6))

    def one(name, failures, detail):
        before = next(counter) % 2 == 1
        detail["built_before_sharding"] = before
        run_case(
            name,
            failures,
            detail,
            steps=args.steps,
            dtype=dtype,
            build_before=before,
            compile=args.compile,
            chunk_bytes=args.chunk_bytes,
        )

    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
