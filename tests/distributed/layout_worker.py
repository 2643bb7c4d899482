"""Parameter layouts under FSDP2: ``torchrun --nproc_per_node N tests/distributed/layout_worker.py``.

* A fused expert tensor ``(E, out, in)`` sharded by ``fully_shard`` (Shard(0): by expert, 5
  experts over 2 or 3 processes, uneven) is stepped exactly as E separate ``Linear`` matrices on
  one process (float64): parameters and every state tensor (the local experts' rows of the
  stacked state).
* ``--phase save`` / ``--phase load --dir D``: the fused tensor's stacked state saved with
  torch.distributed.checkpoint on N processes, loaded on M (DCP reshards the experts), and the run
  continued: equal to E separate matrices stepped without interruption.
* A ``Conv1D`` weight ``(in, out)`` sharded along its input features: a step its layout cannot
  change (adamw; lamb and nsgda, whose norms are of the whole tensor) runs as stored and equals
  the transposed ``Linear`` run; a step with per-output-unit statistics or 8-bit rows (adamw_gc,
  adamw_8bit) is refused with a message naming the layout, on every process alike.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hfoptim  # noqa: E402
from hfoptim.core.layout import ParamLayoutError  # noqa: E402
from hfoptim.distributed import checkpoint as hckpt  # noqa: E402
from tests.distributed.common import finish, run_cases, setup_threads  # noqa: E402
from tests.distributed.fsdp2_worker import sharded_grad  # noqa: E402

EXPERTS, OUT, IN = 5, 6, 40
EXPERT_CASES = ("adamw_gc", "adamw_agc", "adamw_shared", "adamw_8bit", "adafactor", "nsgda", "amos", "lamb", "smmf")
CONV_CASES = ("conv_adamw", "conv_lamb", "conv_nsgda", "conv_adamw_gc_refused", "conv_adamw_8bit_refused")
CHECKPOINT_CASES = ("adamw_gc", "adamw_8bit", "adafactor", "amos", "smmf")
OPTIONS = {"lr": 0.01, "state_min_numel": 0, "weight_decay": 0.1}


class Holder(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())


def grads(shape, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def run_experts(name: str, failures: list, steps: int) -> None:
    w = torch.randn(EXPERTS, OUT, IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seps = [torch.nn.Parameter(w[e].clone()) for e in range(EXPERTS)]
    ref = hfoptim.create_optimizer(seps, name, **OPTIONS)
    module = Holder(w)
    fully_shard(module)
    p = module.weight
    opt = hfoptim.create_optimizer([p], name, param_layouts={p: "batch_out_in"}, **OPTIONS)
    for g in grads(w.shape, steps):
        for e in range(EXPERTS):
            seps[e].grad = g[e].clone()
        p.grad = sharded_grad(p, g)
        ref.step()
        opt.step()
    full = p.full_tensor().detach()
    for e in range(EXPERTS):
        err = (full[e] - seps[e].detach()).abs().max().item()
        if err > 1e-12:
            failures.append(f"{name}: expert {e} differs from its separate matrix by {err:.3e}")
    saved = opt.state_dict()  # exported as DTensors (per-expert rows), loaded back into a new optimizer
    fresh = hfoptim.create_optimizer([p], name, param_layouts={p: "batch_out_in"}, **OPTIONS)
    fresh.load_state_dict(saved)
    for key, value in opt.state[p].items():
        if not torch.equal(fresh.state[p][key], value):
            failures.append(f"{name}: state {key!r} changed through state_dict()/load_state_dict()")
    view = opt.layout.view(p)
    local = range(view.row_start, view.row_start + view.rows)
    for key, value in opt.state[p].items():
        want = torch.stack([ref.state[seps[e]][key] for e in local]) if view.rows else None
        if want is None:
            continue
        err = (value.double() - want.double()).abs().max().item()
        if tuple(value.shape) != tuple(want.shape) or err > 1e-12:
            failures.append(f"{name}: state {key!r} {tuple(value.shape)} vs separate {tuple(want.shape)}, {err:.3e}")


def run_checkpoint(name: str, failures: list, phase: str, folder: str, steps: int) -> None:
    """Save after ``steps`` steps (phase save) or load into other values, step ``steps`` more and
    compare with the separate matrices stepped ``2 * steps`` times (phase load)."""
    w = torch.randn(EXPERTS, OUT, IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    module = Holder(w if phase == "save" else torch.zeros_like(w))
    fully_shard(module)
    p = module.weight
    opt = hfoptim.create_optimizer([p], name, param_layouts={p: "batch_out_in"}, **OPTIONS)
    path = os.path.join(folder, name)
    all_grads = grads(w.shape, 2 * steps)
    if phase == "save":
        for g in all_grads[:steps]:
            p.grad = sharded_grad(p, g)
            opt.step()
        state = {"model": get_model_state_dict(module), "optim": hckpt.get_state_dict(module, opt)}
        dcp.save(state, checkpoint_id=path)
        return
    state = {"model": get_model_state_dict(module), "optim": hckpt.get_state_dict(module, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, state["model"])
    hckpt.set_state_dict(module, opt, state["optim"])
    seps = [torch.nn.Parameter(w[e].clone()) for e in range(EXPERTS)]
    ref = hfoptim.create_optimizer(seps, name, **OPTIONS)
    for t, g in enumerate(all_grads):
        for e in range(EXPERTS):
            seps[e].grad = g[e].clone()
        ref.step()
        if t >= steps:
            p.grad = sharded_grad(p, g)
            opt.step()
    full = p.full_tensor().detach()
    for e in range(EXPERTS):
        err = (full[e] - seps[e].detach()).abs().max().item()
        if err > 1e-12:
            failures.append(f"{name}: expert {e} after resuming differs from its separate matrix by {err:.3e}")
    view = opt.layout.view(p)
    for key, value in opt.state[p].items():
        if view.rows:
            want = torch.stack([ref.state[seps[e]][key] for e in range(view.row_start, view.row_start + view.rows)])
            if tuple(value.shape) != tuple(want.shape) or (value.double() - want.double()).abs().max() > 1e-12:
                failures.append(f"{name}: state {key!r} after resuming differs from the separate matrices")


def run_conv(name: str, failures: list, steps: int) -> None:
    optimizer = name.removeprefix("conv_").removesuffix("_refused")
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lin = torch.nn.Parameter(w.clone())
    ref = hfoptim.create_optimizer([lin], optimizer, **OPTIONS)
    module = Holder(w.t().contiguous())  # Conv1D stores (in, out): FSDP2 shards the input features
    fully_shard(module)
    p = module.weight
    opt = hfoptim.create_optimizer([p], optimizer, param_layouts={p: "in_out"}, **OPTIONS)
    for g in grads(w.shape, steps):
        lin.grad = g.clone()
        p.grad = sharded_grad(p, g.t().contiguous())
        ref.step()
        try:
            opt.step()
        except ParamLayoutError as error:
            if not name.endswith("refused") or "in_out" not in str(error):
                failures.append(f"{name}: unexpected refusal: {error}")
            return
    if name.endswith("refused"):
        failures.append(f"{name}: a sharded Conv1D weight with per-output-unit statistics was stepped, not refused")
        return
    err = (p.full_tensor().detach().t() - lin.detach()).abs().max().item()
    if err > 1e-12:
        failures.append(f"{name}: differs from the transposed Linear run by {err:.3e}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phase", choices=("save", "load"), default=None, help="checkpoint cases only")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_threads()
    dist.init_process_group("gloo")

    def one(name, failures, detail):
        if args.phase:
            run_checkpoint(name, failures, args.phase, args.dir, args.steps)
        else:
            (run_conv if name in CONV_CASES else run_experts)(name, failures, args.steps)

    cases = list(CHECKPOINT_CASES) if args.phase else [*EXPERT_CASES, *CONV_CASES]
    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
