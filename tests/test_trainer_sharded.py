"""HFOptimTrainer sharded on CPU: DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 really engaged (by
``HFOptimTrainingArguments(cpu_sharding=True)``, the default: see
hfoptim/integrations/transformers/sharding.py), 2 processes, and the loss of each step
reaching the optimizer as the mean over ranks — under DeepSpeed from inside ``backward``.

What this proves is the Trainer plumbing (the hfoptim optimizer is the one DeepSpeed / FSDP2
wraps, the loss hand-off); the numerical equivalence of each optimizer under sharding is
tests/test_sharding_*.py's.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.distributed.launch import ROOT, launch

ENGAGED = {
    "zero2": "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
    "zero3": "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
    "fsdp2": "hfoptim.LossProbe",
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3", "fsdp2"])
def test_trainer_sharded_on_cpu_hands_the_mean_loss(tmp_path, mode):
    out = tmp_path / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "tests" / "trainer_sharded_worker.py"), "--mode", mode, "--out", str(out),
    ]  # fmt: skip
    proc = launch(cmd, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"result.json.rank{r}").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world"] == 2
        if mode == "fsdp2":
            assert r["distributed_type"] == "DistributedType.FSDP" and r["param_types"] == ["DTensor"]
        else:
            assert r["distributed_type"] == "DistributedType.DEEPSPEED"
            assert r["optimizer_chain"][1] == ENGAGED[mode] and r["optimizer_chain"][2] == "hfoptim.LossProbe"
        if mode == "zero2":  # one flat partition per group, half of the model on each rank
            assert all(len(s) == 1 for s in r["param_shapes"])
        assert r["seen"] == pytest.approx(r["logged"], rel=1e-6)
        mean = [(a + b) / 2 for a, b in zip(ranks[0]["local"], ranks[1]["local"])]
        assert r["seen"] == pytest.approx(mean, rel=1e-6)
    assert ranks[0]["local"] != ranks[1]["local"]  # the ranks saw different data: the mean matters
