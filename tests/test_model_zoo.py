"""Model zoo: tiny GPT-2 (Conv1D), BERT, T5, a GQA decoder (Qwen2), two fused-MoE models
(Mixtral, Qwen2-MoE) and ViT, built from configs (no hub), each with the main names for a few
steps: finite, tied weights still tied, save/load exact, estimate equal to the measurement."""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim.memory import estimate, state_bytes
from hfoptim.models import model_from_config

NAMES = ["adamw", "adamw_8bit", "adafactor", "ademamix", "adamw_gc", "adamw_shared", "amos", "nsgda", "lamb"]


def configs():
    import transformers as tf

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48}
    decoder = {**small, "vocab_size": 64, "num_key_value_heads": 2}
    return {
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16),
        "bert": tf.BertConfig(**small, vocab_size=64),
        "t5": tf.T5Config(d_model=32, d_ff=48, num_layers=1, num_heads=4, d_kv=8, vocab_size=64),
        "qwen2_gqa": tf.Qwen2Config(**decoder),
        "mixtral": tf.MixtralConfig(**decoder, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(**decoder, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
        "vit": tf.ViTConfig(**small, image_size=16, patch_size=8),
    }


def tied(model) -> list[tuple[str, str]]:
    seen, out = {}, []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.append((seen[id(p)], name))
        seen.setdefault(id(p), name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(configs()))
def test_zoo(model_name):
    torch.manual_seed(0)
    model = model_from_config(configs()[model_name])  # built once (the MoE models take seconds)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ties = tied(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for name in NAMES:
        model.load_state_dict(initial)
        opt = hfoptim.create_optimizer(model, name, lr=1e-3, state_min_numel=256, compile="off")
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        assert all(torch.isfinite(p).all() for p in params), f"{model_name} {name}: not finite"
        assert tied(model) == ties, f"{model_name} {name}: tied weights untied"
        measured = state_bytes(opt).total
        assert estimate(model, name, state_min_numel=256).total == measured, f"{model_name} {name}"
        fresh = hfoptim.create_optimizer(model, name, lr=1e-3, state_min_numel=256, compile="off")
        fresh.load_state_dict(opt.state_dict())
        for p in params:
            for key, value in opt.state[p].items():
                assert torch.equal(fresh.state[p][key], value), f"{model_name} {name}: {key} after load"
