"""Parameter layouts under DeepSpeed ZeRO (``DS_ACCELERATOR=cpu``, gloo):
``torchrun --nproc_per_node N tests/distributed/zero_layout_worker.py --stage S``.

* A fused expert tensor ``(5, 7, 43)``, partitioned by ZeRO with boundaries inside experts and
  inside rows, is stepped exactly as 5 separate ``Linear`` matrices on one process (each expert
  is a segment of its own): parameters (gathered) and every expert's state.
* A ``Conv1D`` weight ``(43, 7)``: a step its layout cannot change (adamw, lamb) runs on the
  segments as stored and equals the transposed ``Linear`` run; adamw_gc is refused with an error
  naming the layout, on every process alike.

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
from hfoptim.core.layout import ParamLayoutError  # noqa: E402
from tests.distributed.common import coarse, compare, compare_state, finish, run_cases, setup_threads  # noqa: E402
from tests.distributed.zero_worker import ds_config  # noqa: E402

E, OUT, IN = 5, 7, 43  # 1505 elements: partitions of 753 (2 processes) or 502 (3) cut experts inside rows
EXPERT_CASES = ("adamw_gc", "adamw_agc", "adamw_shared", "adamw_8bit", "adafactor", "nsgda", "amos", "lamb", "smmf")
CONV_CASES = ("conv_adamw", "conv_lamb", "conv_adamw_gc_refused")
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


def run(name: str, failures: list, detail: dict, *, stage: int, steps: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    conv = name.startswith("conv_")
    optimizer = name.removeprefix("conv_").removesuffix("_refused")
    w = torch.randn(E, OUT, IN, generator=torch.Generator().manual_seed(3), dtype=DTYPE) * 0.5
    if conv:
        refs = [torch.nn.Parameter(w[0].clone())]
        stored, layout = w[0].t().contiguous(), "in_out"
    else:
        refs = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
        stored, layout = w, "batch_out_in"
    ref = hfoptim.create_optimizer(refs, optimizer, **OPTIONS)
    model = Holder(stored)
    opt = hfoptim.create_optimizer([model.weight], optimizer, param_layouts={model.weight: layout}, **OPTIONS)
    config = ds_config(stage, round_robin=False, sub_group_size=None, offload=False)
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    engine = hfoptim.integrations.deepspeed.hfoptim_engine(ds_engine.optimizer.optimizer)
    shape = w[0].shape if conv else w.shape
    for g in grads(shape, steps):
        for e, p in enumerate(refs):
            p.grad = (g if conv else g[e]).clone()
        ref.step()
        scale = float(world) if rank == 0 else 0.0
        ds_engine.backward(ds_engine(g.t().contiguous() if conv else g, scale))
        try:
            ds_engine.step()
        except ParamLayoutError as error:
            if not name.endswith("refused") or "in_out" not in str(error):
                failures.append(f"{name}: unexpected refusal: {error}")
            ds_engine.destroy()
            return
    if name.endswith("refused"):
        failures.append(f"{name}: a partitioned Conv1D weight with per-output-unit statistics was stepped")
    if type(engine.layout).__name__ != "ZeroLayout":
        failures.append(f"stepped with {type(engine.layout).__name__}, not the ZeRO layout")
    if stage == 3:
        with deepspeed.zero.GatheredParameters([model.weight]):
            full = model.weight.detach().clone()
    else:
        full = model.weight.detach().clone()
    if conv:
        compare(f"{name}: parameter", full.t(), refs[0].detach(), DTYPE, failures, detail)
    else:
        for e in range(E):
            compare(f"{name}: expert {e}", full[e], refs[e].detach(), DTYPE, failures, detail)
        layout_ = engine.layout
        for fg in layout_.flat_groups.values():
            segments = engine.state[fg.flat].get("segments", {})
            pieces = layout_.pieces(fg.flat, engine, engine.param_groups[0])
            detail["pieces"] = len(pieces)
            for piece in pieces:
                e = int(str(piece.segment.index).split(".")[1])
                state = segments.get(piece.segment.index, {})
                compare_state(f"{name} expert {e}", state, ref.state[refs[e]], piece.view, DTYPE, failures, detail)
    ds_engine.destroy()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    setup_threads()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo")

    def one(name, failures, detail):
        run(name, failures, detail, stage=args.stage, steps=args.steps)

    status = run_cases([*EXPERT_CASES, *CONV_CASES], one, args.out)
    finish(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
