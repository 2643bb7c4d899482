"""Which shards the compiled kernel may step alone (hfoptim.core.compiled_step.shard_local).

A shard takes the kernel only when its step needs nothing of another process; the decision
must read only what every process shares (options, global shape, process boundaries), or the
processes would send different parameters to the plain path and its collectives would not
match. The multi-process runs that prove the numbers (compile='on' under FSDP2 and ZeRO-1/2/3,
equal to one process) are in tests/test_sharding_fsdp2.py and tests/test_sharding_zero.py.
"""

from __future__ import annotations

import pytest
import torch

import hfoptim
from hfoptim.core import compiled_step
from hfoptim.core.stats import MAX, SUM, LocalStats, ParamView, PieceStats, ShardPieceStats, StagedStats
from hfoptim.state import resolve
from hfoptim.state.codec import get_codec

GROUP = object()  # stands for a process group: only its presence matters here


def shard(shape, row_start, rows, cuts):
    return ParamView(global_shape=torch.Size(shape), row_start=row_start, local_rows=rows, cuts=cuts, group=GROUP)


def decide(name: str, view: ParamView, **options) -> tuple[bool, bool]:
    """``(shard_local, shard_staged)`` of ``name``'s slots for the shard ``view``."""
    p = torch.nn.Parameter(torch.zeros(view.global_shape))
    opt = hfoptim.create_optimizer([p], name, state_min_numel=0, **options)
    group = opt.param_groups[0]
    slots = opt.rule.active_slots(group)
    codecs = [resolve.codec_for(opt.rule, slot, group, view) for slot in slots]
    return (
        compiled_step.shard_local(opt, group, view, slots, codecs),
        compiled_step.shard_staged(opt, group, view, slots, codecs),
    )


def local(name: str, view: ParamView, **options) -> bool:
    return decide(name, view, **options)[0]


@pytest.mark.parametrize("name", ["adamw_8bit", "ademamix_8bit", "adan_8bit", "adamw_bf16"])
def test_row_shards_of_elementwise_rules_step_alone(name):
    # FSDP2 rows 0-33 | 34-66 of a (67, 300) matrix: rows and 8-bit blocks held whole
    assert local(name, shard((67, 300), 0, 34, (34 * 300,)))
    assert local(name, shard((67, 300), 34, 33, (34 * 300,)))


def test_4bit_second_moments_of_matrices_take_the_kernel_in_stages():
    # normalized by per-column maxima of the whole tensor (rank-1 scales): not alone, but in
    # stages (the column maxima completed between a recording kernel and the writing one);
    # vectors are blockwise
    assert decide("adamw_4bit", shard((67, 300), 0, 34, (34 * 300,))) == (False, True)
    assert decide("ademamix_4bit", shard((67, 300), 34, 33, (34 * 300,))) == (False, True)
    assert local("adamw_4bit", shard((3000,), 0, 1024, (1024,)))
    # a process holding no row of it takes part too (zero parts): one process owns it whole
    assert decide("adamw_4bit", shard((1, 300), 0, 0, ())) == (False, True)
    # not when a boundary cuts a row (padded rows; row maxima span two processes)
    assert decide("adamw_4bit", shard((67, 300), 0, 35, (34 * 300 + 100,))) == (False, False)
    # with a modifier's statistic too (AGC's vector norms, completed in the same stages)
    assert decide("adamw_4bit", shard((64, 256), 0, 32, (32 * 256,)), agc=0.1) == (False, True)


def test_staged_statistics_answer_from_the_completed_values_and_record_the_rest():
    x = torch.tensor([[1.0, -5.0, 2.0], [-3.0, 0.5, 4.0]])
    view = ParamView(global_shape=torch.Size((4, 3)), local_rows=2, cuts=(6,), group=GROUP)
    recording = StagedStats()
    rows, cols = recording.dim_absmax([x], [view])[0]
    assert torch.equal(rows, torch.tensor([5.0, 4.0]))  # whole rows: complete here
    norm = recording.norm([x], [view])[0]
    assert [combine for _, combine in recording.partials] == [MAX, SUM]
    assert torch.equal(recording.partials[0][0], torch.tensor([3.0, 5.0, 4.0]))  # this process's part
    assert torch.equal(cols, recording.partials[0][0])
    assert torch.equal(norm, x.square().sum().sqrt())
    # the next stage: the first request answered from its completed value, the second recorded
    completed = torch.tensor([7.0, 5.0, 9.0])
    staged = StagedStats(known=(completed,))
    assert torch.equal(staged.dim_absmax([x], [view])[0][1], completed)
    staged.sum_sq([x], [view])
    assert len(staged.partials) == 1 and staged.partials[0][1] == SUM
    # all known: nothing recorded, every answer the completed one
    final = StagedStats(known=(completed, torch.tensor([100.0])))
    final.dim_absmax([x], [view])
    assert torch.equal(final.norm([x], [view])[0], torch.tensor(10.0))
    assert final.partials == []
    # on one process the same requests give the same values as LocalStats
    whole = ParamView(global_shape=torch.Size((2, 3)))
    assert all(
        torch.equal(a, b)
        for a, b in zip(StagedStats().dim_absmax([x], [whole])[0], LocalStats().dim_absmax([x], [whole])[0])
    )


def test_a_boundary_inside_a_row_or_a_block_takes_the_plain_path():
    # a ZeRO cut inside a row: padded rows, row statistics and the cut block span two processes
    assert not local("adamw_8bit", shard((67, 300), 0, 35, (34 * 300 + 100,)))
    assert not local("adamw_bf16", shard((67, 300), 0, 35, (34 * 300 + 100,)))
    # vectors: 8-bit blocks run along the vector, whole when cut at multiples of 256
    assert local("adamw_8bit", shard((3000,), 0, 512, (512, 1024)))
    assert not local("adamw_8bit", shard((3000,), 0, 300, (300,)))
    assert local("adamw_bf16", shard((3000,), 0, 300, (300,)))  # rounded element by element


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lamb_8bit", {}),
        ("adamw_8bit", {"adaptive_memory": True}),
        ("adamw_8bit", {"cautious": True}),
        ("nsgda", {}),
        ("sm3", {}),
        ("adanorm_4bit", {}),
    ],
)
def test_sums_and_norms_of_the_whole_tensor_take_the_kernel_in_stages(name, options):
    # not alone (a statistic of both processes), but in stages: the rule's or modifier's norms,
    # sums and maxima completed between a recording kernel and the writing one
    assert decide(name, shard((64, 256), 0, 32, (32 * 256,)), **options) == (False, True)


@pytest.mark.parametrize("options", [{"agc": 0.1}, {"soft_clip": True}, {"norm_loss": 1e-3}])
def test_per_row_norms_of_matrices_step_alone_and_a_vectors_norm_in_stages(options):
    # a matrix's unit is its row: its shard of whole rows needs nothing of the other process;
    # a vector's unit is the whole vector: its norm is completed between stages
    assert decide("adamw_8bit", shard((64, 256), 0, 32, (32 * 256,)), **options)[0]
    assert decide("adamw_8bit", shard((3000,), 0, 512, (512, 1024)), **options) == (False, True)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("adafactor", {}),  # the factored second moment's column sums, read in the same step
        ("adamw", {"spectral_cap": 1e-3}),  # a power iteration over the whole matrix
        ("adamw_cpr", {}),  # a per-tensor decision each step
        ("muon", {}),  # the whole matrix orthogonalized
    ],
)
def test_other_statistics_of_the_whole_tensor_keep_the_plain_path(name, options):
    assert decide(name, shard((64, 256), 0, 32, (32 * 256,)), **options) == (False, False)


@pytest.mark.parametrize("name", ["adamw_smmf", "smmf"])
def test_smmf_shards_step_alone_where_every_boundary_ends_a_row_of_the_square_matrix(name):
    # (64, 256) is factored as a 128x128 matrix: a cut after 32 parameter rows ends its row 64,
    # so the shard's rows of r and its sign bits are its own and c needs only column sums
    whole_rows = shard((64, 256), 0, 32, (32 * 256,))
    assert local(name, whole_rows)
    # (67, 300) as 150x134: a cut after 34 parameter rows (10200 elements) is inside row 76
    assert not local(name, shard((67, 300), 0, 34, (34 * 300,)))
    # c is the column sums normalized by their total, which no kernel can leave as a partial sum:
    # a shard's pieces take the plain path (hfoptim.core.chunking.ShardSums completes the sums)
    assert not get_codec("smmf").fusable_for(whole_rows)
    assert get_codec("smmf").fusable_for(ParamView(global_shape=torch.Size((64, 256))))


def test_row_statistics_and_column_sums_completed_after_the_kernels_step_alone():
    # factored: row sums local, column sums left partial (Codec.shard_sums) and summed after the
    # kernels; shared: row means local, a vector's mean is a statistic of the whole vector
    matrix = shard((64, 256), 0, 32, (32 * 256,))
    assert local("adamw_factored", matrix)
    assert local("adamw_shared", matrix)
    assert not local("adamw_shared", shard((3000,), 0, 1500, (1500,)))
    assert local("adamw_factored", shard((3000,), 0, 1500, (1500,)))  # a vector's factored state is dense
    codec = get_codec("factored")
    second_moment = hfoptim.create_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], "adamw").rule.slots[1]
    assert codec.shard_sums(second_moment, matrix) == ("exp_avg_sq.col",)
    assert codec.shard_sums(second_moment, shard((3000,), 0, 1500, (1500,))) == ()


def test_the_kernel_of_a_shard_refuses_statistics_of_the_whole_tensor():
    stats = PieceStats()
    x = torch.ones(4, 8)
    view = ParamView(global_shape=torch.Size((8, 8)), local_rows=4)
    assert torch.equal(stats.row_sums([x], [view])[0], torch.full((4,), 8.0))
    for ask in (lambda: stats.sum([x], [view]), lambda: stats.dim_absmax([x], [view]), lambda: stats.col_sum(x, view)):
        with pytest.raises(RuntimeError, match="whole tensor"):
            ask()
    # a shard's kernel: column sums of its own rows (completed over the processes after it)
    assert torch.equal(ShardPieceStats().col_sums([x], [view])[0], torch.full((8,), 4.0))
    with pytest.raises(RuntimeError, match="whole tensor"):
        ShardPieceStats().sum([x], [view])
