"""The benchmark scripts' own logic (no timing runs): parameter sets, paired ratios, the
report-section rewrite, state-byte walking, steps-to-target interpolation, candidate plans."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        names = ("_timing", "speed", "memory", "quality", "summary", "_study", "_finetune")
        yield {name: importlib.import_module(name) for name in names}
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
    assert calls == {"a": 4, "b": 4}  # one step per sample and no calibration call at target 0
    # a budget smaller than one round keeps min_rounds, judged by the first round
    result = bench["_timing"].interleaved(step("a"), {"b": step("b")}, 9, 0.0, budget_seconds=0.0, min_rounds=3)
    assert len(result.candidate) == 3 and calls == {"a": 7, "b": 7}
    result = bench["_timing"].interleaved(step("a"), {"b": step("b")}, 5, 1e-3, budget_seconds=1e3)
    assert len(result.candidate) == 5 and calls["a"] >= 7 + 1 + 5  # a calibration call, then 5 samples


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


def test_uncompiled_hands_back_the_function_and_restores_torch_compile(bench):
    def fn(x):
        return x + 1

    original = torch.compile
    with bench["memory"].uncompiled():
        assert torch.compile(fn, fullgraph=True, dynamic=False) is fn
    assert torch.compile is original


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
    big_labels = {c.label for c in big}
    # the dense rules of the speed targets on both paths at every size, next to torch's fused and
    # compiled AdamW
    both = {*speed.BOTH_PATHS, *(name + " compile=off" for name in speed.BOTH_PATHS)}
    assert both | {"torch AdamW fused", "torch AdamW compiled"} <= big_labels
    assert all(c.algorithm in {*speed.CORE, *speed.BOTH_PATHS} for c in big)
    small = {c.label for c in speed.plan("6M", everything, quick=False)}
    assert small == labels - set(speed.NOT_AT_6M)
    assert both | {"adamw_8bit", "adamw_8bit compile=off", "adamw_bf16", "lamb_smmf compile=off"} <= small
    # every other dense name on the plain path only (each compiled name costs compilations)
    assert "nadamw compile=off" in small and "nadamw" not in small
    assert all(c.label in speed.QUICK for c in speed.plan("6M", everything, quick=True))
    mid = {c.label for c in speed.plan("25M", everything, quick=False)}
    assert both <= mid
    assert {"adamw_8bit", "ademamix_8bit", "adan_8bit", "adamw_smmf compile=off", "adan_factored compile=off"} <= mid
    assert {"torch AdamW compiled", "pytorch_optimizer Lamb", "pytorch_optimizer DiffGrad"} <= mid
    assert not any(label.startswith(("lamb_", "adamw_bf16")) or label == "adamw_8bit compile=off" for label in mid)
    # every 8-bit form is timed at two sizes at least (the scaling table and plot need two)
    for name in ("adamw_8bit", "ademamix_8bit", "adan_8bit"):
        assert name in mid and name in {c.label for c in big}


def test_low_bit_table_shows_the_8bit_rows_and_their_dense_twins_at_every_size(bench):
    speed = bench["speed"]

    def row(size, label, library, algorithm, state, ratio):
        return speed.asdict(speed.Row(size, 10**6, label, library, algorithm, state, ratio_foreach=ratio))

    rows = [
        row("6M", "torch AdamW foreach", "torch", "adamw", "fp32", 1.0),
        row("6M", "adamw_8bit", "hfoptim", "adamw", "8bit", 1.5),
        row("25M", "adamw_8bit", "hfoptim", "adamw", "8bit", 1.4),
        row("6M", "lamb", "hfoptim", "lamb", "default", 2.0),
        row("6M", "torchao AdamW4bit", "torchao", "adamw", "4bit", 9.0),
    ]
    text = speed.markdown_8bit({"rows": rows, "sizes": ["6M", "25M"], "command": "python benchmarks/speed.py"})
    assert "| adamw_8bit | hfoptim | 8bit | 1.50 | 1.40 |" in text
    assert "| torchao AdamW4bit | torchao | 4bit | 9.00 |  |" in text
    assert "| torch AdamW foreach |" in text and "lamb" not in text


def test_quality_compares_each_form_with_its_fp32_twin_paired_by_seed(bench):
    quality = bench["quality"]
    runs = [
        quality.Run("adamw", 0, eval_steps=[10], eval_loss=[4.0], state_bytes=8, num_params=1),
        quality.Run("adamw", 1, eval_steps=[10], eval_loss=[5.0], state_bytes=8, num_params=1),
        quality.Run("adamw_smmf", 0, eval_steps=[10], eval_loss=[4.2], state_bytes=1, num_params=1),
        quality.Run("adamw_smmf", 1, eval_steps=[10], eval_loss=[5.0], state_bytes=1, num_params=1),
        quality.Run("adamw_8bit", 0, eval_steps=[10], eval_loss=[4.0], state_bytes=2, num_params=1),
    ]
    rows = {r["name"]: r for r in quality.summarize(runs, ["adamw", "adamw_smmf", "adamw_8bit"])}
    assert "vs_twin" not in rows["adamw"]
    assert rows["adamw_smmf"]["twin"] == "adamw" and rows["adamw_smmf"]["bar"] == 0.03
    assert rows["adamw_smmf"]["vs_twin"] == pytest.approx((0.05 + 0.0) / 2)  # per seed, then the mean
    assert rows["adamw_8bit"]["bar"] == 0.01 and rows["adamw_8bit"]["vs_twin"] == pytest.approx(0.0)
    assert quality.twin_of("ademamix_factored") == ("ademamix", 0.03) and quality.twin_of("adan") is None


def test_summary_table_reads_each_result_file_by_label(bench, tmp_path):
    import json

    machine = {"cpu": "cpu", "cores": 2, "torch": "2", "git_commit": "abc", "load_average_1_5_15": [1.0, 1, 1]}
    rows = [
        {"size": "25M", "label": "torch AdamW foreach", "ratio_foreach": 1.0},
        {"size": "25M", "label": "adamw_8bit", "ratio_foreach": 1.5},
        {"size": "100M", "label": "adamw_8bit", "ratio_foreach": 1.4},
        {"size": "25M", "label": "lamb", "ratio_foreach": 0.5},
        {"size": "25M", "label": "lamb compile=off", "ratio_foreach": 1.1},
        {"size": "100M", "label": "lamb compile=off", "ratio_foreach": 1.2},
    ]
    (tmp_path / "speed.json").write_text(json.dumps({"machine": machine, "rows": rows}))
    memory = {"hfoptim": [{"name": "adamw_8bit", "bytes_per_param": 2.03}], "peers": []}
    memory["peers"].append({"name": "torch AdamW", "bytes_per_param": 8.0})
    (tmp_path / "memory.json").write_text(json.dumps({"machine": machine, **memory}))
    summary = [{"name": "adamw_8bit", "final_mean": 4.5, "final_std": 0.1, "vs_twin": -0.002}]
    (tmp_path / "quality.json").write_text(json.dumps({"machine": machine, "seeds": [0, 1, 2], "summary": summary}))
    text = bench["summary"].table(tmp_path)
    assert "| torch AdamW (foreach) | 8.00 | 1.00x |  |  |  |" in text
    assert "| adamw_8bit | 2.03 | 1.50x | 1.40x | 4.500 ± 0.100 | -0.2% |" in text
    assert "| adan |  |  |  |  |  |" in text  # in no result file: an empty row
    assert "| lamb |  | 0.50x (1.10x) |  (1.20x) |  |  |" in text  # the plain path in brackets
    assert "hfoptim abc" in text and "final val loss (3 seeds)" in text
    assert "steady allocator" not in text
    # speed timed with glibc's heap kept (speed.py's default) says so, on one machine or several
    steady = dict(machine, malloc_env=bench["_timing"].STEADY_ALLOCATOR_ENV)
    (tmp_path / "speed.json").write_text(json.dumps({"machine": steady, "rows": rows}))
    assert "; speed with a steady allocator." in bench["summary"].table(tmp_path)
    (tmp_path / "speed.json").write_text(json.dumps({"machine": dict(steady, cpu="other"), "rows": rows}))
    assert "speed on other (2 cores, torch 2, hfoptim abc, load 1.0, steady allocator)" in bench["summary"].table(
        tmp_path
    )
    # one model name, two kinds of CPU: the vector extensions tell them apart, and each column says its own
    (tmp_path / "speed.json").write_text(json.dumps({"machine": dict(steady, vector_flags=["avx2"]), "rows": rows}))
    text = bench["summary"].table(tmp_path)
    assert "speed on cpu (lscpu flags: avx2) (2 cores" in text and "memory on cpu (2 cores" in text
    for name in ("memory", "quality"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(record, machine=dict(machine, vector_flags=["avx2"]))))
    assert "Machine: cpu (lscpu flags: avx2), 2 cores" in bench["summary"].table(tmp_path)


# ---------------------------------------------------------------------------------------- tuned studies
def test_study_grids_span_10x_around_each_centre_and_unknown_names_are_skipped_with_a_note(bench):
    study = bench["_study"]
    assert set(bench["quality"].STUDY_NAMES) >= {"adamw", "ademamix", "adan", "adafactor", "lamb", "amos", "nsgda"}
    assert {"smmf", "adamw_8bit", "adamw_factored", "ademamix_8bit", "ademamix_factored", "muon"} <= set(study.CENTRES)
    for name in study.CENTRES:
        lrs = study.grid(name, study.LR_FACTORS)
        assert len(lrs) >= 4 and lrs == sorted(lrs) and lrs[-1] / lrs[0] >= 10 * 0.99
        assert min(lrs) < study.CENTRES[name] < max(lrs)
    assert set(bench["_finetune"].NAMES) <= set(study.CENTRES)
    with pytest.raises(ValueError, match="add it to study.CENTRES"):
        study.grid("no_such_rule", study.LR_FACTORS)
    notes = []
    assert study.available(["adamw", "sm3", "adan"], {"adamw", "adan"}.__contains__, notes.append) == ["adamw", "adan"]
    assert notes == ["note: 'sm3' is not in this hfoptim's registry yet; skipped"]


def _run(name, phase, lr, seed, losses, error=None):
    return {"name": name, "phase": phase, "lr": lr, "seed": seed, "eval_steps": [10, 20, 30][: len(losses)],
            "eval_loss": losses, "error": error, "seconds": 1.0}  # fmt: skip


def test_study_picks_the_best_sweep_lr_and_compares_best_against_best_paired_by_seed(bench):
    study = bench["_study"]
    runs = [
        _run("adamw", "sweep", 1e-3, 0, [5.0, 4.0, 3.5]),
        _run("adamw", "sweep", 3e-3, 0, [5.0, 4.0, 3.0]),
        _run("adan", "sweep", 1e-3, 0, [5.0, 4.0, 3.2]),
        _run("adan", "sweep", 3e-3, 0, [], error="FloatingPointError: loss became nan"),  # counts as worst
        _run("adan", "sweep", 9e-3, 0, [5.0, 4.0, float("nan")]),
    ]
    assert study.best_lrs(runs) == {"adamw": 3e-3, "adan": 1e-3}
    runs += [
        _run("adamw", "seed", 3e-3, 0, [5.0, 4.0, 3.0]),
        _run("adamw", "seed", 3e-3, 1, [5.0, 4.0, 3.2]),
        _run("adan", "seed", 1e-3, 0, [5.0, 3.0, 2.8]),
        _run("adan", "seed", 1e-3, 1, [4.0, 3.6, 3.4]),
    ]
    rows = {r["name"]: r for r in study.summarize(runs, ["adamw", "adan"])}
    assert rows["adamw"]["lr"] == 3e-3 and rows["adamw"]["at_edge"]  # the top of its grid
    assert rows["adan"]["lr"] == 1e-3 and rows["adan"]["at_edge"]
    assert rows["adan"]["sweep"] == [[1e-3, 3.2], [3e-3, None], [9e-3, None]]
    assert rows["adan"]["final_mean"] == pytest.approx(3.1) and rows["adan"]["final_std"] == pytest.approx(0.4243, 1e-3)
    assert rows["adan"]["diff_vs_reference"] == pytest.approx(((2.8 - 3.0) + (3.4 - 3.2)) / 2)
    # seed 0 reaches adamw's 3.0 between steps 10 (5.0) and 20 (3.0): at 20; seed 1 never reaches 3.2
    assert rows["adan"]["steps_to_reference"] == [20.0, None]


def _fake_run(name: str, seed: int, steps: int, final: float, seconds: float = 1.0) -> dict:
    """What a study's training function returns, for a run that ends at ``final``."""
    return {"name": name, "seed": seed, "eval_steps": [steps], "eval_loss": [final], "error": None, "seconds": seconds}


def test_an_interrupted_study_resumes_from_its_journal_and_refuses_one_of_other_settings(bench, tmp_path):
    import argparse

    study = bench["_study"]
    args = argparse.Namespace(workers=0, seeds=[0, 1], steps=8, sweep_steps=4, lr=1e-3, batch_size=2)
    plan = {"adamw": [1e-3, 3e-3], "adan": [1e-3]}
    calls = []

    def train(name, seed, job, fail_at=None):
        calls.append((name, job.lr, seed, job.steps))
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # the study killed in the middle of its seed phase
        return _fake_run(name, seed, job.steps, {1e-3: 3.0, 3e-3: 2.5}[job.lr] + seed / 10, seconds=2.0)

    journal_path = tmp_path / "study.journal.jsonl"
    with pytest.raises(KeyboardInterrupt):
        study.run_study(
            plan,
            args,
            lambda *a: train(*a, fail_at=5),
            lambda: None,
            (),
            print,
            study.Journal(journal_path, args),
            edge_steps=0,
        )
    assert len(journal_path.read_text().splitlines()) == 1 + 4  # the settings, the 3 sweep runs and 1 seed run
    interrupted = list(calls)
    calls.clear()
    journal = study.Journal(journal_path, args)
    assert len(journal.done) == 4
    runs = study.run_study(plan, args, train, lambda: None, (), print, journal, edge_steps=0)
    # only the runs the journal lacks are trained again, and the result is the uninterrupted one's
    assert calls == [("adamw", 3e-3, 1, 8), ("adan", 1e-3, 0, 8), ("adan", 1e-3, 1, 8)] and interrupted[4] == calls[0]
    calls.clear()
    fresh = study.run_study(plan, args, train, lambda: None, (), print, edge_steps=0)
    assert runs == fresh and len(calls) == 7
    record = {"runs": runs, "resumed_runs": 4}
    assert study._resumed(record) == (
        "; resumed: 4 of its 7 runs came from the journal of an interrupted earlier invocation, 0 worker-minutes "
        f"of training in all; runs per hfoptim commit: {bench['_timing'].GIT_COMMIT} 7"
    )
    assert study._resumed({"runs": runs}) == ""
    # the number of workers may change between invocations; the protocol may not
    assert len(study.Journal(journal_path, argparse.Namespace(**{**vars(args), "workers": 2})).done) == 7
    with pytest.raises(SystemExit, match=r"other settings \(steps\).*delete it to start over"):
        study.Journal(journal_path, argparse.Namespace(**{**vars(args), "steps": 9}))


def test_a_sweep_whose_best_lr_is_at_an_end_of_its_grid_goes_on_past_it_and_resumes_from_its_journal(bench, tmp_path):
    import argparse

    study = bench["_study"]
    args = argparse.Namespace(workers=0, seeds=[0], steps=8, sweep_steps=4, lr=1e-3, batch_size=2)
    # adamw improves up to 0.004 and worsens past it; adan only gets worse with a larger lr;
    # lamb keeps improving (it stops after edge_steps more); nsgda has one lr (no ratio to step by)
    optimum = {"adamw": 4e-3, "adan": 1e-5, "lamb": 1.0, "nsgda": 1.0}
    plan = {"adamw": [1e-3, 2e-3], "adan": [1e-3, 2e-3], "lamb": [1e-3, 2e-3], "nsgda": [1e-3]}
    calls = []

    def train(name, seed, job):
        calls.append((name, job.lr))
        return _fake_run(name, seed, job.steps, 3.0 + abs(math.log(job.lr / optimum[name])))

    journal = study.Journal(tmp_path / "study.journal.jsonl", args)
    runs = study.run_study(plan, args, train, lambda: None, (), print, journal, edge_steps=2)
    swept = {name: sorted(r["lr"] for r in runs if r["phase"] == "sweep" and r["name"] == name) for name in plan}
    assert swept == {
        "adamw": [1e-3, 2e-3, 4e-3, 8e-3],  # 4e-3 beat 2e-3, 8e-3 lost to it: the best is inside
        "adan": [2.5e-4, 5e-4, 1e-3, 2e-3],  # best at the smallest lr each time: two steps down
        "lamb": [1e-3, 2e-3, 4e-3, 8e-3],  # still improving after 2 steps up: stays at the end
        "nsgda": [1e-3],
    }
    best = {r["name"]: r["lr"] for r in runs if r["phase"] == "seed"}
    assert best == {"adamw": 4e-3, "adan": 2.5e-4, "lamb": 8e-3, "nsgda": 1e-3}
    rows = {row["name"]: row for row in study.summarize(runs, list(plan))}
    assert not rows["adamw"]["at_edge"] and rows["lamb"]["at_edge"] and rows["adan"]["at_edge"]
    # the runs past the ends are journaled like the grid's: a second invocation trains nothing
    calls.clear()
    again = study.run_study(plan, args, train, lambda: None, (), print, study.Journal(journal.path, args), edge_steps=2)
    assert calls == [] and again == runs
    text = study.markdown(
        {
            "args": {**vars(args), "workers": 0},
            "machine": bench["_timing"].machine_info(),
            "command": "c",
            "elapsed_s": 0.0,
            "factors": [1, 2],
            "edge_steps": 2,
            "summary": [rows["lamb"]],
        },
        "t",
        [],
    )
    assert "one more run a grid step past it, up to 2 more" in text and "| lamb | 0.008 (edge) |" in text


def _smoke_args(tmp_path):
    return ["--smoke", "--workers", "0", "--output-dir", str(tmp_path), "--batch-size", "2"]


def test_quality_study_smoke_runs_end_to_end_and_its_tables_regenerate_byte_for_byte(bench, tmp_path, capsys):
    import json

    quality, threads = bench["quality"], torch.get_num_threads()
    try:
        args = ["--study", *_smoke_args(tmp_path), "--names", "adamw", "adamw_8bit", "no_such_rule"]
        assert quality.main([*args, "--block-size", "32", "--eval-blocks", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "'no_such_rule' is not in this hfoptim's registry yet; skipped" in capsys.readouterr().err
    record = json.loads((tmp_path / "quality_study_smoke.json").read_text())
    assert record["machine"]["cpu"] and record["machine"]["git_commit"]
    runs = record["runs"]
    assert [(r["phase"], r["name"]) for r in runs] == [
        ("sweep", "adamw"), ("sweep", "adamw"), ("sweep", "adamw_8bit"), ("sweep", "adamw_8bit"),
        ("seed", "adamw"), ("seed", "adamw_8bit"),
    ]  # fmt: skip
    assert all(r["error"] is None and len(r["eval_loss"]) == 2 and r["steps"] == list(range(1, 7)) for r in runs)
    assert {r["lr"] for r in runs if r["name"] == "adamw" and r["phase"] == "sweep"} == {7.5e-4, 3e-3}
    rows = {r["name"]: r for r in record["summary"]}
    assert rows["adamw_8bit"]["twin"] == "adamw" and "vs_twin" in rows["adamw_8bit"]
    md = tmp_path / "quality_study_smoke.md"
    before = md.read_bytes()
    assert "| adamw_8bit |" in before.decode() and (tmp_path / "quality_study_smoke_curves.png").stat().st_size
    md.unlink()
    assert quality.main(["--tables-only", "--smoke", "--output-dir", str(tmp_path)]) == 0
    assert md.read_bytes() == before
    # the README headline takes its quality column from the tuned study
    (tmp_path / "quality_study.json").write_text((tmp_path / "quality_study_smoke.json").read_text())
    headline = bench["summary"].table(tmp_path)
    assert "final val loss (1 seeds, each at its best lr)" in headline
    mean, sd = rows["adamw"]["final_mean"], rows["adamw"]["final_std"]
    assert f"| adamw |  |  |  | {mean:.3f} ± {sd:.3f} |  |" in headline


def test_finetune_smoke_pretrains_the_base_once_and_its_tables_regenerate_byte_for_byte(bench, tmp_path, capsys):
    import json

    quality, finetune, threads = bench["quality"], bench["_finetune"], torch.get_num_threads()
    base = tmp_path / "base"
    small = [*_smoke_args(tmp_path), "--names", "adamw", "--pretrain-steps", "2", "--cache-dir", str(base)]
    small += ["--max-seq-length", "48", "--eval-examples", "4", "--block-size", "32", "--eval-blocks", "4"]
    try:
        assert finetune.main(small) == 0
        assert "pretraining into" in capsys.readouterr().err
        assert finetune.main([*small, "--estimate-only"]) == 0
        assert "(cached)" in capsys.readouterr().err  # the second command reuses the base
    finally:
        torch.set_num_threads(threads)
    assert len(list(base.iterdir())) == 1
    record = json.loads((tmp_path / "finetune_smoke.json").read_text())
    assert set(record["modes"]) == {"full", "lora"} and record["machine"]["git_commit"]
    for mode, scale in (("full", 1 / 3), ("lora", 1.0)):
        runs = record["modes"][mode]["runs"]
        assert [r["phase"] for r in runs] == ["sweep", "sweep", "seed"] and all(r["error"] is None for r in runs)
        assert sorted(r["lr"] for r in runs[:2]) == bench["_study"].grid("adamw", (0.5 * scale, 2.0 * scale))
    lora, full = record["modes"]["lora"]["runs"][0], record["modes"]["full"]["runs"][0]
    assert lora["num_params"] < full["num_params"] / 5  # LoRA trains the adapters only
    md = tmp_path / "finetune_smoke.md"
    before = md.read_bytes()
    assert b"## LoRA" in before and b"## Full fine-tuning" in before
    md.unlink()
    assert finetune.main(["--tables-only", "--smoke", "--output-dir", str(tmp_path)]) == 0
    assert md.read_bytes() == before
    # quality.py --finetune hands its other arguments to the fine-tuning script
    calls = []
    original = quality.subprocess.call
    quality.subprocess.call = lambda cmd: calls.append(cmd) or 0
    try:
        assert quality.main(["--finetune", "--smoke"]) == 0
    finally:
        quality.subprocess.call = original
    assert calls[0][1].endswith("_finetune.py") and calls[0][2:] == ["--smoke"]


def test_muon_runs_as_users_run_it_in_the_speed_and_quality_benchmarks(bench):
    """Speed: hidden matrices Muon, the embedding and norms AdamW, in hfoptim's ``muon`` and in its
    torch peer (torch.optim.Muon + AdamW on the same split); quality: the roles of
    ``hfoptim.roles`` with the other runs' weight-decay split."""
    speed, quality = bench["speed"], bench["quality"]
    everything = {c.label: c for c in speed.hfoptim_candidates() + speed.peer_candidates()}
    for size in ("6M", "25M"):
        assert set(speed.MUON) <= {c.label for c in speed.plan(size, list(everything.values()), quick=False)}
    shape = speed.MODEL_SHAPES["6M"].__class__("t", vocab=64, hidden=16, layers=1, intermediate=24)
    params = speed.make_params(shape)
    hfo = everything["muon"].build(params)
    assert [(g["algorithm"], len(g["params"])) for g in hfo.param_groups] == [("muon", 7), ("adamw", 4)]
    assert hfo.param_groups[1]["params"][0] is params[0]  # the embedding
    peer = everything[speed.TORCH_MUON].build(params)
    assert len(peer.muon.param_groups[0]["params"]) == 7 and peer.adamw.param_groups[0]["params"][0] is params[0]
    before = [p.detach().clone() for p in params]
    hfo.step()
    peer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))

    from hfoptim import models

    model = models.model_from_config(models.tiny_llama_config(vocab_size=64, max_position_embeddings=32))
    groups = quality.muon_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = [
        (g["algorithm"], g["weight_decay"], sorted(names[id(p)].split(".")[-2] for p in g["params"])) for g in groups
    ]
    assert kinds[0][:2] == ("muon", 0.1) and "embed_tokens" not in kinds[0][2] and "q_proj" in kinds[0][2]
    assert kinds[1] == ("adamw", 0.1, ["embed_tokens"])
    assert kinds[2][:2] == ("adamw", 0.0) and all("norm" in n for n in kinds[2][2])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # no decay (the fine-tuning study): still split by shape, each parameter once
    undecayed = quality.muon_groups(model, 0.0)
    shape_of = [(g["algorithm"], len(g["params"])) for g in groups]
    assert [(g["algorithm"], len(g["params"])) for g in undecayed] == shape_of
    # frozen parameters (LoRA's base) are left out
    for p in model.model.norm.parameters():
        p.requires_grad_(False)
    frozen = quality.muon_groups(model, 0.1)
    assert sum(len(g["params"]) for g in frozen) == sum(p.requires_grad for p in model.parameters())


def test_quality_preset_runs_end_to_end_and_its_tables_regenerate_byte_for_byte(bench, tmp_path):
    import json

    quality, threads = bench["quality"], torch.get_num_threads()
    args = ["--preset", "muon", "--seeds", "0", "--steps", "4", "--evals", "2", "--workers", "0"]
    args += ["--output-dir", str(tmp_path), "--batch-size", "2", "--block-size", "32", "--eval-blocks", "4"]
    try:
        assert quality.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    md = tmp_path / "quality_muon.md"
    before = md.read_bytes()
    assert "Muon against AdamW, Training quality" in before.decode()
    assert "| muon | " in before.decode() and (tmp_path / "quality_muon_curves.png").stat().st_size
    md.unlink()
    assert quality.main(["--preset", "muon", "--tables-only", "--output-dir", str(tmp_path)]) == 0
    assert md.read_bytes() == before
    with pytest.raises(SystemExit, match="--names with --preset needs --merge"):
        quality.main(["--preset", "4bit", "--names", "adamw"])
    # --merge trains only the names given and pairs them with the file's AdamW runs
    first = json.loads((tmp_path / "quality_muon.json").read_text())
    with pytest.raises(SystemExit, match="other steps"):
        quality.main([*args[:4], "--merge", "--names", "muon", "--steps", "5", *args[6:]])
    try:
        assert quality.main([*args, "--merge", "--names", "muon"]) == 0
    finally:
        torch.set_num_threads(threads)
    merged = json.loads((tmp_path / "quality_muon.json").read_text())
    assert [(r["name"], r["seed"]) for r in merged["runs"]] == [("adamw", 0), ("muon", 0)]
    assert merged["runs"][0] == first["runs"][0]  # AdamW not retrained
    assert merged["runs"][1]["eval_loss"] == first["runs"][1]["eval_loss"]  # deterministic per seed
    assert "it trained muon, the other runs are from `python benchmarks/quality.py --preset muon" in md.read_text()


def test_muon_exchange_bytes_count_the_rows_that_travel_to_each_owner_and_back(bench):
    sys.path.insert(0, str(BENCH))
    try:
        sharding = importlib.import_module("sharding_overhead")
    finally:
        sys.path.remove(str(BENCH))
    # two matrices of 12 and 8 elements over 2 processes: the first split 6/6, the second whole
    # on process 1; the first's owner holds 6, so 6 elements go to it and 6 come back
    spans = torch.tensor([[[0, 6], [0, 0]], [[6, 12], [12, 20]]])
    assert sharding.exchange_bytes([spans], 2) == (2 * 6 * 2, 1 * 20 * 2)
    # every matrix whole on one process: no exchange at all
    whole = torch.tensor([[[0, 12], [0, 0]], [[0, 0], [12, 20]]])
    assert sharding.exchange_bytes([whole], 4) == (0, 20 * 4)


def test_layouts_benchmark_sees_a_step_temporary_and_lists_every_row(tmp_path):
    """benchmarks/layouts.py: the high-water-mark reading counts a step's temporary (memory the
    allocator kept from an earlier step does not hide it), and the table has a row per result,
    refusals included."""
    sys.path.insert(0, str(BENCH))
    try:
        layouts = importlib.import_module("layouts")
        info = importlib.import_module("_timing").machine_info()
    finally:
        sys.path.remove(str(BENCH))
    held = []

    def step():  # a 64 MiB temporary, touched, then freed
        held.append(torch.ones(16 << 20).sum())

    step()
    assert layouts.transient_bytes(step, torch.device("cpu")) >= 60 << 20
    assert layouts.param_shapes("emb", smoke=False) == [(32000, 768)]
    args = type("Args", (), {"nproc": 2, "device": "cpu", "cold_cache": False})()
    row = {"set": "emb", "layout": "fsdp2", "name": "adamw_8bit", "first_step_s": 1.0, "step_ms": 2.0}
    row.update(adamw_step_ms=1.3, ratio_adamw=1.5, transient_bytes_per_param=0.5, adamw_transient_bytes_per_param=4.0)
    row["compiled_params_first_step"] = 1
    # a row of the steady allocator, with its page faults; an older record's row had none
    steady = dict(row, allocator="steady", faults_per_step=12.0, adamw_faults_per_step=84000.0)
    refused = {"set": "emb", "layout": "zero2", "name": "muon", "error": "refused"}
    lines = layouts.report([row, steady, refused], info, {"vector_flags": ["avx2"]}, args)
    assert "avx2" in lines[0] and len(lines) == 4 + 3
    assert lines[4] == "| emb | fsdp2 | adamw_8bit | 1.0 | 2.0 | 1.3 | 1.50 | 0.50 | 4.00 | 1 |  |  |"
    assert lines[5].startswith("| emb | fsdp2 | adamw_8bit (steady allocator) | 1.0 | 2.0 | 1.3 | 1.50 |")
    assert lines[5].endswith("| 1 | 12 | 84000 |")
    assert layouts.key(row) != layouts.key(steady)  # --merge keeps both
    # one record per kind of machine: an Intel Xeon with AMX is not an AMD EPYC with AVX-512
    kinds = [(["avx2", "avx512f", "amx_tile"], "cpu", "amx"), (["avx2", "avx512f"], "cpu", "avx512")]
    kinds += [(["avx2"], "cpu", "avx2"), (["sse4_2"], "cpu", "cpu"), (["avx2", "amx_tile"], "cuda", "cuda")]
    for flags, device, kind in kinds:
        assert layouts.machine_kind({"flags": flags}, device) == kind


def test_layouts_merge_keeps_each_rows_run_and_names_the_earlier_ones():
    """benchmarks/layouts.py --merge: a row kept from the results file keeps the run that measured
    it, through any number of merges, and the header names the kept rows by run; a run that
    measures every row names no earlier one."""
    sys.path.insert(0, str(BENCH))
    try:
        layouts = importlib.import_module("layouts")
    finally:
        sys.path.remove(str(BENCH))
    cpu = {"vector_flags": ["avx2"]}

    def run(commit):
        return layouts.run_of({"git_commit": commit, "load_average_1_5_15": [1.0, 1.0, 1.0], "cpu": "EPYC"}, cpu)

    def row(layout, name, commit):
        return {"layout": layout, "set": "emb", "name": name, "step_ms": 1.0, "run": run(commit)}

    first = [row("one", "adamw_8bit", "a1"), row("one", "adan_8bit", "a1"), row("zero2", "adan_8bit", "a1")]
    runs, rows = layouts.packed(first)
    assert runs == [run("a1")] and {r["run"] for r in rows} == {0}
    second = layouts.merged({"machine": {}, "runs": runs, "rows": rows}, [row("one", "adan_8bit", "b2")])
    runs, rows = layouts.packed(second)
    third = layouts.merged({"machine": {}, "runs": runs, "rows": rows}, [row("zero2", "adan_8bit", "c3")])
    assert [(r["layout"], r["name"], r["run"]["git_commit"]) for r in third] == [
        ("one", "adamw_8bit", "a1"),
        ("one", "adan_8bit", "b2"),
        ("zero2", "adan_8bit", "c3"),
    ]
    note = layouts.kept_note(third, run("c3"))
    assert note == (
        "; kept from earlier runs: 1 row of adamw_8bit on one for emb from hfoptim a1, load average [1.0, 1.0, 1.0]"
        "; 1 row of adan_8bit on one for emb from hfoptim b2, load average [1.0, 1.0, 1.0]"
    )
    assert layouts.kept_note([row("one", "adamw_8bit", "c3")], run("c3")) == ""
    # another CPU is named; a record from before rows named their run keeps its own account
    other = dict(run("a1"), cpu="Xeon")
    assert "Xeon with avx2" in layouts.described(other, run("c3"))
    legacy = {"machine": {"git_commit": "old", "cpu": "EPYC", "merged": "rows of x", "previous_commit": "p"}}
    legacy["lscpu"], legacy["rows"] = cpu, [{"layout": "fsdp2", "set": "emb", "name": "adamw_8bit"}]
    kept = layouts.merged(legacy, [row("one", "adamw_8bit", "c3")])
    assert "from hfoptim old, load average None (of its rows, rows of x (p))" in layouts.kept_note(kept, run("c3"))


def test_quality_combine_of_runs_split_by_seed_gives_the_one_run_table(bench, tmp_path):
    """Runs of one protocol split by seed (run side by side) merge into the table one run of all
    seeds writes: the issue-16 results file split in two and combined back gives its committed table."""
    import json

    quality = bench["quality"]
    record = json.loads((BENCH / "results" / "quality_issue16.json").read_text())
    parts = []
    for seeds in ([0], [1, 2]):
        part = dict(record, seeds=seeds, runs=[r for r in record["runs"] if r["seed"] in seeds])
        parts.append(tmp_path / f"part{seeds[0]}.json")
        parts[-1].write_text(json.dumps(part))
    assert quality.main(["--combine", *map(str, parts), "--stem", "merged", "--output-dir", str(tmp_path)]) == 0
    merged = (tmp_path / "merged.md").read_text()
    committed = (BENCH / "results" / "quality_issue16.md").read_text()
    assert merged == committed.replace("quality_issue16_curves.png", "merged_curves.png")


def test_speed_runs_with_the_steady_allocator_it_names(bench, tmp_path):
    """speed.py starts itself again with glibc's thresholds raised (its default), its record and
    its table say which allocator timed it, and asked in-process for an allocator the process
    does not have it stops with the fix instead of mislabelling the run."""
    import json
    import os
    import subprocess

    timing, speed = bench["_timing"], bench["speed"]
    env = {k: v for k, v in os.environ.items() if k not in timing.STEADY_ALLOCATOR_ENV}
    command = [sys.executable, str(BENCH / "speed.py"), "--quick", "--rounds", "1", "--output-dir", str(tmp_path)]
    command += ["--only", speed.BASELINE_FOREACH]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "speed_quick.json").read_text())
    assert timing.allocator_of(record["machine"]["malloc_env"]) == "steady"
    assert "steady allocator" in (tmp_path / "speed_quick.md").read_text()
    assert "steady allocator" not in timing.machine_line({**record["machine"], "malloc_env": {}})
    # the CPU's vector extensions travel with every record and its machine line; an older record
    # without them keeps its line, never borrowing this machine's
    flags = record["machine"]["vector_flags"]
    assert flags == timing.lscpu().get("vector_flags")
    assert f"lscpu flags: {' '.join(flags)}" in (tmp_path / "speed_quick.md").read_text()
    older = {k: v for k, v in record["machine"].items() if k != "vector_flags"}
    assert "lscpu flags" not in timing.machine_line(older)
    assert timing.allocator_of(timing.allocator_environ("default")) == "default"
    wanted = "default" if timing.allocator_of(os.environ) == "steady" else "steady"
    with pytest.raises(SystemExit, match=f"--allocator {wanted} needs glibc's thresholds"):
        speed.main(["--quick", "--allocator", wanted, "--output-dir", str(tmp_path)])
