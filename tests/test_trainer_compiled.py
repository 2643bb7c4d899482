"""The compiled path (hfoptim.core.compiled_step) under a real ``HFOptimTrainer`` with a learning-rate
schedule.

The Trainer's scheduler writes a new ``group["lr"]`` at every step (warm-up, then decay). The
traced step must take the learning rate as a tensor input: one compilation per parameter shape
for the whole run, and the compiled kernel used at every step. Before the fix dynamo guarded on
``group['lr'] == <value>`` and recompiled at every step until its recompile limit sent the step
to uncompiled code; this test runs more steps than that limit.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
from hfoptim.core import compiled_step
from tests.trainer_setup import TokenData, inner_optimizer, run_args, tiny_llama


def _kernel_shape(p: torch.Tensor, coded: bool) -> tuple:
    """The shape key of the kernel that steps ``p``: an 8-bit matrix whose rows are whole blocks
    of 256, or one short block, is stepped in rows of one block by the kernel of any row count of
    that block length (``None`` rows); every other parameter by the kernel of its shape."""
    if coded and p.dim() == 2:
        if p.shape[1] % 256 == 0:
            return (None, 256)
        if p.shape[1] < 256:
            return (None, p.shape[1])
    return tuple(p.shape)


@pytest.mark.slow
def test_trainer_schedule_compiles_once_per_shape_and_runs_compiled_every_step(tmp_path, caplog, fresh_dynamo):
    steps = torch._dynamo.config.recompile_limit + 4
    # hitting the limit raises (fresh_dynamo; the engine then falls back to the plain path with
    # a warning) instead of silently running the traced function uncompiled
    compiled_step.reset()
    counters.clear()
    args = HFOptimTrainingArguments(
        **run_args(
            tmp_path,
            optim="adamw_8bit",
            optim_args="compile=on,state_min_numel=1024",
            max_steps=steps,
            warmup_steps=3,
            lr_scheduler_type="cosine",
            weight_decay=0.1,
        )
    )
    trainer = HFOptimTrainer(model=tiny_llama(), args=args, train_dataset=TokenData(n=4 * steps))
    lrs = []
    with caplog.at_level(logging.INFO, logger="hfoptim.core.compiled_step"):
        trainer.train()
        lrs = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    opt = inner_optimizer(trainer)
    assert len(set(lrs)) == steps  # warm-up and decay: a new learning rate at every step

    # every parameter takes the compiled path (compile=on): those with 8-bit state (at least 1024
    # elements) and the small ones with dense state alike
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any("exp_avg.codes" in opt.state[p] for p in params) and any("exp_avg" in opt.state[p] for p in params)
    shapes = Counter(tuple(p.shape) for p in params)
    assert len(shapes) >= 3 and len(params) > len(shapes)  # several shapes, shapes shared by parameters
    assert compiled_step._failed is None
    # every parameter at every step went through the compiled kernel of its shape (one kernel per
    # shape and parameter group: the groups' options differ; an 8-bit matrix, in rows of one
    # block, the kernel of any row count of its row length) ...
    per_shape = Counter()
    for key, n in compiled_step.calls.items():
        per_shape[key[1]] += n
    expected = Counter()
    for p in params:
        expected[_kernel_shape(p, "exp_avg.codes" in opt.state[p])] += steps
    assert per_shape == expected
    # ... which was traced and compiled once: no recompilation for the learning rate or the step
    # (by the kit's trace, each kernel one whole graph; dynamo traced nothing)
    assert compiled_step.traced == {"kit": len(compiled_step.calls), "dynamo": 0}, compiled_step.traced
    assert not counters["frames"]["total"], dict(counters["frames"])
    # compiling is announced: once as a warning, then per shape with its time
    messages = [r.getMessage() for r in caplog.records if r.name == "hfoptim.core.compiled_step"]
    assert sum("compiling the fused optimizer step" in m for m in messages) == 1
    assert sum(m.startswith("hfoptim: compiled the fused adamw step") for m in messages) == len(compiled_step.calls)
    compiled_step.reset()


@pytest.mark.slow
def test_trainer_with_lora_adapters_compiles_the_shape_they_share(tmp_path):
    """peft LoRA under a real ``HFOptimTrainer`` (warm-up and cosine decay), ``adamw_8bit`` with
    ``compile="auto"``: the adapters are far under 65536 elements, but the 32 ``lora_A`` matrices
    of q and v (16 layers) share one shape, which the kernel steps at every step
    (hfoptim.core.compiled_step.AUTO_MIN_SHAPE_COUNT); the ``lora_B`` shapes, 16 each, and
    nothing of the frozen model take no kernel."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(layers=16), lora)
    steps = 5
    compiled_step.reset()
    args = HFOptimTrainingArguments(
        **run_args(
            tmp_path,
            optim="adamw_8bit",
            optim_args="state_min_numel=0",
            max_steps=steps,
            warmup_steps=2,
            lr_scheduler_type="cosine",
        )
    )
    trainer = HFOptimTrainer(model=model, args=args, train_dataset=TokenData(n=4 * steps))
    try:
        trainer.train()
        opt = inner_optimizer(trainer)
        shapes = Counter(tuple(p.shape) for g in opt.param_groups for p in g["params"])
        assert shapes == {(4, 32): 32, (32, 4): 16, (16, 4): 16}, shapes  # A of q and v; B of q; B of v
        assert all("exp_avg.codes" in opt.state[p] for g in opt.param_groups for p in g["params"])
        per_shape = Counter()
        for key, n in compiled_step.calls.items():
            per_shape[key[1]] += n
        assert compiled_step._failed is None
        assert per_shape == {(None, 32): 32 * steps}  # rows of one 8-bit block: the kernel of any row count
    finally:
        compiled_step.reset()
