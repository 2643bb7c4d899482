"""Parameter layouts under FSDP2: ``torchrun --nproc_per_node N tests/distributed/layout_worker.py``.

* A fused expert tensor ``(E, out, in)`` sharded by ``fully_shard`` (Shard(0): by expert, 5
  experts over 2 or 3 processes, uneven) is stepped exactly as E separate ``Linear`` matrices on
  one process (float64): parameters and every state tensor (the local experts' rows of the
  stacked state).
* ``--phase save`` / ``--phase load --dir D``: the fused tensor's stacked state, and a sharded
  ``Conv1D`` weight's state, saved with torch.distributed.checkpoint on N processes, loaded on M
  (DCP reshards the experts and the output units), and the run continued: equal to E separate
  matrices, or the ``Linear`` weight, stepped without interruption.
* A ``Conv1D`` weight ``(in, out)`` sharded along its input features (Shard(0) of the stored
  tensor, uneven: 7 output units over 2 or 3 processes) is stepped exactly as the same ``Linear``
  weight on one process (float64) by every rule, storage form and modifier (:data:`CONV_CASES`):
  parameters, every state tensor (kept for this process's whole output units), and the state
  through ``state_dict()``/``load_state_dict()``.
* A tiny GPT-2 under ``fully_shard``, its optimizer built from the model (Conv1D weights detected):
  equal to the same model on one process.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hfoptim  # noqa: E402
from hfoptim.core.layout import transposed_view  # noqa: E402
from hfoptim.distributed import checkpoint as hckpt  # noqa: E402
from hfoptim.rules import RULES  # noqa: E402
from tests.distributed.common import (  # noqa: E402
    compare,
    compare_state,
    finish,
    fully_shard,
    run_cases,
    setup_threads,
)
from tests.distributed.fsdp2_worker import sharded_grad  # noqa: E402

EXPERTS, OUT, IN = 5, 7, 300  # rows of 300: an 8-bit row ends in a short block
EXPERT_CASES = ("adamw_gc", "adamw_agc", "adamw_shared", "adamw_8bit", "adafactor", "nsgda", "amos", "lamb", "smmf")
#: every rule, AdamW with every storage form and modifier, and a few combinations
CONV_NAMES = (
    *sorted(RULES),
    "lamb",
    *(f"adamw_{form}" for form in ("8bit", "4bit", "bf16", "factored", "smmf", "shared")),
    *(f"adamw_{m}" for m in ("gc", "agc", "softclip", "cautious", "gradnorm", "normloss", "cpr", "swd")),
    "adamw2",
    "ademamix_8bit",
    "adan_cautious_factored",
    "nsgda_gc",
    "muon_gc",
)
CONV_CASES = tuple(f"conv_{name}" for name in CONV_NAMES)
#: a tiny GPT-2 (Conv1D attention and MLP weights, detected from its modules) under fully_shard
GPT2_CASES = ("gpt2_adamw_8bit", "gpt2_adamw_gc", "gpt2_adafactor", "gpt2_amos")
CHECKPOINT_CASES = ("adamw_gc", "adamw_8bit", "adafactor", "amos", "smmf")
CONV_CHECKPOINT_CASES = ("conv_adamw_gc", "conv_adamw_8bit", "conv_adamw_4bit", "conv_adafactor", "conv_smmf")
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


def conv_options(name: str) -> dict:
    out = dict(OPTIONS)
    if hfoptim.get_optimizer(name).rule.name == "adalo":
        out.pop("lr")  # AdaLo sets its step size from the loss
    if "agc" in name:
        out["agc"] = 0.05  # clips on these gradients
    return out


def conv_step(opt, name: str, t: int) -> None:
    if hfoptim.get_optimizer(name).rule.needs_loss:
        opt.step(loss=2.0 / t)
    else:
        opt.step()


def run_conv(name: str, failures: list, detail: dict, steps: int) -> None:
    """A ``Conv1D`` weight sharded along its input features against the same ``Linear`` weight
    on one process: parameters and state after every step, and the state's round trip."""
    optimizer = name.removeprefix("conv_")
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lin = torch.nn.Parameter(w.clone())
    ref = hfoptim.create_optimizer([lin], optimizer, **conv_options(optimizer))
    module = Holder(w.t().contiguous())  # Conv1D stores (in, out): FSDP2 shards the input features
    fully_shard(module)
    p = module.weight
    opt = hfoptim.create_optimizer([p], optimizer, param_layouts={p: "in_out"}, **conv_options(optimizer))
    for t, g in enumerate(grads(w.shape, steps), 1):
        lin.grad = g.clone()
        p.grad = sharded_grad(p, g.t().contiguous())
        before = p.grad.to_local().clone()
        conv_step(ref, optimizer, t)
        conv_step(opt, optimizer, t)
        if not torch.equal(p.grad.to_local(), before):
            failures.append(f"{name}: p.grad was modified")
        err = (p.full_tensor().detach().t() - lin.detach()).abs().max().item()
        if err > 1e-12:
            failures.append(f"{name} step {t}: differs from the Linear run by {err:.3e}")
    if opt.stepped_as(opt.param_groups[0], opt.layout_of(p), p.shape) is None:
        detail["stepped_as_stored"] = True  # the layout cannot change this step: state as stored
        return
    view = transposed_view(opt.layout.view(p))
    compare_state(name, opt.state[p], ref.state[lin], view, torch.float64, failures, detail)
    saved = opt.state_dict()  # exported as DTensors over the output units, loaded back
    fresh = hfoptim.create_optimizer([p], optimizer, param_layouts={p: "in_out"}, **conv_options(optimizer))
    fresh.load_state_dict(saved)
    for key, value in opt.state[p].items():
        got = fresh.state[p][key]
        if not isinstance(value, torch.Tensor):
            continue
        compare(f"{name}: state {key!r} through state_dict()", got, value, torch.float64, failures, detail)


def run_gpt2(name: str, failures: list, steps: int) -> None:
    """A tiny GPT-2, each block and the model ``fully_shard``-ed, with the optimizer built from the
    model (its Conv1D weights detected): equal to the same model stepped on one process with the
    same gradients (float64)."""
    import transformers as tf

    optimizer = name.removeprefix("gpt2_")
    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    ref_model = tf.GPT2LMHeadModel(config).double().eval()  # no dropout: the same forward everywhere
    model = tf.GPT2LMHeadModel(config).double().eval()
    model.load_state_dict(ref_model.state_dict())
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    options = {"lr": 0.01, "state_min_numel": 0, "weight_decay": 0.1}
    ref = hfoptim.create_optimizer(ref_model, optimizer, **options)
    opt = hfoptim.create_optimizer(model, optimizer, **options)
    conv = [n for n, p in model.named_parameters() if opt.layout_of(p).transposed]
    if len(conv) != 4 * config.n_layer:
        failures.append(f"{name}: {len(conv)} Conv1D weights detected, expected {4 * config.n_layer}")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    want = dict(ref_model.named_parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for n, p in model.named_parameters():  # the same gradients (FSDP2's mean over 3 processes
            want[n].grad = p.grad.full_tensor()  # can differ from one backward in the last bit)
        ref.step()
        opt.step()
    for n, p in model.named_parameters():
        err = (p.full_tensor().detach() - want[n].detach()).abs().max().item()
        if err > 1e-10:
            failures.append(f"{name}: {n} differs from one process by {err:.3e}")


def run_conv_checkpoint(name: str, failures: list, phase: str, folder: str, steps: int) -> None:
    """A sharded ``Conv1D`` weight's state (kept for whole output units) saved with DCP on N
    processes, loaded on M, resumed: equal to the ``Linear`` weight stepped without interruption."""
    optimizer = name.removeprefix("conv_")
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    module = Holder(w.t().contiguous() if phase == "save" else torch.zeros(IN, OUT, dtype=torch.float64))
    fully_shard(module)
    p = module.weight
    opt = hfoptim.create_optimizer([p], optimizer, param_layouts={p: "in_out"}, **conv_options(optimizer))
    path = os.path.join(folder, name)
    all_grads = grads(w.shape, 2 * steps)
    if phase == "save":
        for t, g in enumerate(all_grads[:steps], 1):
            p.grad = sharded_grad(p, g.t().contiguous())
            conv_step(opt, optimizer, t)
        state = {"model": get_model_state_dict(module), "optim": hckpt.get_state_dict(module, opt)}
        dcp.save(state, checkpoint_id=path)
        return
    state = {"model": get_model_state_dict(module), "optim": hckpt.get_state_dict(module, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, state["model"])
    hckpt.set_state_dict(module, opt, state["optim"])
    lin = torch.nn.Parameter(w.clone())
    ref = hfoptim.create_optimizer([lin], optimizer, **conv_options(optimizer))
    for t, g in enumerate(all_grads, 1):
        lin.grad = g.clone()
        conv_step(ref, optimizer, t)
        if t > steps:
            p.grad = sharded_grad(p, g.t().contiguous())
            conv_step(opt, optimizer, t)
    err = (p.full_tensor().detach().t() - lin.detach()).abs().max().item()
    if err > 1e-12:
        failures.append(f"{name}: after resuming differs from the Linear run by {err:.3e}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phase", choices=("save", "load"), default=None, help="checkpoint cases only")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="comma-separated case names (debugging)")
    args = parser.parse_args()
    setup_threads()
    dist.init_process_group("gloo")

    def one(name, failures, detail):
        if args.phase and name in CONV_CHECKPOINT_CASES:
            run_conv_checkpoint(name, failures, args.phase, args.dir, args.steps)
        elif args.phase:
            run_checkpoint(name, failures, args.phase, args.dir, args.steps)
        elif name in CONV_CASES:
            run_conv(name, failures, detail, args.steps)
        elif name in GPT2_CASES:
            run_gpt2(name, failures, args.steps)
        else:
            run_experts(name, failures, args.steps)

    cases = [*CHECKPOINT_CASES, *CONV_CHECKPOINT_CASES] if args.phase else [*EXPERT_CASES, *CONV_CASES, *GPT2_CASES]
    if args.only:
        cases = [c for c in cases if c in args.only.split(",")]
    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
