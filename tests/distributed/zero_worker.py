"""DeepSpeed ZeRO equivalence worker (``DS_ACCELERATOR=cpu``, gloo):
``torchrun --nproc_per_node N tests/distributed/zero_worker.py --stage S`` (or ``deepspeed``).

For every case: ``deepspeed.initialize`` with the hfoptim optimizer as client optimizer (fp32,
``gradient_clipping`` 0 set explicitly), real forward/backward through DeepSpeed delivering
chosen gradients (exact: on a coarse grid, only process 0 contributes ``world * g``), against a
single-process run of the same optimizer inside the same process. Checks that DeepSpeed's ZeRO
optimizer wraps ours, that param_groups hold flat partitions, that the ZeRO layout stepped,
then compares parameters (gathered under ZeRO-3) and every segment's state.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import deepspeed  # noqa: E402

import hfoptim  # noqa: E402
from hfoptim.integrations.deepspeed import attach  # noqa: E402
from tests.distributed import common  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    Model,
    all_cases,
    case_kwargs,
    check_compiled,
    check_whole_matrices,
    coarse,
    compare,
    compare_state,
    finish,
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


def ds_config(
    stage: int, *, round_robin: bool, sub_group_size: int | None, offload: bool, bf16: bool = False, two_groups=False
) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 2000, "allgather_bucket_size": 2000}
    if stage in (1, 2):
        zero["round_robin_gradients"] = round_robin
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_prefetch_bucket_size"] = 0
        if sub_group_size:
            zero["sub_group_size"] = sub_group_size
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    extra = {}
    if bf16:  # bf16 parameters, fp32 master weights and gradient accumulation (stage 1: BF16_Optimizer)
        extra = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def run_case(
    name, failures, detail, *, stage, steps, variant, explicit_attach: bool, compile=None, chunk_bytes=None
) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = case_kwargs(name)
    if compile is not None:
        kwargs["compile"] = compile
    if chunk_bytes is not None:
        kwargs["chunk_bytes"] = chunk_bytes
    dtype = torch.float32
    bf16 = variant.get("bf16", False)
    ref_model = Model(dtype=dtype)
    model = Model(dtype=torch.bfloat16 if bf16 else dtype)
    if bf16:  # the reference starts from the same (bf16) values, in fp32 like DeepSpeed's master weights
        with torch.no_grad():
            for (_, r), (_, p) in zip(ref_model.named_leaves(), model.named_leaves()):
                r.copy_(p.float())
    ref_params = [p for _, p in ref_model.named_leaves()]
    two = variant.get("two_groups", False)
    ref_opt = hfoptim.create_optimizer(grouped(ref_params, two), name, **kwargs)

    names = {id(p): n for n, p in model.named_leaves()}
    opt = hfoptim.create_optimizer(grouped([p for _, p in model.named_leaves()], two), name, **kwargs)
    config = ds_config(stage, **variant)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    zero = ds_engine.optimizer
    expected = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}[stage]
    if bf16 and stage == 1:
        expected = "BF16_Optimizer"
    if type(zero).__name__ != expected:
        failures.append(f"DeepSpeed wrapped the optimizer in {type(zero).__name__}, not {expected}")
        return
    engine = attach(ds_engine) if explicit_attach else hfoptim.integrations.deepspeed.hfoptim_engine(zero.optimizer)
    loss_driven = needs_loss(ref_opt)
    sharded_calls, shapes = 0, set()
    staged_before = staged_calls()
    pieces_before = common.shard_pieces()
    order = common.KernelOrder(engine)
    for t in range(1, steps + 1):
        grads = coarse(gradients(ref_params, t), bits=4 if bf16 else 10)
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        scale = float(world) if rank == 0 else 0.0
        loss = ds_engine([g.to(model.parts["emb"].weight.dtype) for g in grads], scale)
        ds_engine.backward(loss)
        if loss_driven:
            engine.set_loss(rank_loss(t, rank, world))
            ref_opt.step(loss=step_loss(t))
        else:
            ref_opt.step()
        before, shapes_before = kernel_calls(), kernel_shapes()
        with order:
            ds_engine.step()
        order.end_step()
        sharded_calls += kernel_calls() - before
        shapes |= {shape for shape, n in kernel_shapes().items() if n > shapes_before.get(shape, 0)}
    if compile in ("on", "auto"):
        staged = tuple(n - b for n, b in zip(staged_calls(), staged_before))
        check_compiled(sharded_calls, failures, detail, shapes, staged=staged)
    common.count_shard_pieces(pieces_before, detail)
    order.record(detail)
    layout = engine.layout
    if type(layout).__name__ != "ZeroLayout":
        failures.append(f"the optimizer stepped with {type(layout).__name__}, not the ZeRO layout")
        return
    flats = [p for fg in layout.flat_groups.values() for p in [fg.flat]]
    if any(p is q for p in flats for q in (p for _, p in model.named_leaves())):
        failures.append("param_groups hold model parameters, not flat partitions")
    detail["collectives"] = layout.stats.collectives
    check_whole_matrices(engine, failures, detail)
    detail["bytes"] = layout.stats.bytes_reduced
    leaves = [p for _, p in model.named_leaves()]
    if bf16:
        full = None  # the bf16 model copies are rounded: compare DeepSpeed's fp32 master segments below
    elif stage == 3:
        with deepspeed.zero.GatheredParameters(leaves):
            full = [p.detach().clone() for p in leaves]
    else:
        full = [p.detach().clone() for p in leaves]
    ref_by_name = dict(zip((n for n, _ in ref_model.named_leaves()), ref_params))
    for (pname, _), got, want in zip(model.named_leaves(), full or [], ref_params):
        compare(f"param {pname}", got, want.detach(), dtype, failures, detail)
    for fg in layout.flat_groups.values():
        segments = engine.state[fg.flat].get("segments", {})
        for piece in layout.pieces(fg.flat):
            p = fg.params[piece.segment.index]
            pname = names[id(p)]
            if bf16:  # the fp32 master weights this process owns
                a, b = piece.view.valid_range
                want = ref_by_name[pname].detach().reshape(-1)[piece.view.offset + a : piece.view.offset + b]
                with torch.no_grad():
                    piece.refresh()
                    got = piece.param.detach().reshape(-1)[a:b].clone()
                compare(f"master {pname}", got, want, dtype, failures, detail)
            compare_state(
                f"{pname}",
                segments.get(piece.segment.index, {}),
                ref_opt.state[ref_by_name[pname]],
                piece.view,
                dtype,
                failures,
                detail,
            )
    ds_engine.destroy()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--cases", default="fast")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 parameters, fp32 master weights")
    parser.add_argument("--compile", default=None, help="the compile option of every case (on: must engage)")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="the chunk_bytes option of every case")
    parser.add_argument("--shapes", default="default", help="default | rows | square | many (see common.use_shapes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_threads()
    common.use_shapes(args.shapes)
    if args.compile is not None:  # compiling a kernel per shape inside the worker takes minutes under load
        common.CASE_TIMEOUT = 480
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    cases = all_cases(args.cases)
    counter = iter(range(10**6))

    def one(name, failures, detail):
        k = next(counter)
        # stable weight decay averages over every parameter in one step() call: DeepSpeed must
        # hand over one flat partition (one group, one ZeRO-3 sub-group); more are refused
        whole = hfoptim.get_optimizer(name).options.get("weight_decay_mode") == "stable"
        variant = {
            "round_robin": k % 2 == 1,
            "sub_group_size": 3000 if k % 2 == 0 and not whole else None,
            "offload": args.offload,
            "bf16": args.bf16,
            "two_groups": k % 4 in (1, 2) and not whole,
        }
        detail.update(variant)
        run_case(
            name,
            failures,
            detail,
            stage=args.stage,
            steps=args.steps,
            variant=variant,
            explicit_attach=k % 3 != 2,
            compile=args.compile,
            chunk_bytes=args.chunk_bytes,
        )

    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
