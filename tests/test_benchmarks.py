"""The benchmark scripts' own logic (no timing runs): parameter sets, paired ratios, the
report-section rewrite, state-byte walking, steps-to-target interpolation, candidate plans."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("_timing", "speed", "memory", "quality")}
    finally:
        sys.path.remove(str(BENCH))


def test_model_shapes_have_the_advertised_sizes(bench):
    shapes = bench["_timing"].MODEL_SHAPES
    for label, low, high in (("6M", 5e6, 8e6), ("25M", 20e6, 30e6), ("100M", 85e6, 115e6)):
        s = shapes[label]
        assert low <= s.numel <= high
        assert s.numel == sum(torch.Size(x).numel() for x in s.shapes())
    params = bench["_timing"].make_params(shapes["6M"])
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)


def test_paired_ratio_is_the_median_of_per_round_ratios(bench):
    paired = bench["_timing"].Paired(candidate=[2.0, 9.0, 3.0], baselines={"b": [1.0, 3.0, 1.0]})
    assert paired.ratio("b") == 3.0  # per round 2, 3, 3 (not 3.0 / 1.0 of the medians)
    assert paired.spread("b") == (2.0, 3.0)
    calls = {"a": 0, "b": 0}

    def step(key):
        def run():
            calls[key] += 1

        return run

    result = bench["_timing"].interleaved(step("a"), {"b": step("b")}, rounds=4, target_seconds=0.0)
    assert len(result.candidate) == 4 and len(result.baselines["b"]) == 4
    assert calls["a"] >= 4 and calls["b"] >= 4


def test_update_report_replaces_only_between_markers(bench, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("intro\n<!-- speed:begin -->\nold\n<!-- speed:end -->\noutro\n")
    assert bench["_timing"].update_report("speed", "new table", report)
    assert report.read_text() == "intro\n<!-- speed:begin -->\nnew table\n<!-- speed:end -->\noutro\n"
    assert not bench["_timing"].update_report("quality", "x", report)
    assert not bench["_timing"].update_report("speed", "x", tmp_path / "missing.md")


def test_tensor_bytes_counts_each_tensor_once(bench):
    a = torch.zeros(10, dtype=torch.float32)
    b = torch.zeros(4, dtype=torch.uint8)
    state = {"p1": {"m": a, "codes": b, "step": torch.tensor(1.0)}, "p2": {"shared": a, "nested": [b, (a,)]}}
    assert bench["memory"].tensor_bytes(state, set()) == 40 + 4 + 4


def test_peer_state_bytes_of_torch_adamw_is_8_bytes_per_parameter(bench):
    p = torch.nn.Parameter(torch.zeros(64, 64))
    p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW([p])
    opt.step()
    # exp_avg + exp_avg_sq (fp32) + the 0-d step counter
    assert bench["memory"].peer_state_bytes(opt) == 2 * 4 * p.numel() + 4


def test_first_reach_interpolates_between_evaluations(bench):
    quality = bench["quality"]
    run = quality.Run("x", 0, eval_steps=[10, 20, 30], eval_loss=[5.0, 4.0, 3.0])
    assert quality.first_reach(run, 4.5) == pytest.approx(15.0)
    assert quality.first_reach(run, 5.0) == 10.0
    assert quality.first_reach(run, 2.0) is None


def test_plans_bound_the_large_sizes(bench):
    speed = bench["speed"]
    everything = speed.hfoptim_candidates() + speed.peer_candidates()
    labels = {c.label for c in everything}
    assert {"adamw", "ademamix", "adan", "torch AdamW fused"} <= labels
    big = speed.plan("100M", everything, quick=False)
    assert big and all(c.algorithm in speed.CORE for c in big)
    assert len(speed.plan("6M", everything, quick=False)) == len(everything)
    assert all(c.label in speed.QUICK for c in speed.plan("6M", everything, quick=True))
