"""ShardedOptimizer as single ranks of 64 and 4,096 simulated ranks (benchmarks/scale_sim.py), one process.

The optimizer is built on meta tensors over torch's fake process group (through the benchmark's
`fake_group`, which raises a clear RuntimeError if this torch lacks it), runs a real stage-2
backward and two steps, and every collective it issues is recorded. Checked: the layout gives every
element of every parameter to exactly one of the N ranks; the owned elements add up to the model;
the optimizer state of every rank (measured on the built ranks, from the layout for the others) is
at most total/N + 0.1%; the bytes each rank sends per step are within 1% of one reduce-scatter plus
one all-gather of the model (stage 2) or one all-gather (stage 1), under ring algorithms.
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


def _check_rank(run: scale_sim.RankRun, shapes: list[Shape], *, stage: int) -> None:
    total = sum(numel_of(s) for s in shapes)
    n = run.world_size
    where = f"rank {run.rank} of {n}, stage {stage}"

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
    assert rank_to_state[run.rank] == run.state_nbytes, where
    worst = max(rank_to_state) / ideal
    assert worst <= 1 + scale_sim.STATE_TOLERANCE, f"{where}: largest rank holds {worst:.6f} x total/N"

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
