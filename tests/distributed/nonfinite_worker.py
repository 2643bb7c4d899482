"""Non-finite gradients under FSDP2: ``torchrun --nproc_per_node 2 tests/distributed/nonfinite_worker.py``.

For each case (8-bit AdamW, where one NaN would spoil a block of state; fp32 AdamW with
``skip_nonfinite=True``): the model sharded with ``fully_shard``, two finite steps, then one step
whose gradient holds a NaN (then an infinity) in ONE element that only the LAST process holds.
Every process must skip that step -- its parameters and every state tensor bit-identical to
before, ``nonfinite_skips`` counted -- and the next finite step must move the parameters again
exactly like a single-process optimizer that never saw the bad step.

Also ("refuse_conversion"): loading fp32 AdamW state into 8-bit AdamW over the same sharded
parameters is refused with a message saying how to proceed (a process holds only shards).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hfoptim  # noqa: E402
from tests.distributed.common import Model, compare, finish, gradients, run_cases, setup_threads  # noqa: E402
from tests.distributed.fsdp2_worker import shard, sharded_grad  # noqa: E402

CASES = {"adamw_8bit": {}, "adamw": {"skip_nonfinite": True}}


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(opt, params) -> list:
    return [(local(p), {k: local(v) for k, v in opt.state[p].items()}) for p in params]


def run_case(name: str, failures: list, detail: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    kwargs = {"state_min_numel": 0, "weight_decay": 0.05, **CASES[name]}
    ref_model, model = Model(), Model()
    ref_params = [p for _, p in ref_model.named_leaves()]
    ref_opt = hfoptim.create_optimizer(ref_params, name, **kwargs)
    shard(model)
    named = model.named_leaves()
    params = [p for _, p in named]
    opt = hfoptim.create_optimizer(params, name, **kwargs)

    def step(t, bad=None):
        grads = gradients(ref_params, t)
        if bad is None:
            for p, g in zip(ref_params, grads):
                p.grad = g.clone()
            ref_opt.step()
        else:  # the last row of "big": held by the last process only
            index = [n for n, _ in named].index("big")
            grads[index][-1, -1] = bad
        for p, g in zip(params, grads):
            p.grad = sharded_grad(p, g)
        opt.step()

    step(1)
    step(2)
    big = params[[n for n, _ in named].index("big")]
    for count, bad in enumerate((float("nan"), float("inf")), start=1):
        before = snapshot(opt, params)
        step(3, bad)
        holds = bool((~torch.isfinite(local(big.grad))).any())
        if holds != (rank == world - 1):
            failures.append(f"the bad element is on rank {rank}: {holds} (the case tests nothing)")
        after = snapshot(opt, params)
        for (pname, _), (p0, s0), (p1, s1) in zip(named, before, after):
            if not torch.equal(p0, p1):
                failures.append(f"{bad}: param {pname} changed on rank {rank}")
            for key in s0:
                if not torch.equal(s0[key], s1[key]):
                    failures.append(f"{bad}: state {pname}[{key!r}] changed on rank {rank}")
        if opt.nonfinite_skips != count:
            failures.append(f"{bad}: nonfinite_skips={opt.nonfinite_skips} on rank {rank}, expected {count}")
    step(3)
    for (pname, p), ref_p in zip(named, ref_params):
        compare(
            f"param {pname} after the skipped steps",
            p.full_tensor().detach(),
            ref_p.detach(),
            torch.float32,
            failures,
            detail,
        )
    detail["collectives"] = opt.layout.stats.collectives


def refuse_conversion(name: str, failures: list, detail: dict) -> None:
    """A sharded run holds only shards of the saved state: loading fp32 AdamW state into an
    8-bit AdamW over the same FSDP2 parameters is refused, saying how to proceed."""
    model = Model()
    shard(model)
    params = [p for _, p in model.named_leaves()]
    opt = hfoptim.create_optimizer(params, "adamw", state_min_numel=0)
    grads = gradients([p.full_tensor().detach() for p in params], 1)
    for p, g in zip(params, grads):
        p.grad = sharded_grad(p, g)
    opt.step()
    state_dict = opt.state_dict()
    other = hfoptim.create_optimizer(params, "adamw_8bit", state_min_numel=0)
    try:
        other.load_state_dict(state_dict)
    except ValueError as error:
        if "sharded run" not in str(error) or "on one process" not in str(error):
            failures.append(f"unclear refusal: {error}")
    else:
        failures.append("a sharded load into another storage form was not refused")
    same = hfoptim.create_optimizer(params, "adamw", state_min_numel=0)
    same.load_state_dict(state_dict)  # the same form loads


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_threads()
    dist.init_process_group("gloo")

    def one(name, failures, detail):
        (refuse_conversion if name == "refuse_conversion" else run_case)(name, failures, detail)

    status = run_cases([*CASES, "refuse_conversion"], one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
