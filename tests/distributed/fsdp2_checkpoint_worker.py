"""FSDP2 checkpoint worker: save with torch.distributed.checkpoint on N processes, load on M.

``--phase save``: for every case, ``--steps1`` steps on the sharded model, then the model and
optimizer state dicts saved with DCP under ``--dir/<case>``.
``--phase load``: a FRESH model (other initial values) and optimizer on this run's processes load
the checkpoint (``hfoptim.distributed.checkpoint.set_state_dict``; DCP reshards) and take
``--steps2`` more steps. Parameters and state must equal an uninterrupted single-process run of
``steps1 + steps2`` steps computed in the same process.
``--format1``: the checkpoint is rewritten as hfoptim's state format 1 held it (4-bit codes
interleaved, ``"format": 1``) before it is saved; the load must upgrade it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hfoptim  # noqa: E402
from hfoptim.core.stats import ParamView  # noqa: E402
from hfoptim.distributed import checkpoint as hckpt  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    Model,
    all_cases,
    case_kwargs,
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
from tests.distributed.fsdp2_worker import shard, sharded_grad  # noqa: E402
from tests.harness import interleaved  # noqa: E402


def train(model, opt, ref_params, ref_opt, steps: range) -> None:
    """Steps ``steps`` (1-based step numbers) on the sharded model; the reference too if given."""
    rank, world = dist.get_rank(), dist.get_world_size()
    params = [p for _, p in model.named_leaves()]
    for t in steps:
        grads = gradients(ref_params, t)
        for p, g in zip(params, grads):
            p.grad = sharded_grad(p, g)
        if ref_opt is not None:
            for p, g in zip(ref_params, grads):
                p.grad = g.clone()
        if needs_loss(opt):
            opt.step(loss=rank_loss(t, rank, world))
            if ref_opt is not None:
                ref_opt.step(loss=step_loss(t))
        else:
            opt.step()
            if ref_opt is not None:
                ref_opt.step()


def as_format1(model, optim_state: dict) -> None:
    """``optim_state`` (DCP's form, by parameter name) rewritten in place as state format 1:
    every packed 4-bit tensor of a matrix (DTensor rows) interleaved, shard by shard, and the
    tag's format 1. A vector's codes are saved decoded (no packed tensor)."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for pname, pstate in optim_state["state"].items():
        for key in [k for k in pstate if k.endswith(".packed")]:
            value = pstate[key]
            assert isinstance(value, DTensor) and len(shapes[pname]) >= 2, (pname, key)
            local = value.to_local()
            view = ParamView(torch.Size((local.shape[0], *shapes[pname][1:])))
            pstate[key] = DTensor.from_local(
                interleaved(local, view), value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
            )
    for group in optim_state["param_groups"]:
        group[hckpt.GROUP_TAG] = {**group[hckpt.GROUP_TAG], "format": 1}
    if hckpt.TAG in optim_state:
        optim_state[hckpt.TAG] = {**optim_state[hckpt.TAG], "format": 1}


def run_case(name, failures, detail, *, phase, folder, steps1, steps2, format1=False) -> None:
    kwargs = case_kwargs(name)
    path = os.path.join(folder, name)
    ref_model = Model()
    ref_params = [p for _, p in ref_model.named_leaves()]
    ref_opt = hfoptim.create_optimizer(ref_params, name, **kwargs)
    if phase == "save":
        model = Model()
        shard(model)
        opt = hfoptim.create_optimizer([p for _, p in model.named_leaves()], name, **kwargs)
        # the single-process run advances alongside, only to produce the same gradients
        train(model, opt, ref_params, ref_opt, range(1, steps1 + 1))
        state = {"model": get_model_state_dict(model), "optim": hckpt.get_state_dict(model, opt)}
        if format1:
            as_format1(model, state["optim"])
        dcp.save(state, checkpoint_id=path)
        return
    model = Model(seed=123)  # other values: the checkpoint must restore them
    shard(model)
    opt = hfoptim.create_optimizer([p for _, p in model.named_leaves()], name, **kwargs)
    state = {"model": get_model_state_dict(model), "optim": hckpt.get_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    hckpt.set_state_dict(model, opt, state["optim"])
    # the uninterrupted single-process run
    for t in range(1, steps1 + 1):
        for p, g in zip(ref_params, gradients(ref_params, t)):
            p.grad = g.clone()
        ref_opt.step(loss=step_loss(t)) if needs_loss(ref_opt) else ref_opt.step()
    train(model, opt, ref_params, ref_opt, range(steps1 + 1, steps1 + steps2 + 1))
    params = [p for _, p in model.named_leaves()]
    if not all(isinstance(p, DTensor) for p in params):
        failures.append("parameters are not DTensors")
    engine = getattr(opt, "optimizer", opt)
    for (pname, p), ref_p in zip(model.named_leaves(), ref_params):
        compare(f"param {pname}", p.full_tensor().detach(), ref_p.detach(), torch.float32, failures, detail)
        view = engine.layout.view(p)
        compare_state(pname, engine.state[p], ref_opt.state[ref_p], view, torch.float32, failures, detail)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("save", "load"), required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--cases", default="fast")
    parser.add_argument("--steps1", type=int, default=3)
    parser.add_argument("--steps2", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--format1", action="store_true")
    args = parser.parse_args()
    setup_threads()
    dist.init_process_group("gloo")
    cases = [c for c in all_cases(args.cases) if not c.endswith("lookahead")]

    options = {"phase": args.phase, "folder": args.dir, "steps1": args.steps1, "steps2": args.steps2}

    def one(name, failures, detail):
        run_case(name, failures, detail, format1=args.format1, **options)

    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
