"""hfoptim.memory: measured state bytes agree with the theory of each storage form, and the
estimate (meta device, nothing allocated) agrees exactly with the measurement."""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim import memory

BIG = (1024, 1024)


def _stepped(name: str, shapes, dtype=torch.float32, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt = hfoptim.create_optimizer(params, name, compile="off", **kwargs)
    if getattr(getattr(opt, "rule", None), "needs_loss", False):
        opt.step(loss=1.0)
    else:
        opt.step()
    return params, opt


@pytest.mark.parametrize(
    "name, bytes_per_param",
    [
        ("adamw", 8.0),  # two fp32 moments
        ("adamw_bf16", 4.0),  # two bf16 moments
        ("adamw_8bit", 2 * (1 + 4 / 256)),  # codes + one fp32 scale per 256
        ("ademamix", 12.0),
        ("ademamix_8bit", 3 * (1 + 4 / 256)),  # 3.046875: "about 3.06"
        ("adamw_4bit", 1 / 2 + 4 / 128 + 1 / 2 + 4 * 2048 / 1024**2),  # 1.0391: codes, 128-block and rank-1 scales
        ("ademamix_4bit", 2 * (1 / 2 + 4 / 128) + 1 / 2 + 4 * 2048 / 1024**2),
        ("ademamix_bf16", 6.0),
        ("adamw_lookahead", 12.0),  # + the fp32 slow weights
        ("adagl", 48.0),  # issue 16: m, v and 10 past gradients
        ("adagl_8bit", 12 * (1 + 4 / 256)),  # the history in 8 bits too
        ("muon", 4.0),  # one fp32 momentum per matrix
        ("muon_bf16", 2.0),
        ("muon_8bit", 1 + 4 / 256),
    ],
)
def test_measured_bytes_match_the_theory_on_a_large_matrix(name, bytes_per_param):
    """On a large 2-D tensor each form costs exactly its theory per parameter, plus the 4-byte
    step counter the parameter keeps (reported as kind 'counter')."""
    _, opt = _stepped(name, [BIG])
    report = memory.state_bytes(opt)
    n = BIG[0] * BIG[1]
    assert report.params == n
    assert report.by_kind["counter"] == 4
    assert report.per_param_without_counters == pytest.approx(bytes_per_param, abs=1e-12)
    assert report.per_param == pytest.approx(bytes_per_param + 4 / n, abs=1e-12)
    assert report.per_param == pytest.approx(bytes_per_param, abs=1e-5)


def test_breakdown_by_kind_and_key():
    _, opt = _stepped("ademamix_8bit", [BIG])
    report = memory.state_bytes(opt)
    n = BIG[0] * BIG[1]
    scales = n // 256 * 4
    assert report.by_key["exp_avg.codes"] == n and report.by_key["exp_avg.scale"] == scales
    assert report.by_kind == {"counter": 4, "first_moment": 2 * (n + scales), "second_moment": n + scales}
    assert "B/param" in report.table()


def test_lookahead_slow_weights_and_any_wrapper_are_counted():
    _, opt = _stepped("adamw_lookahead", [(64, 64)], dtype=torch.bfloat16)
    report = memory.state_bytes(opt)
    assert report.by_kind["wrapper"] == 64 * 64 * 4  # fp32 slow weights of bf16 parameters

    class Wrapper(torch.optim.Optimizer):  # a wrapper that is not Lookahead
        def __init__(self, inner):
            self.optimizer = inner
            self.extra = {"ema": [torch.zeros(10)]}

        @property
        def param_groups(self):
            return self.optimizer.param_groups

        @property
        def state(self):
            return self.optimizer.state

    _, inner = _stepped("adamw", [(32, 32)])
    wrapped = memory.state_bytes(Wrapper(inner))
    assert wrapped.total == memory.state_bytes(inner).total + 40
    assert wrapped.by_key["Wrapper.extra"] == 40


def test_torch_and_bitsandbytes_optimizers_are_measured_too():
    p = torch.nn.Parameter(torch.zeros(BIG))
    p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW([p])
    opt.step()
    report = memory.state_bytes(opt)
    assert report.per_param_without_counters == 8.0 and report.by_kind["counter"] == 4


SHAPES = [(300, 70), (4096,), (5000,), (7,), (3, 4, 5), (64, 256), (2, 3, 64, 64)]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("adamw", {}),
        ("adamw_8bit", {}),
        ("adamw_8bit", {"state_min_numel": 0}),
        ("ademamix_8bit", {"state_min_numel": 100}),
        ("adamw_4bit", {"state_min_numel": 0}),
        ("ademamix_4bit", {}),
        ("adan_bf16", {}),
        ("adamw_factored", {}),
        ("adamw_shared", {}),
        ("smmf", {}),
        ("adafactor", {}),
        ("ademamix_lookahead", {}),
        ("muon", {}),  # matrices one momentum, vectors AdamW's two moments
        ("muon_8bit", {"state_min_numel": 0}),
    ],
)
def test_estimate_equals_the_measurement(name, kwargs):
    params, opt = _stepped(name, SHAPES, **kwargs)
    measured = memory.state_bytes(opt)
    predicted = memory.estimate(params, name, **kwargs)
    assert predicted.total == measured.total
    assert predicted.by_key == measured.by_key
    assert predicted.by_kind == measured.by_kind
    assert predicted.params == measured.params


def test_estimate_from_a_transformers_config_allocates_nothing_and_matches_a_real_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    predicted = memory.estimate(config, "ademamix_8bit")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = hfoptim.create_optimizer(model, "ademamix_8bit", compile="off")
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = memory.state_bytes(opt)
    assert predicted.total == measured.total and predicted.by_key == measured.by_key
    assert predicted.params == sum(p.numel() for p in model.parameters())
    # the same estimate from the model itself, and from meta parameters of any size
    assert memory.estimate(model, "ademamix_8bit").total == measured.total
    assert memory.per_param("ademamix_8bit") == pytest.approx(3.046875, abs=1e-6)


@pytest.mark.parametrize("name", ["muon", "muon_8bit", "muon_bf16"])
def test_muon_estimate_from_a_config_follows_roles(name):
    """Muon over a model gives embeddings, head and norms AdamW's two moments: the estimate from
    the config equals the measurement after a real step of the model built by role."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    predicted = memory.estimate(config, name)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = hfoptim.create_optimizer(model, name)
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = memory.state_bytes(opt)
    assert predicted.total == measured.total and predicted.by_key == measured.by_key
    assert "exp_avg" in " ".join(predicted.by_key) and "momentum_buffer" in " ".join(predicted.by_key)
    # embeddings and head (2 x 512 x 64) keep two moments: more than one momentum per parameter
    embed_head = 2 * 512 * 64
    if name == "muon":
        assert measured.total >= 4 * predicted.params + 4 * embed_head


@pytest.mark.parametrize(
    "name", ["adamw_8bit", "adamw_4bit", "adafactor", "adamw_smmf", "ademamix_bf16", "adamw_swd", "adams_8bit"]
)
def test_optimizers_step_on_meta_parameters(name):
    """The memory benchmark steps meta copies of a model. Neither compressed state's non-finite
    check (on by default there) nor stable weight decay's mean second moment may read values
    (meta tensors have none): the step runs and creates its state on the meta device, and
    nothing is skipped."""
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(512, 256), (256,)]]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = hfoptim.create_optimizer(params, name, compile="off")
    opt.step()
    assert opt.nonfinite_skips == 0
    state = opt.state[params[0]]
    kept = [t for key, t in state.items() if key != "step" and isinstance(t, torch.Tensor)]
    assert kept and all(t.is_meta for t in kept)
