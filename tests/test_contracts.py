"""The declared contracts between the layers: every storage form and layout declares what the
engine reads of it (no getattr/hasattr guessing), and the list forms batch: one statistics call
for all the tensors of a bucket (one collective under sharding)."""

from __future__ import annotations

import inspect

import pytest
import torch

import hfoptim
from hfoptim.core import compiled_step
from hfoptim.core.context import StepContext
from hfoptim.core.layout import Layout, LocalLayout
from hfoptim.core.rule import FIRST_MOMENT, Slot
from hfoptim.core.stats import LocalStats, ParamView
from hfoptim.core.tensorlist import TensorList
from hfoptim.distributed import checkpoint
from hfoptim.modifiers import MODIFIERS
from hfoptim.state import CODECS
from hfoptim.state.codec import Codec


def _counted(name: str):
    def method(self, *args, **kwargs):
        if self.depth == 0:  # calls the user of the backend makes, not the backend's own
            self.calls[name] = self.calls.get(name, 0) + 1
        self.depth += 1
        try:
            return getattr(LocalStats, name)(self, *args, **kwargs)
        finally:
            self.depth -= 1

    return method


class CountingStats(LocalStats):
    """LocalStats that counts the calls made of it (a sharded backend makes one collective per call)."""

    def __init__(self):
        super().__init__(foreach=True)
        self.calls: dict[str, int] = {}
        self.depth = 0

    block_absmax = _counted("block_absmax")
    row_sums = _counted("row_sums")
    row_sum = _counted("row_sum")
    row_sum_sq = _counted("row_sum_sq")
    sum_sq = _counted("sum_sq")
    norm = _counted("norm")
    sum = _counted("sum")


def test_every_storage_form_declares_the_contract():
    for name, codec in CODECS.items():
        assert isinstance(codec, Codec) and not inspect.isabstract(type(codec)), name
        for attribute in ("elementwise", "offset_free", "fusable", "identity"):
            assert isinstance(getattr(type(codec), attribute), bool), (name, attribute)
        # elementwise (each element on its own, wherever it is) implies offset-free, not the reverse
        assert codec.offset_free or not codec.elementwise, name
        assert codec.fusable_for(ParamView(global_shape=torch.Size((4, 256)))) in (True, False)
    assert CODECS["8bit"].offset_free and not CODECS["8bit"].elementwise
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (Codec,), {"name": ""})()


def test_the_engine_reads_declared_attributes_only():
    for module in (compiled_step, checkpoint):
        source = inspect.getsource(module)
        for attribute in ("fusable", "fusable_for", "units_without_grad"):
            assert f'"{attribute}"' not in source, (module.__name__, attribute)


def test_a_layout_declares_units_without_grad():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = hfoptim.AdamW([p])
    (unit,) = LocalLayout().units_without_grad(opt, opt.param_groups[0])
    assert unit.param is p and unit.grad is p and unit.state is opt.state[p]
    assert "units_without_grad" in Layout.__dict__


def test_8bit_encodes_a_bucket_with_one_statistics_call():
    codec = CODECS["8bit"]
    slot = Slot("exp_avg", FIRST_MOMENT)
    values = [torch.randn(4, 300), torch.randn(700), torch.randn(2, 3, 256)]
    views = [ParamView.of(v) for v in values]
    stored = [codec.init(slot, torch.zeros_like(v), view) for v, view in zip(values, views)]
    stats = CountingStats()
    codec.encode_many(slot, stored, values, views, stats=stats)
    assert stats.calls == {"block_absmax": 1}
    for s, v, view in zip(stored, values, views):  # the same as one tensor at a time
        alone = codec.init(slot, torch.zeros_like(v), view)
        codec.encode(slot, alone, v, view)
        assert all(torch.equal(alone[k], s[k]) for k in s)


@pytest.mark.parametrize("option", [{"agc": 0.01}, {"soft_clip": True}, {"centralize": True}])
def test_gradient_modifiers_take_row_statistics_for_the_whole_list(option):
    shapes = [(4, 3), (5,), (2, 3, 2), (6, 2)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    group = hfoptim.AdamW([torch.nn.Parameter(torch.zeros(1))], **option).param_groups[0]
    (modifier,) = [m for m in MODIFIERS if m.enabled(group)]
    stats = CountingStats()
    views = [ParamView.of(p) for p in params]
    ctx = StepContext(group, [1] * 4, views, stats, True, None, [{}] * 4)
    out = modifier.apply(ctx, TensorList(grads, True), TensorList(grads, True), TensorList(params, True))
    # one row_sums call per list (AGC and soft clip: of the gradient and of the parameter, and
    # one sum_sq each for the vectors), never one call per tensor
    expected = {"row_sums": 1} if "centralize" in option else {"row_sums": 2, "sum_sq": 2}
    assert stats.calls == expected
    # per tensor, the same as the list
    for i in range(len(shapes)):
        ctx1 = StepContext(group, [1], [views[i]], LocalStats(), True, None, [{}])
        one = modifier.apply(ctx1, TensorList([grads[i]], True), None, TensorList([params[i]], True))
        torch.testing.assert_close(list(out)[i], list(one)[0], rtol=0, atol=0)
