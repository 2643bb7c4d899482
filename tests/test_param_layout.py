"""Parameter layouts (hfoptim/core/param_layout.py): a transformers ``Conv1D`` weight ``(in, out)``
is stepped exactly as the same ``Linear`` weight ``(out, in)``, and a fused expert tensor
``(E, out, in)`` exactly as E separate ``Linear`` matrices, by every rule, storage form and
modifier (float64, both engine paths, non-default hyperparameters, parameters AND state).
Also: detection from transformers modules, declaration by name, the errors, empty state entries
on load, and ``memory.estimate`` for configs of every kind."""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim.core import param_layout
from hfoptim.core.param_layout import EXPERTS, IN_OUT, ParamLayout
from hfoptim.memory import estimate, state_bytes
from hfoptim.rules import RULES

E, OUT, IN = 3, 8, 300  # rows of 300: an 8-bit row ends in a short block
#: every rule with its own state, AdamW with every storage form and modifier, and a few combinations
NAMES = sorted(
    {
        *RULES,
        "lamb",
        *(f"adamw_{form}" for form in ("8bit", "bf16", "factored", "smmf", "shared")),
        *(f"adamw_{m}" for m in ("gc", "agc", "softclip", "cautious")),
        "ademamix_8bit",
        "adan_cautious_factored",
        "nsgda_gc",
    }
)


def options(name: str) -> dict:
    spec = hfoptim.get_optimizer(name)
    out = {"state_min_numel": 0, "weight_decay": 0.05}
    if spec.rule.name != "adalo":
        out["lr"] = 0.02
    if "agc" in name:
        out["agc"] = 0.05  # clips on these gradients
    return out


def step(opt, name: str, t: int) -> None:
    if hfoptim.get_optimizer(name).rule.needs_loss:
        opt.step(loss=2.0 / t)
    else:
        opt.step()


def grads(shape, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype in (torch.uint8, torch.int8, torch.bool):
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-12, atol=1e-13, msg=what)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_conv1d_steps_as_the_same_linear(name, foreach):
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lin = torch.nn.Parameter(w.clone())
    conv = torch.nn.Parameter(w.t().contiguous())
    ref = hfoptim.create_optimizer([lin], name, foreach=foreach, **options(name))
    opt = hfoptim.create_optimizer([conv], name, foreach=foreach, param_layouts={conv: IN_OUT}, **options(name))
    for t, g in enumerate(grads(w.shape), 1):
        lin.grad = g.clone()
        conv.grad = g.t().contiguous()
        before = conv.grad.clone()
        step(ref, name, t)
        step(opt, name, t)
        assert torch.equal(conv.grad, before), "p.grad was modified"
        close(conv.detach().t(), lin.detach(), f"{name} step {t}: parameter")
    assert set(opt.state[conv]) == set(ref.state[lin])
    for key, want in ref.state[lin].items():
        got = opt.state[conv][key]
        if got.shape != want.shape:  # an elementwise step keeps the state as the parameter is stored
            got = got.t()
        close(got, want, f"{name}: state {key}")


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_fused_experts_step_as_separate_matrices(name, foreach):
    w = torch.randn(E, OUT, IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seps = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
    fused = torch.nn.Parameter(w.clone())
    ref = hfoptim.create_optimizer(seps, name, foreach=foreach, **options(name))
    opt = hfoptim.create_optimizer([fused], name, foreach=foreach, param_layouts={fused: EXPERTS}, **options(name))
    for t, g in enumerate(grads(w.shape), 1):
        for e in range(E):
            seps[e].grad = g[e].clone()
        fused.grad = g.clone()
        step(ref, name, t)
        step(opt, name, t)
        for e in range(E):
            close(fused.detach()[e], seps[e].detach(), f"{name} step {t}: expert {e}")
    for key in ref.state[seps[0]]:
        stacked = opt.state[fused][key]
        for e in range(E):
            want = ref.state[seps[e]][key]
            got = stacked[e] if stacked.dim() > want.dim() else stacked  # elementwise: as stored
            close(got if got.shape == want.shape else stacked[e], want, f"{name}: state {key} of expert {e}")


def test_transposed_experts_and_save_load():
    """``(E, in, out)`` experts (``is_transposed`` modules): each expert as its transposed Linear;
    the stacked state round-trips through state_dict exactly."""
    w = torch.randn(E, OUT, IN, dtype=torch.float64)
    seps = [torch.nn.Parameter(w[e].clone()) for e in range(E)]
    fused = torch.nn.Parameter(w.transpose(1, 2).contiguous())
    ref = hfoptim.create_optimizer(seps, "adamw_gc_factored", lr=0.01, state_min_numel=0)
    opt = hfoptim.create_optimizer(
        [fused], "adamw_gc_factored", lr=0.01, state_min_numel=0, param_layouts={fused: "batch_in_out"}
    )
    for g in grads(w.shape):
        for e in range(E):
            seps[e].grad = g[e].clone()
        fused.grad = g.transpose(1, 2).contiguous()
        ref.step()
        opt.step()
    for e in range(E):
        close(fused.detach()[e].t(), seps[e].detach(), f"expert {e}")
    copy = torch.nn.Parameter(fused.detach().clone())
    fresh = hfoptim.create_optimizer(
        [copy], "adamw_gc_factored", lr=0.01, state_min_numel=0, param_layouts={copy: "batch_in_out"}
    )
    fresh.load_state_dict(opt.state_dict())
    assert all(torch.equal(fresh.state[copy][k], v) for k, v in opt.state[fused].items())
    assert opt.state[fused]["exp_avg_sq.row"].shape == (E, OUT)  # factored per expert, over (out, in)


# ---------------------------------------------------------------------------------- detection
def tiny(config_cls, **kw):
    from transformers import AutoModel, AutoModelForCausalLM

    config = config_cls(**kw)
    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError:
        return AutoModel.from_config(config)


def test_detect_conv1d_experts_and_vit():
    from transformers import GPT2Config, MixtralConfig, ViTConfig, ViTModel

    gpt2 = tiny(GPT2Config, n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    found = param_layout.detect(gpt2)
    assert found["transformer.h.0.attn.c_attn.weight"] == IN_OUT
    assert found["transformer.h.0.mlp.c_proj.weight"] == IN_OUT
    assert "transformer.h.0.attn.c_attn.bias" not in found and "transformer.wte.weight" not in found
    mixtral = tiny(
        MixtralConfig,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        vocab_size=50,
    )
    found = param_layout.detect(mixtral)
    assert found["model.layers.0.mlp.experts.gate_up_proj"] == EXPERTS
    assert found["model.layers.0.mlp.experts.down_proj"] == EXPERTS
    assert "model.layers.0.self_attn.q_proj.weight" not in found
    vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    found = param_layout.detect(vit)
    assert found["embeddings.position_embeddings"].batch == 1 and found["embeddings.cls_token"].batch == 1
    assert "embeddings.patch_embeddings.projection.weight" not in found  # a Conv2d: torch's layout


def test_create_optimizer_detects_and_factors_per_expert():
    from transformers import MixtralConfig

    model = tiny(
        MixtralConfig,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        vocab_size=50,
    )
    opt = hfoptim.create_optimizer(model, "adafactor")
    experts = model.model.layers[0].mlp.experts
    assert opt.layout_of(experts.gate_up_proj) == EXPERTS
    ids = torch.randint(0, 50, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state[experts.gate_up_proj]["exp_avg_sq.row"].shape == (4, 48)
    assert opt.state[experts.gate_up_proj]["exp_avg_sq.col"].shape == (4, 16)
    assert state_bytes(opt).total == estimate(model, "adafactor").total


def test_declared_by_name_and_errors():
    lin = torch.nn.Linear(5, 4)
    named = list(lin.named_parameters())
    w = lin.weight
    opt = hfoptim.AdamW(
        [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], param_layouts={"weight": "in_out"}
    )
    assert opt.layout_of(w).transposed
    with pytest.raises(ValueError, match="no parameter group holds"):
        hfoptim.AdamW([{"params": [w], "param_names": ["weight"]}], param_layouts={"wieght": "in_out"})
    with pytest.raises(ValueError, match="unknown parameter layout 'out-in'"):
        hfoptim.AdamW([w], param_layouts={w: "out-in"})
    with pytest.raises(ValueError, match="swaps"):
        hfoptim.AdamW([lin.bias], param_layouts={lin.bias: "in_out"})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        hfoptim.create_optimizer(lin, "adamw", param_layouts={"nope": "in_out"})
    with pytest.raises(ValueError, match="not among the parameters"):
        hfoptim.AdamW([w], param_layouts={torch.zeros(2, 2): "in_out"})
    assert ParamLayout(batch=1, transposed=True).spelling == "batch_in_out"
    # estimate maps declared tensors onto its meta copies: per-expert factoring of (3, 40, 50)
    experts = torch.nn.Parameter(torch.zeros(3, 40, 50))
    assert estimate([experts], "adafactor", param_layouts={experts: EXPERTS}).total == 3 * (40 + 50) * 4 + 3 * 4
    assert estimate([experts], "adafactor").total == (3 + 2000) * 4 + 4


# ---------------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "adafactor"])
def test_empty_state_entry_loads(name):
    """``optimizer.state[p]`` read before p's first step leaves ``{}``: saved and loaded as torch does."""
    a, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(8, 6))
    opt = hfoptim.create_optimizer([a, b], name, state_min_numel=0)
    a.grad = torch.randn(8, 6)
    opt.step()
    assert opt.state[b] == {}  # a read: torch's state is a defaultdict
    saved = opt.state_dict()
    fresh = hfoptim.create_optimizer([a, b], name, state_min_numel=0)
    fresh.load_state_dict(saved)
    assert all(torch.equal(fresh.state[a][k], v) for k, v in opt.state[a].items())
    b.grad = torch.randn(8, 6)
    fresh.step()  # b's state is created at its first step
    assert set(fresh.state[b]) == set(fresh.state[a])


# ---------------------------------------------------------------------------------- estimate
def test_estimate_builds_the_class_the_config_is_for():
    from transformers import BertConfig, T5Config, ViTConfig

    from hfoptim.models import model_class_for

    bert = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    vit = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert model_class_for(bert).__name__ == "AutoModel"  # not BertLMHeadModel
    assert model_class_for(t5).__name__ == "AutoModelForSeq2SeqLM"
    assert model_class_for(vit).__name__ == "AutoModelForImageClassification"
    for config in (bert, t5, vit):
        assert estimate(config, "adamw").total > 0
    from transformers import BertForMaskedLM

    with_head = estimate(bert, "adamw", model_class=BertForMaskedLM)
    assert with_head.params > estimate(bert, "adamw").params


def test_mixtral_8x7b_factored_state_per_expert():
    """Adafactor on Mixtral-8x7B factors each expert's (out, in) matrix, as transformers' own
    Adafactor: about 50 MiB of expert state instead of 21 GiB (a full out*in column per tensor)."""
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=2)  # Mixtral-8x7B's dimensions, 2 of its 32 layers
    report = estimate(config, "adafactor")
    h, f, n = config.hidden_size, config.intermediate_size, config.num_local_experts
    experts = 2 * n * ((2 * f + h) + (h + f)) * 4  # rows + columns of gate_up (2f, h) and down (h, f)
    assert experts < report.by_key["exp_avg_sq.row"] + report.by_key["exp_avg_sq.col"] < experts + 3 * 2**20
    assert report.total * 16 < 60 * 2**20  # all 32 layers: well under 60 MiB


# ---------------------------------------------------------------------------------- Trainer
def test_trainer_detects_layouts_and_takes_declarations(tmp_path):
    """The Trainer detects GPT-2's Conv1D weights; ``<selector>:layout=...`` in ``optim_args``
    overrides the detection; ``layout`` without a selector is refused at construction."""
    from transformers import GPT2Config

    from hfoptim import HFOptimTrainer, HFOptimTrainingArguments
    from hfoptim.integrations.transformers.optim_args import OptimArgsError
    from tests.trainer_setup import run_args

    def build(optim_args: str):
        model = tiny(GPT2Config, n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
        args = HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw_gc", optim_args=optim_args))
        return model, HFOptimTrainer(model=model, args=args).create_optimizer()

    model, opt = build("")
    attn = model.transformer.h[0].attn
    assert opt.layout_of(attn.c_attn.weight) == IN_OUT
    model, opt = build("c_attn:layout=out_in,weight_decay=0.0")
    attn = model.transformer.h[0].attn
    assert opt.layout_of(attn.c_attn.weight).is_default and opt.layout_of(attn.c_proj.weight) == IN_OUT
    with pytest.raises(OptimArgsError, match="needs a selector"):
        HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw", optim_args="layout=out_in"))
    with pytest.raises(OptimArgsError, match="unknown parameter layout"):
        HFOptimTrainingArguments(**run_args(tmp_path, optim="adamw", optim_args="c_attn:layout=sideways"))


def test_state_min_numel_is_decided_per_matrix():
    """Experts of 2000 elements under the 4096 threshold keep dense state, as 8 separate matrices
    of that size would, although the fused tensor (16000) is over it."""
    w = torch.randn(8, 40, 50, dtype=torch.float64)
    fused = torch.nn.Parameter(w.clone())
    seps = [torch.nn.Parameter(w[e].clone()) for e in range(8)]
    opt = hfoptim.create_optimizer([fused], "adamw_8bit", param_layouts={fused: EXPERTS})
    ref = hfoptim.create_optimizer(seps, "adamw_8bit")
    for g in grads(w.shape):
        fused.grad = g.clone()
        for e in range(8):
            seps[e].grad = g[e].clone()
        opt.step()
        ref.step()
    assert set(opt.state[fused]) == {"step", "exp_avg", "exp_avg_sq"} == set(ref.state[seps[0]])
    for e in range(8):
        close(fused.detach()[e], seps[e].detach(), f"expert {e}")
    assert estimate([fused], "adamw_8bit", param_layouts={fused: EXPERTS}).total == state_bytes(opt).total


def test_output_units_of_a_sharded_conv1d_are_split_like_fsdp2_shard0():
    """A sharded Conv1D weight is stepped over whole rows of ``(out, in)`` split like FSDP2's
    Shard(0), so its state exports as a Shard(0) DTensor of the canonical matrix that DCP
    reshards (tests/test_sharding_layouts.py runs the exchange itself)."""
    from torch.distributed.tensor import Shard

    from hfoptim.core.layout import split_rows

    for rows in range(0, 13):
        for world in range(1, 6):
            for rank in range(world):
                size, offset = Shard.local_shard_size_and_offset(rows, world, rank)
                start, stop = split_rows(rows, world, rank)
                assert stop - start == size, (rows, world, rank)
                if size:
                    assert start == offset, (rows, world, rank)
