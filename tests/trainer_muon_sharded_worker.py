"""Worker (started by torchrun): HFOptimTrainer with ``optim="muon_8bit"`` under FSDP2 or DeepSpeed
ZeRO-2/3 on CPU, 2 processes. Writes per rank: the layout that stepped, each group's algorithm
and parameter names as the Trainer built them (roles), the per-matrix orthogonalization counts,
the bytes the whole-matrix exchange sent and the logged losses. See tests/test_muon_roles.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.integrations.transformers import find_engines
from tests.trainer_setup import TokenData, run_args, tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["zero2", "zero3", "fsdp2"], required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    kw = run_args(
        os.path.join(os.path.dirname(opts.out), "trainer_out"),
        optim="muon_8bit",
        optim_args="state_min_numel=0,ns_dtype=fp32",
        max_steps=3,
        per_device_train_batch_size=2,
        use_cpu=True,  # as a CPU user would write; cpu_sharding (the default) engages the sharding
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
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    trainer = HFOptimTrainer(model=model, args=HFOptimTrainingArguments(**kw), train_dataset=TokenData())
    trainer.train()
    engines = [e for e in find_engines(trainer.optimizer)]
    engine = engines[0]
    stats = engine.layout.stats
    runs = torch.tensor([x for call in stats.matrix_runs for x in call] or [0], dtype=torch.long)
    dist.all_reduce(runs)
    held = torch.tensor([stats.held_matrix_runs], dtype=torch.long)  # matrices one process holds whole
    dist.all_reduce(held)
    result = {
        "rank": dist.get_rank(),
        "layout": type(engine.layout).__name__,
        "groups": [{"algorithm": g["algorithm"], "names": list(g.get("param_names", []))} for g in engine.param_groups],
        "runs_over_ranks": runs.tolist(),
        "held_runs_over_ranks": int(held),
        "bytes_sent": int(getattr(stats, "bytes_sent", 0)),
        "logged": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    with open(f"{opts.out}.rank{result['rank']}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
