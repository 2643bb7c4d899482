"""Worker (started by torchrun): HFOptimTrainer under DeepSpeed ZeRO-2/3 or FSDP2 on CPU.

Trains the tiny Llama with the loss-probe optimizer (gradient accumulation 2) and writes, per
rank, what was engaged and the losses: the one the optimizer received each step, the Trainer's
logged one, and this rank's own (its micro-batch losses summed per step, before the mean over
ranks). See tests/test_trainer_sharded.py.
"""

from __future__ import annotations

import argparse
import json
import os

import hfoptim
from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.integrations.transformers import find_engines
from tests.trainer_setup import (
    LossProbeRule,
    TokenData,
    lossprobe_entries,
    run_args,
    tiny_llama,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["zero2", "zero3", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    entries = lossprobe_entries()
    hfoptim.registry.RULES["lossprobe"] = entries["rule"]
    hfoptim.registry.CLASSES["lossprobe"] = entries["class"]

    kw = run_args(
        os.path.join(os.path.dirname(opts.out), "trainer_out"),
        optim="lossprobe",
        max_steps=3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        use_cpu=True,  # as a CPU user would write; cpu_sharding (the default) engages the sharding anyway
    )
    if opts.mode == "fsdp2":
        kw.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    else:
        kw["deepspeed"] = {
            "zero_optimization": {"stage": int(opts.mode[-1])},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
        }
    args = HFOptimTrainingArguments(**kw)  # cpu_sharding=True: DeepSpeed / FSDP2 on gloo CPU processes
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData())

    accelerator = trainer.accelerator
    real_backward = accelerator.backward
    local: list[float] = []
    pending = [0.0]

    def recording_backward(loss, **kwargs):  # sees what HFOptimTrainer hands on, per rank
        pending[0] += float(loss.detach())
        if accelerator.sync_gradients:
            local.append(pending[0])
            pending[0] = 0.0
        return real_backward(loss, **kwargs)

    accelerator.backward = recording_backward
    trainer.train()

    (engine,) = find_engines(trainer.optimizer)
    chain, o = [], trainer.optimizer
    while o is not None and len(chain) < 4:
        chain.append(f"{type(o).__module__}.{type(o).__name__}")
        o = getattr(o, "optimizer", None)
    result = {
        "rank": int(os.environ["RANK"]),
        "world": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "optimizer_chain": chain,
        "param_types": sorted({type(p).__name__ for g in engine.param_groups for p in g["params"]}),
        "param_shapes": [list(p.shape) for g in engine.param_groups for p in g["params"]],
        "seen": [LossProbeRule.seen[t] for t in sorted(LossProbeRule.seen)],
        "logged": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "local": local,
    }
    with open(f"{opts.out}.rank{result['rank']}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
