"""ShardedOptimizer as single ranks of 64 and 4,096 simulated ranks (benchmarks/scale_sim.py), one process.

The optimizer is built on meta tensors over torch's fake process group (through the benchmark's
`fake_group`, which raises a clear RuntimeError if this torch lacks it), runs a real stage-2
backward and two steps, and every collective it issues is recorded. Checked: the layout gives every
element of every parameter to exactly one of the N ranks; the owned elements add up to the model;
the optimizer state of every rank (measured on the built ranks, from the layout for the others) is
at most total/N + 0.1%; the bytes each rank sends per step are within 1% of one reduce-scatter plus
one all-gather of the model (stage 2) or one all-gather (stage 1), under ring algorithms.

Hybrid sharding (16 = 4 x 4 ranks): the same within the shard group of S ranks (state at most
total/S + 0.1%, shard-group traffic within 1% of the ideal over S); across the replicate group a
ring all-reduce of the gradient shard within 1% (stage 2) or only the small hyperparameter
sync (stage 1); no call on any other group.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import scale_sim
from benchmarks._shapes import MODELS, Shape, numel_of

_ADAM_MOMENTS = 2


def _small_model() -> list[Shape]:
    """A 56M-element stack whose buckets split into aligned ranges at 4,096 ranks without padding.

    NOTE: no vectors: the bucket of small tensors (norms, biases) pads every rank's range by up to
    one alignment unit (16 elements), over 0.1% of the 13.7K elements per rank of this model at
    4,096 ranks (the benchmark measures it for real models).
    """
    shapes: list[Shape] = [(8192, 1024)]
    for _ in range(4):
        shapes += [(1024, 1024)] * 4 + [(4096, 1024), (1024, 4096)]
    return shapes


def _check_state(run: scale_sim.RankRun, shapes: list[Shape], *, where: str) -> None:
    """Check that the layout tiles every parameter over the shard ranks and the state is ~total/shards."""
    total = sum(numel_of(s) for s in shapes)
    n = run.num_shards

    # Every element of every parameter belongs to exactly one rank: the ranks' pieces tile it.
    index_to_ranges: list[list[tuple[int, int]]] = [[] for _ in shapes]
    for rank in range(n):
        for layout in run.layouts:
            for piece in layout.local_slices(rank):
                index_to_ranges[piece.index].append((piece.in_param.start, piece.in_param.end))
    for index, ranges in enumerate(index_to_ranges):
        ranges.sort()
        ends = [0] + [end for _, end in ranges]
        assert [start for start, _ in ranges] == ends[:-1], (
            f"{where}: parameter {index} pieces {ranges[:4]}..."
        )
        assert ends[-1] == numel_of(shapes[index]), f"{where}: parameter {index} covered up to {ends[-1]}"
    assert sum(run.rank_to_numel) == total, where

    # State: measured bytes are 2 moments per owned element + one 4-byte step per piece.
    itemsize = 4
    assert run.state_nbytes == _ADAM_MOMENTS * itemsize * run.owned_numel + 4 * run.num_pieces, where
    ideal = (_ADAM_MOMENTS * itemsize * total + 4 * len(shapes)) / n
    rank_to_state = [
        _ADAM_MOMENTS * itemsize * numel + 4 * pieces
        for numel, pieces in zip(run.rank_to_numel, run.rank_to_pieces, strict=True)
    ]
    assert rank_to_state[run.shard_rank] == run.state_nbytes, where
    worst = max(rank_to_state) / ideal
    assert worst <= 1 + scale_sim.STATE_TOLERANCE, f"{where}: largest rank holds {worst:.6f} x total/{n}"


def _check_rank(run: scale_sim.RankRun, shapes: list[Shape], *, stage: int) -> None:
    total = sum(numel_of(s) for s in shapes)
    n = run.world_size
    where = f"rank {run.rank} of {n}, stage {stage}"
    assert run.num_shards == n, where
    _check_state(run, shapes, where=where)
    itemsize = 4

    # Traffic of the second step (backward + step at stage 2).
    step = run.steps[-1]
    assert all(r.sent_nbytes is not None for r in step), [r.op for r in step]
    sent = sum(r.sent_nbytes or 0 for r in step)
    ideal_sent = (2 if stage == 2 else 1) * total * itemsize * (n - 1) / n
    assert abs(sent / ideal_sent - 1) <= scale_sim.TRAFFIC_TOLERANCE, (
        f"{where}: sent {sent / ideal_sent:.5f} x ideal"
    )
    ops = {r.op for r in step}
    assert ops & {"all_gather_single", "all_gather_into_tensor"}, ops
    if stage == 2:
        assert ops & {"reduce_scatter_single", "reduce_scatter_tensor"}, ops
    assert [(r.op, r.nbytes) for r in run.steps[0]] == [(r.op, r.nbytes) for r in step], where
    assert {r.group for r in [*run.construct, *step]} == {"world"}, where


@pytest.mark.parametrize("rank", [0, 31, 63])
def test_gpt2_small_at_64_ranks_stage2(rank: int) -> None:
    shapes = MODELS["gpt2-small"]()
    run = scale_sim.simulate_rank(shapes, rank=rank, world_size=64, stage=2, accounting=True, collect=False)
    _check_rank(run, shapes, stage=2)


def test_gpt2_small_at_64_ranks_stage1() -> None:
    shapes = MODELS["gpt2-small"]()
    run = scale_sim.simulate_rank(shapes, rank=17, world_size=64, stage=1, accounting=True, collect=False)
    _check_rank(run, shapes, stage=1)


def test_one_rank_of_4096() -> None:
    shapes = _small_model()
    run = scale_sim.simulate_rank(shapes, rank=4095, world_size=4096, stage=2, accounting=True, collect=False)
    _check_rank(run, shapes, stage=2)
    assert run.build_s < scale_sim.BUILD_S_TARGET


def test_ring_traffic_model() -> None:
    n, nbytes = 8, 1 << 20
    assert scale_sim.ring_sent_nbytes("all_gather_single", nbytes, n) == nbytes * 7 // 8
    assert scale_sim.ring_sent_nbytes("reduce_scatter_single", nbytes, n) == nbytes * 7 // 8
    assert scale_sim.ring_sent_nbytes("all_reduce", nbytes, n) == 2 * nbytes * 7 // 8
    assert scale_sim.ring_sent_nbytes("broadcast", nbytes, n) == nbytes
    assert scale_sim.ring_sent_nbytes("all_gather", nbytes, n) == nbytes * 7
    assert scale_sim.ring_sent_nbytes("all_to_all_single", nbytes, n) is None


def test_recorder_records_and_restores() -> None:
    """The recorder sees the construction's collective and puts torch.distributed back afterwards."""
    import shardoptim.comm

    with scale_sim.fake_group(1, 4), scale_sim.CollectiveRecorder(4) as recorder:
        assert shardoptim.comm.dist is not scale_sim.dist
        params = scale_sim.make_params([(64, 64)], device="meta", dtype=torch.float32)
        recorder.phase = "construct"
        scale_sim.shardoptim.ShardedOptimizer(params, torch.optim.AdamW, lr=0.1)
        assert [r.op for r in recorder.records] == ["all_reduce"]  # the construction's failure flag
    assert shardoptim.comm.dist is scale_sim.dist
    assert not scale_sim.dist.is_initialized()


@pytest.mark.parametrize("stage", [1, 2])
def test_hybrid_gpt2_small_16_ranks_4_per_shard_group(stage: int) -> None:
    """Rank 13 of 16 = 4 x 4: shard rank 1 of the fourth replica (not the lead)."""
    shapes = MODELS["gpt2-small"]()
    n, shards = 16, 4
    replicas = n // shards
    run = scale_sim.simulate_rank(
        shapes, rank=13, world_size=n, stage=stage, accounting=True, collect=False, shard_size=shards
    )
    where = f"rank 13 of {n} = {shards} x {replicas}, stage {stage}"
    assert (run.num_shards, run.shard_rank) == (shards, 1), where
    _check_state(run, shapes, where=where)

    model_nbytes = sum(numel_of(s) for s in shapes) * 4
    step = run.steps[-1]
    assert {r.group for r in [*run.construct, *step]} == {"shard", "replicate"}, where
    assert ("all_gather_object", "replicate") in {(r.op, r.group) for r in run.construct}, where
    assert all(r.sent_nbytes is not None for r in step), [r.op for r in step]
    sent = {g: sum(r.sent_nbytes or 0 for r in step if r.group == g) for g in ("shard", "replicate")}
    ideal = (2 if stage == 2 else 1) * model_nbytes * (shards - 1) / shards
    assert abs(sent["shard"] / ideal - 1) <= scale_sim.TRAFFIC_TOLERANCE, (where, sent, ideal)
    across = [r for r in step if r.group == "replicate"]
    if stage == 2:
        ideal_across = 2 * (replicas - 1) / replicas * model_nbytes / shards
        assert abs(sent["replicate"] / ideal_across - 1) <= scale_sim.TRAFFIC_TOLERANCE, (where, sent)
        # One all-reduce per bucket shard, one of the gradient flags; the hyperparameter sync is float64.
        num_buckets = sum(len(layout.buckets) for layout in run.layouts)
        assert sum(r.op == "all_reduce" and r.dtype == "float32" for r in across) == 1 + num_buckets, across
    else:
        # NOTE: the hyperparameter sync (an all-reduce, or an all-gather when values differ) only.
        assert {r.dtype for r in across} == {"float64"}, across
        assert 0 < sent["replicate"] <= scale_sim.REPLICATE_METADATA_NBYTES, (where, sent)
    assert [(r.op, r.group, r.nbytes) for r in run.steps[0]] == [(r.op, r.group, r.nbytes) for r in step], (
        where
    )


def test_hybrid_peer_object() -> None:
    """The grid check's row of a replicate peer is this rank's row with the block shifted."""
    assert scale_sim.hybrid_peer_object((1, 4, (4, 5, 6, 7)), 5, 13) == (1, 4, (12, 13, 14, 15))
    with pytest.raises(RuntimeError, match="hybrid_peer_object"):
        scale_sim.hybrid_peer_object({"not": "a grid row"}, 5, 13)


def test_hybrid_configs() -> None:
    models = ["gpt2-small", "llama-3.2-1b", "llama-3.1-8b"]
    default = scale_sim.hybrid_configs(models, [8, 64, 512, 4096], None)
    assert default == [(m, n, 8) for m in ("gpt2-small", "llama-3.1-8b") for n in (512, 4096)]
    assert scale_sim.hybrid_configs(models, [8, 64], 0) == []
    assert scale_sim.hybrid_configs(["gpt2-small"], [4, 8, 12, 16], 4) == [
        ("gpt2-small", 8, 4),
        ("gpt2-small", 12, 4),
        ("gpt2-small", 16, 4),
    ]
