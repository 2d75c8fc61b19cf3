"""Unit and property tests of the pure layout math (shardoptim.layout, flat_layout, tensor_layout,
tensor_owners): single process, no torch.

The property tests draw random element counts (0, 1 and sizes below the world size included), 1-3
bucket keys, world sizes 1-64, bucket sizes 64..1 << 20 and alignments 1, 16 and 64, and check the
invariants the optimizer relies on: every element owned exactly once, aligned non-decreasing bounds,
keys never mixed, small parameters (under `align` elements per rank) packed apart from large ones,
padding bounded, deterministic results. The flat layout cuts every bucket into equal
ranges; the tensor layout gives each rank a range exactly as large as its aligned owned tensors
(uneven or empty ranges allowed), so padding never exceeds alignment.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardoptim.flat_layout import build_flat_layout
from shardoptim.layout import (
    DEFAULT_ALIGN,
    BucketLayout,
    Layout,
    LocalSlice,
    ParamPlacement,
    ShardRange,
    align_for_itemsize,
    round_up,
)
from shardoptim.tensor_layout import build_tensor_layout
from shardoptim.tensor_owners import assign_whole_tensors, muon_cost

_PROPERTY = settings(max_examples=60, deadline=None)
_KEYS: tuple[Hashable, ...] = (0, ("cpu", "float32"), "bfloat16")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Inputs:
    numels: list[int]
    keys: list[Hashable]
    num_shards: int
    bucket_numel: int
    align: int


@st.composite
def _inputs(draw: st.DrawFn) -> _Inputs:
    numel = st.one_of(st.sampled_from([0, 1]), st.integers(0, 80), st.integers(0, 5000))
    numels = draw(st.lists(numel, max_size=24))
    num_kinds = draw(st.integers(1, 3))
    keys = draw(st.lists(st.sampled_from(_KEYS[:num_kinds]), min_size=len(numels), max_size=len(numels)))
    bucket_numel = draw(st.one_of(st.integers(6, 20).map(lambda e: 1 << e), st.integers(64, 1 << 20)))
    return _Inputs(
        numels=numels,
        keys=keys,
        num_shards=draw(st.integers(1, 64)),
        bucket_numel=bucket_numel,
        align=draw(st.sampled_from([1, 16, 64])),
    )


def _flat(inp: _Inputs) -> Layout:
    return build_flat_layout(
        inp.numels, num_shards=inp.num_shards, keys=inp.keys, bucket_numel=inp.bucket_numel, align=inp.align
    )


def _tensor(inp: _Inputs, owners: Sequence[int]) -> Layout:
    return build_tensor_layout(
        inp.numels,
        num_shards=inp.num_shards,
        owners=owners,
        keys=inp.keys,
        bucket_numel=inp.bucket_numel,
        align=inp.align,
    )


def _shard(bucket: BucketLayout, rank: int) -> ShardRange:
    """Rank's range [bounds[rank], bounds[rank + 1]) of the bucket."""
    return ShardRange(bucket.bounds[rank], bucket.bounds[rank + 1])


def _shard_numel(bucket: BucketLayout) -> int:
    """Elements of the bucket's largest rank range."""
    return max(b - a for a, b in zip(bucket.bounds, bucket.bounds[1:]))


def _is_even(bucket: BucketLayout) -> bool:
    """Whether every rank's range has the same size (one all-gather can fill the bucket)."""
    return len({b - a for a, b in zip(bucket.bounds, bucket.bounds[1:])}) <= 1


def _is_whole(piece: LocalSlice) -> bool:
    return piece.in_param.start == 0 and piece.in_param.numel == piece.numel_param


def _index_to_bucket(layout: Layout) -> dict[int, int]:
    return {p.index: i for i, b in enumerate(layout.buckets) for p in b.placements}


def _brute_force_rank_to_numel(bucket: BucketLayout) -> list[int]:
    """Parameter elements inside each rank's range, by intersecting every placement with every range."""
    counts = [0] * bucket.num_shards
    for placement in bucket.placements:
        for rank in range(bucket.num_shards):
            lo = max(placement.start_global, bucket.bounds[rank])
            hi = min(placement.start_global + placement.numel, bucket.bounds[rank + 1])
            counts[rank] += max(0, hi - lo)
    return counts


def _check_common_invariants(layout: Layout, inp: _Inputs) -> dict[int, list[tuple[int, int, int]]]:
    """Check what flat and tensor layouts share; return index -> sorted (start, end, rank) owned pieces."""
    assert layout.num_shards == inp.num_shards
    # Every parameter is placed exactly once, in a bucket of its own key.
    placed = [p.index for b in layout.buckets for p in b.placements]
    assert sorted(placed) == list(range(len(inp.numels)))
    for bucket in layout.buckets:
        assert bucket.num_shards == inp.num_shards
        # num_shards + 1 aligned, non-decreasing offsets from 0; rank r owns [bounds[r], bounds[r + 1]).
        bounds = bucket.bounds
        assert isinstance(bounds, tuple) and len(bounds) == inp.num_shards + 1
        assert bounds[0] == 0
        assert all(a <= b for a, b in zip(bounds, bounds[1:])), f"bounds decrease: {bounds}"
        assert all(b % inp.align == 0 for b in bounds)
        sizes = [_shard(bucket, r).numel for r in range(inp.num_shards)]
        assert bucket.padded_numel == bounds[-1] == sum(sizes)
        assert _shard_numel(bucket) % inp.align == 0
        assert bucket.rank_to_numel() == _brute_force_rank_to_numel(bucket)
        end = 0
        for placement in sorted(bucket.placements, key=lambda p: p.start_global):
            assert inp.keys[placement.index] == bucket.key, "a bucket mixes keys"
            assert placement.numel == inp.numels[placement.index]
            assert placement.start_global % inp.align == 0
            assert placement.start_global >= end, "placements overlap"
            end = placement.start_global + placement.numel
        assert end <= bucket.padded_numel
    assert layout.numel == sum(inp.numels)

    # The union over ranks of local_slices covers every element of every parameter exactly once.
    index_to_pieces: dict[int, list[tuple[int, int, int]]] = {i: [] for i in range(len(inp.numels))}
    rank_to_numel = []
    for rank in range(inp.num_shards):
        slices = layout.local_slices(rank)
        rank_to_numel.append(sum(s.in_param.numel for s in slices))
        for s in slices:
            bucket = layout.buckets[s.bucket]
            placement = next(p for p in bucket.placements if p.index == s.index)
            assert s.numel_param == inp.numels[s.index]
            assert s.in_param.numel > 0
            assert s.start_global == placement.start_global + s.in_param.start
            assert _shard(bucket, rank).start <= s.start_global
            assert s.start_global + s.in_param.numel <= _shard(bucket, rank).end
            assert s.in_param.start % inp.align == 0
            index_to_pieces[s.index].append((s.in_param.start, s.in_param.end, rank))
    for index, pieces in index_to_pieces.items():
        pieces.sort()
        covered = 0
        for start, end, _ in pieces:
            assert start == covered, f"param {index}: gap or overlap at {covered}, pieces {pieces}"
            covered = end
        assert covered == inp.numels[index]
    assert layout.rank_to_numel() == rank_to_numel
    assert sum(rank_to_numel) == sum(inp.numels)
    return index_to_pieces


# ---------------------------------------------------------------------------------------------------
# Property tests


@_PROPERTY
@given(_inputs())
def test_flat_layout_invariants(inp: _Inputs) -> None:
    layout = _flat(inp)
    _check_common_invariants(layout, inp)
    assert layout == _flat(inp), "recomputing the layout gave a different result"
    for bucket in layout.buckets:
        assert all(p.owner is None for p in bucket.placements)
        # Equal ranges: bounds are r * S for one aligned S, so one all-gather fills the bucket.
        step = _shard_numel(bucket)
        assert step % inp.align == 0
        assert bucket.bounds == tuple(r * step for r in range(inp.num_shards + 1))
        assert _is_even(bucket)
        assert bucket.padded_numel == inp.num_shards * step
        indices = [p.index for p in bucket.placements]
        assert indices == sorted(indices)
        # Packed back to back, each start aligned.
        offset = 0
        for placement in bucket.placements:
            assert placement.start_global == offset
            offset += round_up(placement.numel, inp.align)
        # Padding of the equal cut is bounded: less than one alignment unit per shard.
        assert 0 <= bucket.padded_numel - offset < inp.num_shards * inp.align
        # The cap is soft only for a bucket that holds one parameter.
        if len(bucket.placements) > 1:
            assert offset <= inp.bucket_numel

    # Small parameters (under `align` elements per rank) never share a bucket with large ones, and
    # the buckets of one key and size class keep the parameters in index order.
    def is_small(index: int) -> bool:
        return inp.num_shards > 1 and inp.numels[index] < inp.num_shards * inp.align

    for bucket in layout.buckets:
        assert len({is_small(p.index) for p in bucket.placements}) <= 1, "a bucket mixes small and large"
    for key in set(inp.keys):
        for small in (False, True):
            indices = [
                p.index
                for b in layout.buckets
                if b.key == key
                for p in b.placements
                if is_small(p.index) == small
            ]
            assert indices == sorted(indices)
    # Buckets appear in the order of their first parameters.
    firsts = [b.placements[0].index for b in layout.buckets]
    assert firsts == sorted(firsts)


@_PROPERTY
@given(_inputs(), st.data())
def test_tensor_layout_invariants(inp: _Inputs, data: st.DataObject) -> None:
    if data.draw(st.booleans(), label="lpt owners"):
        owners = assign_whole_tensors([float(n) for n in inp.numels], num_shards=inp.num_shards)
    else:
        owners = data.draw(
            st.lists(st.integers(0, inp.num_shards - 1), min_size=len(inp.numels), max_size=len(inp.numels)),
            label="random owners",
        )
    layout = _tensor(inp, owners)
    index_to_pieces = _check_common_invariants(layout, inp)
    assert layout == _tensor(inp, owners), "recomputing the layout gave a different result"
    cap = max(inp.align, round_up(inp.bucket_numel // inp.num_shards, inp.align))
    # No padding beyond alignment: the buckets hold exactly the aligned tensors.
    assert layout.padded_numel == sum(round_up(n, inp.align) for n in inp.numels)
    for bucket in layout.buckets:
        assert bucket.placements, "a tensor-layout bucket is empty"
        rank_to_fill = [0] * inp.num_shards
        rank_to_placements: list[list[ParamPlacement]] = [[] for _ in range(inp.num_shards)]
        largest = 0
        for placement in bucket.placements:
            assert placement.owner == owners[placement.index]
            # Every tensor lies inside its owner's range.
            mine = _shard(bucket, placement.owner)
            assert mine.start <= placement.start_global
            assert placement.start_global + placement.numel <= mine.end
            rank_to_fill[placement.owner] += round_up(placement.numel, inp.align)
            rank_to_placements[placement.owner].append(placement)
            largest = max(largest, round_up(placement.numel, inp.align))
        assert bucket.padded_numel == sum(round_up(p.numel, inp.align) for p in bucket.placements)
        for rank in range(inp.num_shards):
            # Each range is exactly as large as its owner's aligned tensors in this bucket, which are
            # packed back to back from the range start, so the range holds those tensors and no other.
            assert _shard(bucket, rank).numel == rank_to_fill[rank]
            offset = bucket.bounds[rank]
            for placement in rank_to_placements[rank]:
                assert placement.start_global == offset
                offset += round_up(placement.numel, inp.align)
            # A range exceeds the cap only when it holds a single tensor (plus, possibly, zero-element
            # tensors, which cost nothing and ride along before it).
            if rank_to_fill[rank] > cap:
                assert [p.numel > 0 for p in rank_to_placements[rank]].count(True) == 1
        # The largest range is the largest fill, and never above the cap or the largest tensor.
        assert _shard_numel(bucket) == max(rank_to_fill)
        assert _shard_numel(bucket) <= max(cap, largest)
    # Greedy fill: while a rank has tensors of a key left for a later bucket, its range in the earlier
    # bucket is non-empty and the next of those tensors would have pushed it past the cap.
    for key in dict.fromkeys(inp.keys):
        key_buckets = [b for b in layout.buckets if b.key == key]
        for rank in range(inp.num_shards):
            per_bucket = [[p for p in b.placements if p.owner == rank] for b in key_buckets]
            for i, placements in enumerate(per_bucket):
                later = [p for rest in per_bucket[i + 1 :] for p in rest]
                if not later:
                    continue
                fill = sum(round_up(p.numel, inp.align) for p in placements)
                assert placements and fill > 0
                assert fill + round_up(later[0].numel, inp.align) > cap
    # Each parameter is whole, on the shard of its owner and on no other.
    for index, pieces in index_to_pieces.items():
        if inp.numels[index] == 0:
            assert pieces == []
            continue
        assert [(start, end) for start, end, _ in pieces] == [(0, inp.numels[index])]
        assert pieces[0][2] == owners[index]
    for rank in range(inp.num_shards):
        assert all(_is_whole(s) for s in layout.local_slices(rank))
    # A rank's tensors of one key keep index order across that key's buckets.
    for key in set(inp.keys):
        for rank in range(inp.num_shards):
            indices = [
                p.index for b in layout.buckets if b.key == key for p in b.placements if p.owner == rank
            ]
            assert indices == sorted(indices)


@_PROPERTY
@given(
    st.lists(st.one_of(st.integers(0, 10), st.integers(0, 10**9)), max_size=40),
    st.integers(1, 64),
)
def test_assign_whole_tensors_deterministic_and_lpt_bounded(costs: list[int], num_shards: int) -> None:
    owners = assign_whole_tensors(costs, num_shards=num_shards)
    assert owners == assign_whole_tensors(list(costs), num_shards=num_shards)
    assert len(owners) == len(costs)
    assert all(0 <= o < num_shards for o in owners)
    rank_to_load = [0] * num_shards
    for cost, owner in zip(costs, owners, strict=True):
        rank_to_load[owner] += cost
    # LPT: the last tensor put on the fullest rank went to the least loaded one, which was <= the mean.
    assert max(rank_to_load) * num_shards <= sum(costs) + num_shards * max(costs, default=0)


@_PROPERTY
@given(st.lists(st.floats(0.0, 1e6), max_size=40), st.integers(1, 16))
def test_assign_whole_tensors_float_costs_bounded(costs: list[float], num_shards: int) -> None:
    owners = assign_whole_tensors(costs, num_shards=num_shards)
    rank_to_load = [0.0] * num_shards
    for cost, owner in zip(costs, owners, strict=True):
        rank_to_load[owner] += cost
    bound = sum(costs) / num_shards + max(costs, default=0.0)
    assert max(rank_to_load, default=0.0) <= bound * (1 + 1e-9) + 1e-9


# ---------------------------------------------------------------------------------------------------
# Plain unit tests


def test_round_up() -> None:
    assert [round_up(n, 64) for n in (0, 1, 63, 64, 65, 128)] == [0, 64, 64, 64, 128, 128]
    assert round_up(5, 1) == 5


def test_shard_range_validation() -> None:
    assert ShardRange(3, 3).numel == 0
    assert ShardRange(2, 10).numel == 8
    with pytest.raises(ValueError, match="0 <= start <= end"):
        ShardRange(-1, 4)
    with pytest.raises(ValueError, match="0 <= start <= end"):
        ShardRange(5, 4)


def test_flat_layout_small_example() -> None:
    layout = build_flat_layout([100, 28, 64], num_shards=2, align=64)
    (bucket,) = layout.buckets
    assert [p.start_global for p in bucket.placements] == [0, 128, 192]
    assert _shard_numel(bucket) == 128 and bucket.padded_numel == 256 and bucket.numel == 192
    assert bucket.bounds == (0, 128, 256) and _is_even(bucket)
    rank0, rank1 = layout.local_slices(0), layout.local_slices(1)
    assert [(s.index, s.in_param, s.start_global) for s in rank0] == [(0, ShardRange(0, 100), 0)]
    assert [(s.index, s.in_param, s.start_global) for s in rank1] == [
        (1, ShardRange(0, 28), 128),
        (2, ShardRange(0, 64), 192),
    ]
    assert layout.rank_to_numel() == [100, 92]


def test_flat_layout_cuts_one_tensor_at_aligned_offsets() -> None:
    layout = build_flat_layout([1000], num_shards=4, align=64)
    assert _shard_numel(layout.buckets[0]) == 256
    assert layout.buckets[0].bounds == (0, 256, 512, 768, 1024)
    pieces = [[s.in_param for s in layout.local_slices(r)] for r in range(4)]
    assert pieces == [
        [ShardRange(0, 256)],
        [ShardRange(256, 512)],
        [ShardRange(512, 768)],
        [ShardRange(768, 1000)],
    ]
    assert layout.rank_to_numel() == [256, 256, 256, 232]
    assert layout.imbalance() == pytest.approx(256 * 4 / 1000)


def test_flat_layout_tensor_smaller_than_world_size_leaves_empty_shards() -> None:
    layout = build_flat_layout([3], num_shards=8, align=1)
    assert layout.rank_to_numel() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert layout.local_slices(5) == []
    layout64 = build_flat_layout([3], num_shards=8)
    assert _shard_numel(layout64.buckets[0]) == DEFAULT_ALIGN
    assert layout64.buckets[0].bounds == tuple(r * DEFAULT_ALIGN for r in range(9))
    assert layout64.rank_to_numel() == [3, 0, 0, 0, 0, 0, 0, 0]


def test_flat_layout_zero_numel_parameters() -> None:
    layout = build_flat_layout([0, 0], num_shards=3)
    assert layout.numel == 0 and layout.padded_numel == 0
    assert layout.imbalance() == 1.0
    assert all(layout.local_slices(r) == [] for r in range(3))
    assert _index_to_bucket(layout) == {0: 0, 1: 0}


def test_flat_layout_bucket_cap_and_large_tensor() -> None:
    layout = build_flat_layout([64, 64, 64, 500, 64], num_shards=1, bucket_numel=128, align=64)
    assert [[p.index for p in b.placements] for b in layout.buckets] == [[0, 1], [2], [3], [4]]
    # The large tensor gets a bucket of its own, larger than the cap.
    assert layout.buckets[2].padded_numel == 512


def test_flat_layout_keys_never_share_a_bucket() -> None:
    layout = build_flat_layout([10, 20, 30, 40], num_shards=2, keys=["a", "b", "a", "b"], align=1)
    assert [(b.key, [p.index for p in b.placements]) for b in layout.buckets] == [
        ("a", [0, 2]),
        ("b", [1, 3]),
    ]
    assert _index_to_bucket(layout) == {0: 0, 2: 0, 1: 1, 3: 1}


def test_flat_layout_empty() -> None:
    layout = build_flat_layout([], num_shards=4)
    assert layout.buckets == () and layout.numel == 0 and layout.imbalance() == 1.0
    assert layout.rank_to_numel() == [0, 0, 0, 0]


def test_tensor_layout_small_example() -> None:
    layout = build_tensor_layout([10, 20, 30], num_shards=2, owners=[0, 1, 0], align=1)
    (bucket,) = layout.buckets
    # Each range is as large as its owner's tensors: rank 0 holds 10 + 30, rank 1 holds 20, no padding.
    assert bucket.bounds == (0, 40, 60)
    assert _shard_numel(bucket) == 40 and bucket.padded_numel == 60 and not _is_even(bucket)
    assert _shard(bucket, 0) == ShardRange(0, 40) and _shard(bucket, 1) == ShardRange(40, 60)
    assert bucket.placements == (
        ParamPlacement(0, 0, 10, owner=0),
        ParamPlacement(2, 10, 30, owner=0),
        ParamPlacement(1, 40, 20, owner=1),
    )
    assert layout.rank_to_numel() == [40, 20]
    assert layout.imbalance() == pytest.approx(40 * 2 / 60)
    assert [s.index for s in layout.local_slices(0)] == [0, 2]
    assert all(_is_whole(s) for r in range(2) for s in layout.local_slices(r))


def test_tensor_layout_splits_buckets_at_cap() -> None:
    layout = build_tensor_layout(
        [64] * 6, num_shards=2, owners=[0, 0, 0, 1, 1, 1], bucket_numel=256, align=64
    )
    assert [[(p.index, p.owner) for p in b.placements] for b in layout.buckets] == [
        [(0, 0), (1, 0), (3, 1), (4, 1)],
        [(2, 0), (5, 1)],
    ]
    assert [_shard_numel(b) for b in layout.buckets] == [128, 64]
    assert [b.bounds for b in layout.buckets] == [(0, 128, 256), (0, 64, 128)]
    assert all(_is_even(b) for b in layout.buckets)


def test_tensor_layout_uneven_and_empty_ranges() -> None:
    # Rank 0 owns 100 + 28 elements (128 + 64 aligned), rank 1 nothing, rank 2 one 64-element tensor.
    layout = build_tensor_layout([100, 64, 28], num_shards=3, owners=[0, 2, 0], align=64)
    (bucket,) = layout.buckets
    assert bucket.bounds == (0, 192, 192, 256)
    assert [_shard(bucket, r).numel for r in range(3)] == [192, 0, 64]
    assert _shard_numel(bucket) == 192 and bucket.padded_numel == 256 and not _is_even(bucket)
    assert [(p.index, p.start_global, p.owner) for p in bucket.placements] == [
        (0, 0, 0),
        (2, 128, 0),
        (1, 192, 2),
    ]
    assert layout.local_slices(1) == []
    assert layout.rank_to_numel() == [128, 0, 64]
    assert layout.padded_numel == 256


def test_tensor_layout_all_on_one_rank() -> None:
    layout = build_tensor_layout([64, 64], num_shards=4, owners=[3, 3], align=64)
    (bucket,) = layout.buckets
    assert bucket.bounds == (0, 0, 0, 0, 128)
    assert layout.rank_to_numel() == [0, 0, 0, 128]
    assert [s.index for s in layout.local_slices(3)] == [0, 1]


def test_tensor_layout_huge_tensor_alone_over_cap() -> None:
    # cap = 256 // 2 = 128: the 500-element tensor gets a range of its own (512 aligned), the small
    # tensors of the same rank go to the next bucket; rank 1 is not padded to rank 0's range.
    layout = build_tensor_layout([500, 64, 64], num_shards=2, owners=[0, 0, 1], bucket_numel=256, align=64)
    assert [b.bounds for b in layout.buckets] == [(0, 512, 576), (0, 64, 64)]
    assert [[(p.index, p.owner) for p in b.placements] for b in layout.buckets] == [
        [(0, 0), (2, 1)],
        [(1, 0)],
    ]
    assert layout.padded_numel == 512 + 64 + 64


def test_tensor_layout_zero_numel_tensors_cost_nothing() -> None:
    # Zero-element tensors take no room, so they ride along with the (over-cap) tensor after them.
    layout = build_tensor_layout([0, 0, 500], num_shards=2, owners=[0, 0, 0], bucket_numel=128, align=64)
    (bucket,) = layout.buckets
    assert bucket.bounds == (0, 512, 512)
    assert [(p.index, p.start_global) for p in bucket.placements] == [(0, 0), (1, 0), (2, 0)]
    assert layout.local_slices(0)[0].index == 2  # zero-element tensors own no slice
    assert layout.rank_to_numel() == [500, 0]


def test_tensor_layout_one_huge_tensor_costs_no_padding_on_other_ranks() -> None:
    # Regression: ranges used to be padded to the bucket's largest, so a bucket holding one huge
    # tensor cost ~num_shards x that tensor of gather traffic and buffer memory (~640M elements here).
    huge, small, num_shards = 10_000_000, 1000, 64
    numels = [huge] + [small] * 100
    owners = assign_whole_tensors([float(n) for n in numels], num_shards=num_shards)
    layout = build_tensor_layout(numels, num_shards=num_shards, owners=owners)
    aligned = sum(round_up(n, DEFAULT_ALIGN) for n in numels)
    assert layout.padded_numel <= aligned
    assert layout.padded_numel == aligned
    assert layout.padded_numel < 2 * huge
    assert layout.rank_to_numel()[owners[0]] == huge
    huge_bucket = layout.buckets[_index_to_bucket(layout)[0]]
    assert _shard_numel(huge_bucket) == round_up(huge, DEFAULT_ALIGN)
    assert not _is_even(huge_bucket)
    for rank in range(num_shards):
        if rank != owners[0]:
            assert _shard(huge_bucket, rank).numel <= 2 * round_up(small, DEFAULT_ALIGN)


def test_rank_to_numel_linear_in_placements(monkeypatch: pytest.MonkeyPatch) -> None:
    # A flat bucket of many small tensors across many ranks: each placement touches at most two ranks
    # here, so rank_to_numel must not visit every rank's range for every placement.
    numels = [100] * 4000
    num_shards = 512
    layout = build_flat_layout(numels, num_shards=num_shards, bucket_numel=1 << 30)
    (bucket,) = layout.buckets
    expected = _brute_force_rank_to_numel(bucket)
    visits = 0
    ranks_touching = BucketLayout._ranks_touching

    def counting(self: BucketLayout, placement: ParamPlacement) -> range:
        nonlocal visits
        ranks = ranks_touching(self, placement)
        visits += len(ranks)
        return ranks

    monkeypatch.setattr(BucketLayout, "_ranks_touching", counting)
    assert bucket.rank_to_numel() == expected
    assert 0 < visits <= len(numels) + num_shards
    visits = 0
    tensor = build_tensor_layout(numels, num_shards=num_shards, owners=[i % num_shards for i in range(4000)])
    assert tensor.rank_to_numel() == [sum(numels[r::num_shards]) for r in range(num_shards)]
    assert 0 < visits <= len(numels)


def test_imbalance_perfect_split() -> None:
    assert build_flat_layout([4096, 4096], num_shards=8).imbalance() == 1.0


def test_muon_cost() -> None:
    assert muon_cost((768, 2304)) == 768 * 2304 * 768
    assert muon_cost((2304, 768)) == muon_cost((768, 2304))
    assert muon_cost((64, 3, 7, 7)) == 64 * 147 * 64
    assert muon_cost((768,)) == 768.0
    assert muon_cost(()) == 1.0
    assert muon_cost((0, 5)) == 0.0


def test_assign_whole_tensors_ties_by_index_then_rank() -> None:
    assert assign_whole_tensors([1.0, 1.0, 1.0], num_shards=2) == [0, 1, 0]
    assert assign_whole_tensors([], num_shards=3) == []


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: build_flat_layout([1], num_shards=0), "num_shards"),
        (lambda: build_tensor_layout([1], num_shards=0, owners=[0]), "num_shards"),
        (lambda: assign_whole_tensors([1.0], num_shards=0), "num_shards"),
        (lambda: build_flat_layout([1], num_shards=2, align=0), "align"),
        (lambda: build_flat_layout([1, 2], num_shards=2, keys=[0]), "keys"),
        (lambda: build_tensor_layout([1, 2], num_shards=2, owners=[0, 1], keys=[0, 1, 2]), "keys"),
        (lambda: build_flat_layout([4, -1], num_shards=2), ">= 0"),
        (lambda: build_tensor_layout([-4], num_shards=2, owners=[0]), ">= 0"),
        (lambda: build_tensor_layout([1, 2], num_shards=2, owners=[0]), "owners"),
        (lambda: build_tensor_layout([1, 2], num_shards=2, owners=[0, 2]), "owners"),
        (lambda: build_tensor_layout([1, 2], num_shards=2, owners=[-1, 0]), "owners"),
    ],
)
def test_bad_input_raises_value_error(build: object, match: str) -> None:
    assert callable(build)
    with pytest.raises(ValueError, match=match):
        build()


def test_flat_layout_packs_small_tensors_apart() -> None:
    # At 4 ranks and align 16, tensors under 64 elements are small: they share buckets of their own
    # and leave the large tensors' buckets free of their padding.
    layout = build_flat_layout([4096, 10, 4096, 10, 4096, 10], num_shards=4, bucket_numel=8192, align=16)
    # Buckets in the order of their first parameters: stage 2 launches them from the last one down,
    # and the small tensors' bucket is complete only when backward reaches parameter 1.
    assert [[p.index for p in b.placements] for b in layout.buckets] == [[0, 2], [1, 3, 5], [4]]
    assert [b.padded_numel for b in layout.buckets] == [8192, 64, 4096]
    later = build_flat_layout(
        [4096, 4096, 10, 4096, 4096, 10, 4096], num_shards=4, bucket_numel=8192, align=16
    )
    assert [[p.index for p in b.placements] for b in later.buckets] == [[0, 1], [2, 5], [3, 4], [6]]
    assert layout.padded_numel - layout.numel == 64 - 30


def test_flat_layout_one_rank_keeps_plain_order() -> None:
    layout = build_flat_layout([3, 5000, 1, 7], num_shards=1, bucket_numel=1 << 20, align=16)
    assert [[p.index for p in b.placements] for b in layout.buckets] == [[0, 1, 2, 3]]


def test_flat_layout_key_to_align_per_dtype() -> None:
    # fp32 (key 0) at 16 elements, bf16 (key 1) at 32: both 64 bytes.
    key_to_align = {0: align_for_itemsize(4), 1: align_for_itemsize(2)}
    assert key_to_align == {0: 16, 1: 32}
    layout = build_flat_layout(
        [100, 100, 3, 3], num_shards=2, keys=[0, 1, 0, 1], key_to_align=key_to_align, align=1
    )
    key_to_bucket = {b.key: b for b in layout.buckets if b.numel > 6}
    assert [p.start_global for p in key_to_bucket[0].placements] == [0]
    assert key_to_bucket[0].bounds == (0, 64, 128)
    assert key_to_bucket[1].bounds == (0, 64, 128)
    small = [b for b in layout.buckets if b.numel == 3]
    assert sorted(_shard_numel(b) for b in small) == [16, 32]
    with pytest.raises(ValueError, match="key_to_align"):
        build_flat_layout([1], num_shards=1, key_to_align={0: 0})
    assert align_for_itemsize(8) == 8 and align_for_itemsize(1) == 64
    with pytest.raises(ValueError, match="itemsize"):
        align_for_itemsize(0)
