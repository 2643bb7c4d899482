"""A tiny Llama-style causal LM and random token data for real ``Trainer.train()`` runs on CPU."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hfoptim.core.hparams import HP
from hfoptim.core.optimizer import optimizer_class
from hfoptim.core.rule import Rule

VOCAB = 128
SEQ = 16


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class TokenData(torch.utils.data.Dataset):
    """Random tokens, labels = inputs (the model shifts them)."""

    def __init__(self, n: int = 32, seed: int = 1):
        self.tokens = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def run_args(output_dir, **overrides) -> dict:
    """TrainingArguments for a few fast CPU steps."""
    base = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(overrides)
    return base


def inner_optimizer(trainer):
    """The optimizer under accelerate's wrapper."""
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)


class LossProbeRule(Rule):
    """SGD that records the loss the engine gives it at each step (tests only)."""

    name = "lossprobe"
    class_name = "LossProbe"
    hyperparams = {"lr": HP(1e-3, low=0.0), "weight_decay": HP(0.0, low=0.0)}
    needs_loss = True
    seen: dict[int, float] = {}

    def update(self, ctx, p, g, s):
        step = ctx.steps[0]
        assert LossProbeRule.seen.setdefault(step, ctx.loss) == ctx.loss  # one loss per step, every bucket
        return g * 1.0


def lossprobe_entries() -> dict:
    """What to put into ``hfoptim.registry.RULES`` / ``CLASSES`` to make ``optim="lossprobe"`` exist."""
    return {"rule": LossProbeRule, "class": optimizer_class(LossProbeRule, "LossProbe")}
