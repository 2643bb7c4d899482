"""HFOptimTrainingArguments: names, typed optim_args, JSON / command-line round trips, errors.

No training here (see test_trainer_train.py): every check is on construction.
"""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from hfoptim import HFOptimTrainingArguments
from hfoptim.integrations.transformers import AUTO, DeepSpeedOptimizerConflict, OptimArgsError
from hfoptim.integrations.transformers.optim_args import format_optim_args, parse_optim_args


def make(**kw) -> HFOptimTrainingArguments:
    kw.setdefault("output_dir", "unused_out")
    return HFOptimTrainingArguments(use_cpu=True, report_to=[], **kw)


# ---------------------------------------------------------------- typed optim_args
def test_optim_args_are_typed():
    parsed = parse_optim_args(
        "betas=(0.9, 0.99,0.9999), eps=1e-7,alpha=5,nesterov=True,cautious=false,state=8bit,"
        "t_alpha=auto,agc=none,name='1',embeddings:state=fp32,lm_head:weight_decay=0"
    )
    assert parsed == {
        "betas": (0.9, 0.99, 0.9999),
        "eps": 1e-7,
        "alpha": 5,
        "nesterov": True,
        "cautious": False,
        "state": "8bit",
        "t_alpha": AUTO,
        "agc": None,
        "name": "1",
        "embeddings:state": "fp32",
        "lm_head:weight_decay": 0,
    }
    assert isinstance(parsed["alpha"], int) and isinstance(parsed["eps"], float)
    assert parse_optim_args({"betas": [0.9, 0.99], "eps": "1e-7", "t_alpha": "auto"}) == {
        "betas": (0.9, 0.99),
        "eps": 1e-7,
        "t_alpha": AUTO,
    }
    assert parse_optim_args(None) == {} and parse_optim_args("") == {}


scalars = st.one_of(
    st.booleans(),
    st.none(),
    st.just(AUTO),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text("abcxyz_89.-", min_size=1, max_size=6),
)
values = st.one_of(scalars, st.tuples(scalars, scalars), st.tuples(scalars, scalars, scalars))
keys = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, values, max_size=5))
def test_optim_args_format_then_parse_is_identity(d):
    assert parse_optim_args(format_optim_args(d)) == d


@pytest.mark.parametrize(
    "text, problem",
    [
        ("eps", "not key=value"),
        ("betas=(0.9,0.99", "unbalanced"),
        ("betas=0.9,0.99)", "unbalanced"),
        ("eps=1e-8,eps=1e-7", "given twice"),
        ("eps=1e-8,,lr=1", "empty entry"),
        ("betas=(0.9,,0.99)", "empty item"),
        ("1eps=3", "expected a name"),
    ],
)
def test_optim_args_syntax_errors_name_the_problem(text, problem):
    with pytest.raises(OptimArgsError, match=problem):
        make(optim="adamw", optim_args=text)


# ---------------------------------------------------------------- names
def test_hfoptim_name_is_stored_plain_with_canonical_typed_args():
    args = make(optim="ademamix", optim_args="betas=(0.9, 0.99, 0.9999), t_alpha=auto, eps=1e-7")
    assert args.optim == "ademamix" and args.optim_choice.is_hfoptim
    assert args.optim_args == "betas=(0.9,0.99,0.9999),t_alpha=auto,eps=1e-07"
    options, overrides = args.hfoptim_options
    assert options == {"betas": (0.9, 0.99, 0.9999), "t_alpha": AUTO, "eps": 1e-7} and overrides == []
    assert make(optim="hfoptim:adamw").optim == "adamw"


def test_dict_optim_args_are_stored_as_the_canonical_string():
    args = make(optim="adamw", optim_args={"betas": (0.8, 0.95), "nesterov": True, "embed_tokens:state": "fp32"})
    assert args.optim_args == "betas=(0.8,0.95),nesterov=true,embed_tokens:state=fp32"


def test_builtins_behave_as_in_transformers():
    ours, theirs = make(optim="adamw_torch"), TrainingArguments("unused_out", optim="adamw_torch", use_cpu=True)
    assert ours.optim is OptimizerNames.ADAMW_TORCH and ours.optim == theirs.optim
    kept = make(optim="adamw_anyprecision", optim_args="use_kahan_summation=true,momentum_dtype=float32")
    assert kept.optim_args == "use_kahan_summation=true,momentum_dtype=float32"  # untouched: transformers parses it
    assert make(optim=OptimizerNames.LOMO).optim is OptimizerNames.LOMO
    assert make().optim == TrainingArguments.default_optim


def test_shared_names_are_hfoptims_and_builtin_is_reachable_with_prefix():
    assert make(optim="ademamix").optim_choice.is_hfoptim
    builtin = make(optim="transformers:ademamix")
    assert builtin.optim == "transformers:ademamix"  # not "ademamix": a JSON round trip must not change it
    assert builtin.optim_choice.builtin is OptimizerNames.ADEMAMIX
    # an enum member is the built-in, stored with the prefix for the same reason
    assert make(optim=OptimizerNames.ADEMAMIX).optim == "transformers:ademamix"
    assert make(optim="transformers:adamw_torch").optim is OptimizerNames.ADAMW_TORCH


# ---------------------------------------------------------------- round trips
def test_json_round_trip():
    for optim, optim_args in [
        ("ademamix", "betas=(0.9,0.99,0.9999),t_alpha=auto,t_beta3=auto,embeddings:state=fp32"),
        ("transformers:ademamix", "alpha=5"),
        ("adamw_torch", None),
    ]:
        args = make(optim=optim, optim_args=optim_args, weight_decay=0.1)
        d = json.loads(args.to_json_string())
        (again,) = HfArgumentParser(HFOptimTrainingArguments).parse_dict(d)
        assert again.optim == args.optim and again.optim_args == args.optim_args
        assert json.loads(again.to_json_string()) == d


def test_command_line_flags():
    parser = HfArgumentParser(HFOptimTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir=unused_out",
            "--optim=adamw",
            "--optim_args=betas=(0.8,0.95), nesterov=true, embeddings:weight_decay=0",
            "--use_cpu",
            "--report_to=none",
        ]
    )
    assert args.optim == "adamw"
    assert args.hfoptim_options[0] == {"betas": (0.8, 0.95), "nesterov": True}
    assert args.optim_args == "betas=(0.8,0.95),nesterov=true,embeddings:weight_decay=0"
    (builtin,) = parser.parse_args_into_dataclasses(["--output_dir=o", "--optim=sgd", "--use_cpu"])
    assert builtin.optim is OptimizerNames.SGD
    with pytest.raises(ValueError, match="unknown optim='adamz'"):
        parser.parse_args_into_dataclasses(["--output_dir=o", "--optim=adamz", "--use_cpu"])


def test_set_optimizer_accepts_hfoptim_names():
    args = make().set_optimizer("adamw_nesterov", learning_rate=3e-4, weight_decay=0.05, args="eps=1e-7")
    assert args.optim == "adamw_nesterov" and args.optim_args == "eps=1e-07" and args.learning_rate == 3e-4
    with pytest.raises(OptimArgsError, match="unknown hyperparameter"):
        make().set_optimizer("adamw", args="epz=1")


# ---------------------------------------------------------------- errors at construction
def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ValueError) as info:
        make(optim="ademamx")
    msg = str(info.value)
    assert "unknown optim='ademamx'" in msg and "Did you mean: ademamix" in msg
    assert "bases" in msg and "adamw" in msg and "suffixes" in msg and "cautious" in msg  # hfoptim's names
    assert "adamw_torch_fused" in msg and "transformers:<name>" in msg  # transformers' built-ins
    with pytest.raises(ValueError, match="unknown optim='transformers:adamw'"):
        make(optim="transformers:adamw")  # not a built-in


def test_invalid_combination_says_why():
    with pytest.raises(ValueError, match="not a valid combination"):
        make(optim="nsgda_atan2")  # nSGDA has no second moment to divide by


@pytest.mark.parametrize(
    "optim, optim_args, problem",
    [
        ("adamw", "betaz=(0.9,0.99)", r"unknown hyperparameter\(s\) 'betaz' \(did you mean betas.*accepted: .*eps"),
        ("adamw", "eps=abc", r"invalid eps='abc': expected a number"),
        ("adamw", "nesterov=1", r"invalid nesterov=1: expected True or False"),
        ("ademamix", "betas=(0.9,0.99)", r"invalid betas=\(0.9, 0.99\): expected 3 numbers"),
        ("adamw", "betas=(0.9,1.5)", r"expected 2 numbers, each with 0.0 <= x < 1.0"),
        ("adamw", "lr=-1", r"invalid lr=-1"),
        ("adamw", "eps=auto", r"'auto' is accepted for t_alpha, t_beta3"),
        ("adamw", "params=1", r"params is not an optimizer option"),
        ("adamw", "embeddings:epz=1", r"unknown hyperparameter\(s\) 'epz'"),
        ("adamw", "*bad:state=fp32", r"neither 'embeddings' nor a regular expression"),
        ("adamw", "lookahead_k=5", r"need a '_lookahead' name"),
    ],
)
def test_bad_optim_args_fail_at_construction(optim, optim_args, problem):
    with pytest.raises(OptimArgsError, match=problem):
        make(optim=optim, optim_args=optim_args)


@pytest.mark.parametrize(
    "optim, optim_args, problem",
    [
        ("adamw_8bit", "state=bf16", r"state='bf16' contradicts the name 'adamw_8bit', which sets state='8bit'"),
        ("adamw_cautious", "cautious=false", r"cautious=False contradicts the name 'adamw_cautious'"),
        ("adamw_8bit", "state=auto", r"state='auto' contradicts the name 'adamw_8bit'"),
        ("adamw_agc", "agc=0", r"agc=0 contradicts the name 'adamw_agc'"),
    ],
)
def test_optim_args_contradicting_the_name_are_refused(optim, optim_args, problem):
    with pytest.raises(OptimArgsError, match=problem):
        make(optim=optim, optim_args=optim_args)
    # the same value is no contradiction; per-parameter entries may differ (documented)
    make(optim="adamw_8bit", optim_args="state=8bit,embeddings:state=fp32")


def test_optim_args_tune_the_strength_a_name_sets(caplog):
    """A name's numeric strength (AGC's clip, AdamW^2's tau) is tuned, not contradicted: logged."""
    with caplog.at_level(logging.INFO):
        make(optim="adamw_agc", optim_args="agc=0.05")
    assert "agc=0.05 over the 0.01 of the name 'adamw_agc'" in caplog.text


def test_auto_is_a_value_of_state_and_compile():
    args = make(optim="adamw", optim_args="compile=auto,state=auto,embeddings:state=auto")
    assert args.optim_args == "compile=auto,state=auto,embeddings:state=auto"
    assert args.hfoptim_options[0] == {"compile": AUTO, "state": AUTO}
    from hfoptim.integrations.transformers.plan import resolve_auto

    assert resolve_auto({"compile": AUTO, "state": AUTO}, None, "here") == {"compile": "auto", "state": "auto"}
    parser = HfArgumentParser(HFOptimTrainingArguments)
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused_out", "--use_cpu", "--optim", "adamw_8bit", "--optim_args", "compile=auto"]
    )
    assert parsed.optim_args == "compile=auto"


def test_deepspeed_optimizer_section_conflicts_with_an_hfoptim_name(tmp_path):
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for value in (config, str(path), json.dumps(config)):
        with pytest.raises(DeepSpeedOptimizerConflict, match="'optimizer' section") as info:
            make(optim="ademamix", deepspeed=value)
        assert "silently unused" in str(info.value) and "Remove the 'optimizer' section" in str(info.value)
    # without the section it is accepted; with a built-in, DeepSpeed's optimizer is transformers' business
    del config["optimizer"]
    assert make(optim="ademamix", deepspeed=config).optim == "ademamix"
    make(optim="adamw_torch", deepspeed={"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}})
