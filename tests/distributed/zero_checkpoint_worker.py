"""DeepSpeed ZeRO checkpoint worker: ``--phase save`` runs ``--steps1`` steps and saves with
``engine.save_checkpoint``; ``--phase load`` builds a FRESH model (other values) and optimizer,
``engine.load_checkpoint``, runs ``--steps2`` more steps, and compares parameters and every
segment's state with an uninterrupted single-process run. Same number of processes for both.
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
from hfoptim.state import convert as hfoptim_convert  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    Model,
    all_cases,
    case_kwargs,
    coarse,
    compare,
    compare_state,
    finish,
    gradients,
    needs_loss,
    rank_loss,
    run_cases,
    setup_threads,
    step_loss,
)
from tests.distributed.zero_worker import ds_config  # noqa: E402
from tests.harness import interleaved  # noqa: E402


def ref_step(ref_params, ref_opt, t):
    grads = coarse(gradients(ref_params, t))
    for p, g in zip(ref_params, grads):
        p.grad = g.clone()
    ref_opt.step(loss=step_loss(t)) if needs_loss(ref_opt) else ref_opt.step()
    return grads


def as_format1(engine) -> None:
    """The engine's state rewritten in place as hfoptim's state format 1 held it: every packed
    4-bit segment interleaved; its next ``state_dict()`` says format 1."""
    for fg in engine.layout.flat_groups.values():
        segments = engine.state[fg.flat].get("segments", {})
        for piece in engine.layout.pieces(fg.flat):
            seg = segments.get(piece.segment.index, {})
            for key in [k for k in seg if k.endswith(".packed")]:
                seg[key] = interleaved(seg[key], piece.view)
    hfoptim_convert.STATE_FORMAT = 1  # this process saves and exits


def run_case(name, failures, detail, *, phase, folder, stage, steps1, steps2, format1=False) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = case_kwargs(name)
    ref_model = Model()
    ref_params = [p for _, p in ref_model.named_leaves()]
    ref_opt = hfoptim.create_optimizer(ref_params, name, **kwargs)
    model = Model(seed=0 if phase == "save" else 123)
    names = {id(p): n for n, p in model.named_leaves()}
    opt = hfoptim.create_optimizer([p for _, p in model.named_leaves()], name, **kwargs)
    config = ds_config(stage, round_robin=stage != 3, sub_group_size=3000 if stage == 3 else None, offload=False)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine = attach(ds_engine)

    def train(steps):
        for t in steps:
            grads = ref_step(ref_params, ref_opt, t)
            loss = ds_engine(grads, float(world) if rank == 0 else 0.0)
            ds_engine.backward(loss)
            if needs_loss(ref_opt):
                engine.set_loss(rank_loss(t, rank, world))
            ds_engine.step()

    if phase == "save":
        train(range(1, steps1 + 1))
        if format1:
            as_format1(engine)
        ds_engine.save_checkpoint(folder, tag=name)
        ds_engine.destroy()
        return
    ds_engine.load_checkpoint(folder, tag=name)
    for t in range(1, steps1 + 1):
        ref_step(ref_params, ref_opt, t)
    train(range(steps1 + 1, steps1 + steps2 + 1))
    leaves = [p for _, p in model.named_leaves()]
    if stage == 3:
        with deepspeed.zero.GatheredParameters(leaves):
            full = [p.detach().clone() for p in leaves]
    else:
        full = [p.detach().clone() for p in leaves]
    ref_by_name = dict(zip((n for n, _ in ref_model.named_leaves()), ref_params))
    for (pname, _), got, want in zip(model.named_leaves(), full, ref_params):
        compare(f"param {pname}", got, want.detach(), torch.float32, failures, detail)
    layout = engine.layout
    for fg in layout.flat_groups.values():
        segments = engine.state[fg.flat].get("segments", {})
        for piece in layout.pieces(fg.flat):
            pname = names[id(fg.params[piece.segment.index])]
            compare_state(
                pname,
                segments.get(piece.segment.index, {}),
                ref_opt.state[ref_by_name[pname]],
                piece.view,
                torch.float32,
                failures,
                detail,
            )
    ds_engine.destroy()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("save", "load"), required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--cases", default="fast")
    parser.add_argument("--steps1", type=int, default=3)
    parser.add_argument("--steps2", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--format1", action="store_true")
    args = parser.parse_args()
    setup_threads()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")
    cases = [c for c in all_cases(args.cases) if not c.endswith("lookahead")]

    def one(name, failures, detail):
        run_case(
            name,
            failures,
            detail,
            phase=args.phase,
            folder=args.dir,
            stage=args.stage,
            steps1=args.steps1,
            steps2=args.steps2,
            format1=args.format1,
        )

    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
