"""Parameter layouts under DeepSpeed ZeRO (``DS_ACCELERATOR=cpu``, gloo):
``torchrun --nproc_per_node N tests/distributed/zero_layout_worker.py --stage S``.

* A fused expert tensor ``(5, 7, 43)``, partitioned by ZeRO with boundaries inside experts and
  inside rows, is stepped exactly as 5 separate ``Linear`` matrices on one process (each expert
  is a segment of its own): parameters (gathered) and every expert's state.
* A ``Conv1D`` weight ``(301, 7)`` (partition boundaries inside its stored rows) is stepped
  exactly as the same ``Linear`` weight ``(7, 301)`` on one process by every rule, storage form and
  modifier (the cases of layout_worker.py): parameters (gathered) and every state tensor, kept
  for this process's whole output units, unchanged through DeepSpeed's checkpoint.
* A fused expert tensor stored ``(E, in, out)`` whose partition cuts an expert is refused with
  an error naming the layout, on every process alike.

Gradients come through a real DeepSpeed backward, exact as in zero_worker.py (coarse values, only
process 0 contributes ``world * g``).
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
from hfoptim.core.layout import ParamLayoutError, transposed_view  # noqa: E402
from tests.distributed.common import coarse, compare, compare_state, finish, run_cases, setup_threads  # noqa: E402
from tests.distributed.layout_worker import CONV_CASES, conv_options, conv_step  # noqa: E402
from tests.distributed.zero_worker import ds_config  # noqa: E402

E, OUT, IN = 5, 7, 43  # 1505 elements: partitions of 753 (2 processes) or 502 (3) cut experts inside rows
EXPERT_CASES = ("adamw_gc", "adamw_agc", "adamw_shared", "adamw_8bit", "adafactor", "nsgda", "amos", "lamb", "smmf")
#: a fused expert tensor stored (E, in, out) that a partition cuts inside an expert: refused
REFUSED_CASES = ("experts_in_out_adamw_gc_refused",)
#: Conv1D cases whose state (kept for whole output units) also goes through DeepSpeed's checkpoint
CHECKPOINTED = ("conv_adamw_8bit", "conv_adamw_4bit", "conv_adafactor", "conv_smmf", "conv_adamw_gc")
CONV_IN = 301  # stored (301, 7): 2107 elements, partitions of 1054 (2 processes) or 703 (3) cut rows
OPTIONS = {"lr": 0.01, "state_min_numel": 0, "weight_decay": 0.1}
DTYPE = torch.float32


class Holder(torch.nn.Module):
    """One parameter; ``forward(g, scale) = scale * <w, g>``, so its gradient is ``scale * g``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())

    def forward(self, g: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * (self.weight * g).sum()


def grads(shape, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return coarse([torch.randn(shape, generator=gen, dtype=DTYPE) for _ in range(steps)])


def run(name: str, failures: list, detail: dict, *, stage: int, steps: int, folder: str | None = None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    conv = name.startswith("conv_")
    optimizer = name.removeprefix("conv_")
    if conv:
        w = torch.randn(OUT, CONV_IN, generator=torch.Generator().manual_seed(3), dtype=DTYPE) * 0.5
        refs = [torch.nn.Parameter(w.clone())]
        stored, layout = w.t().contiguous(), "in_out"
        options = conv_options(optimizer)
    else:
        w = torch.randn(E, OUT, IN, generator=torch.Generator().manual_seed(3), dtype=DTYPE) * 0.5
        refs = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
        stored, layout = w, "batch_out_in"
        options = OPTIONS
    ref = hfoptim.create_optimizer(refs, optimizer, **options)
    model = Holder(stored)
    opt = hfoptim.create_optimizer([model.weight], optimizer, param_layouts={model.weight: layout}, **options)
    config = ds_config(stage, round_robin=False, sub_group_size=None, offload=False)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine = hfoptim.integrations.deepspeed.hfoptim_engine(ds_engine.optimizer.optimizer)
    for t, g in enumerate(grads(w.shape, steps), 1):
        for e, p in enumerate(refs):
            p.grad = (g if conv else g[e]).clone()
        conv_step(ref, optimizer, t)
        scale = float(world) if rank == 0 else 0.0
        if engine.rule.needs_loss:
            engine.set_loss(2.0 / t)
        ds_engine.backward(ds_engine(g.t().contiguous() if conv else g, scale))
        ds_engine.step()
    if type(engine.layout).__name__ != "ZeroLayout":
        failures.append(f"stepped with {type(engine.layout).__name__}, not the ZeRO layout")
    if stage == 3:
        with deepspeed.zero.GatheredParameters([model.weight]):
            full = model.weight.detach().clone()
    else:
        full = model.weight.detach().clone()
    layout_ = engine.layout
    if conv:
        compare(f"{name}: parameter", full.t(), refs[0].detach(), DTYPE, failures, detail)
        source = engine.layout_of(model.weight)
        for fg in layout_.flat_groups.values():
            segments = engine.state[fg.flat].get("segments", {})
            for piece in layout_.pieces(fg.flat, engine, engine.param_groups[0]):
                if engine.stepped_as(engine.param_groups[0], source, piece.view.global_shape) is None:
                    detail["stepped_as_stored"] = True
                    continue
                state = segments.get(piece.segment.index, {})
                view = transposed_view(piece.view)
                compare_state(name, state, ref.state[refs[0]], view, DTYPE, failures, detail)
        if name in CHECKPOINTED and folder is not None:
            before = {
                flat: {
                    i: {k: v.clone() for k, v in seg.items() if isinstance(v, torch.Tensor)}
                    for i, seg in engine.state[flat]["segments"].items()
                }
                for flat in engine.state
            }
            ds_engine.save_checkpoint(folder, tag=name)
            ds_engine.load_checkpoint(folder, tag=name)
            for flat, segments in before.items():
                for index, state in segments.items():
                    for key, value in state.items():
                        got = engine.state[flat]["segments"][index][key]
                        if not torch.equal(got, value):
                            failures.append(f"{name}: state {key!r} changed through DeepSpeed's checkpoint")
    else:
        for e in range(E):
            compare(f"{name}: expert {e}", full[e], refs[e].detach(), DTYPE, failures, detail)
        for fg in layout_.flat_groups.values():
            segments = engine.state[fg.flat].get("segments", {})
            pieces = layout_.pieces(fg.flat, engine, engine.param_groups[0])
            detail["pieces"] = len(pieces)
            for piece in pieces:
                e = int(str(piece.segment.index).split(".")[1])
                state = segments.get(piece.segment.index, {})
                compare_state(f"{name} expert {e}", state, ref.state[refs[e]], piece.view, DTYPE, failures, detail)
    ds_engine.destroy()


def run_refused(name: str, failures: list, *, stage: int) -> None:
    """The one sharded layout hfoptim refuses: every process raises the same clear error."""
    rank, world = dist.get_rank(), dist.get_world_size()
    w = torch.randn(E, IN, OUT, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    model = Holder(w)
    opt = hfoptim.create_optimizer([model.weight], "adamw_gc", param_layouts={model.weight: "batch_in_out"}, **OPTIONS)
    config = ds_config(stage, round_robin=False, sub_group_size=None, offload=False)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    ds_engine.backward(ds_engine(torch.ones_like(w), float(world) if rank == 0 else 0.0))
    try:
        ds_engine.step()
        failures.append(f"{name}: a fused (E, in, out) tensor cut inside an expert was stepped, not refused")
    except ParamLayoutError as error:
        if "batch_in_out" not in str(error) or "ZeRO" not in str(error):
            failures.append(f"{name}: the refusal does not name the layout and the sharding: {error}")
    ds_engine.destroy()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="comma-separated case names (debugging)")
    args = parser.parse_args()
    setup_threads()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")

    def one(name, failures, detail):
        if name in REFUSED_CASES:
            run_refused(name, failures, stage=args.stage)
        else:
            folder = os.path.join(os.path.dirname(os.path.abspath(args.out)), "ckpt") if args.out else None
            run(name, failures, detail, stage=args.stage, steps=args.steps, folder=folder)

    cases = [*EXPERT_CASES, *CONV_CASES, *REFUSED_CASES]
    if args.only:
        cases = [c for c in cases if c in args.only.split(",")]
    status = run_cases(cases, one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
