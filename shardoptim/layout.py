"""Pure layout math: which elements of which flat bucket each rank owns.

Everything here is a deterministic function of (element counts, bucket keys, world size, bucket size,
alignment), so every rank computes the same layout without talking to the others, and the math is
testable without processes. This module must not import torch or torch.distributed.

Two layouts share one representation (a list of `BucketLayout`):

- flat: parameters are packed back to back (each start aligned) and every bucket is cut into
  `num_shards` equal ranges that ignore tensor boundaries;
- tensor: every parameter is owned whole by one rank; each bucket holds one range per rank
  (rank-major) that fits exactly that rank's tensors, so one set of collectives per bucket (one
  broadcast per rank, or one all-gather when the ranges happen to be equal) delivers them all.
"""

from __future__ import annotations

import bisect
import collections
import heapq
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

#: Default alignment in elements of every parameter start and every shard boundary: 16 elements, 64
#: bytes of fp32 (32 of bf16/fp16, 128 of fp64; at least the 16 bytes CUDA's vectorised multi-tensor
#: kernels need for any dtype). 64 bytes is the unit torch's CPU fused kernels hand to threads and
#: the widest CPU vector (AVX-512): cuts on multiples of it inside a tensor keep every element on
#: the same vectorised or scalar-tail path as an unsharded run, which keeps results bitwise equal
#: to torch.optim (cuts at 4 fp32 elements already change fused AdamW's results with AVX2). For
#: bf16/fp16 that takes 32 elements: pass `key_to_align` (`align_for_itemsize`). Every bucket pads
#: each rank's range up to the alignment, up to `align` elements per rank per bucket: 64 elements
#: cost 3% of GPT-2 small's optimizer state at 4,096 ranks (benchmarks/scale_sim.py).
DEFAULT_ALIGN = 16
#: Bytes that `align_for_itemsize` aligns to (see DEFAULT_ALIGN).
ALIGN_NBYTES = 64


def align_for_itemsize(itemsize: int) -> int:
    """Return the alignment in elements that spans ALIGN_NBYTES (64 bytes) of a dtype of `itemsize` bytes.

    16 for fp32, 32 for bf16/fp16 (whose CPU vectors hold twice as many elements: 16-element cuts
    already change bf16 results with AVX2), 8 for fp64; for `key_to_align` of `build_flat_layout`.
    """
    if itemsize < 1:
        raise ValueError(f"itemsize must be >= 1 byte, got {itemsize}")
    return max(1, ALIGN_NBYTES // itemsize)


def round_up(numel: int, multiple: int) -> int:
    """Return the smallest multiple of `multiple` that is >= `numel`."""
    return -(-numel // multiple) * multiple


@dataclass(frozen=True, slots=True)
class ShardRange:
    """A half-open range [start, end) of element offsets in one named index space."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"ShardRange needs 0 <= start <= end, got [{self.start}, {self.end})")

    @property
    def numel(self) -> int:
        return self.end - self.start

    def intersect(self, other: ShardRange) -> ShardRange | None:
        """Return the overlap with `other`, or None when they share no element."""
        start, end = max(self.start, other.start), min(self.end, other.end)
        return ShardRange(start, end) if start < end else None

    def shift(self, offset: int) -> ShardRange:
        """Return the same range moved by `offset` (negative moves towards 0)."""
        return ShardRange(self.start + offset, self.end + offset)


@dataclass(frozen=True, slots=True)
class ParamPlacement:
    """Where one parameter lives inside its bucket."""

    index: int
    """Position of the parameter in the caller's flat list of all parameters."""
    start_global: int
    """Offset of the parameter's first element in the full bucket buffer."""
    numel: int
    """Number of elements of the parameter."""
    owner: int | None = None
    """Rank that owns the whole tensor (tensor layout); None when ranges cut through tensors (flat)."""


@dataclass(frozen=True, slots=True)
class LocalSlice:
    """The part of one parameter that one rank owns."""

    index: int
    """Position of the parameter in the caller's flat list of all parameters."""
    bucket: int
    """Position of the bucket in the layout."""
    in_param: ShardRange
    """The owned elements, as offsets inside the flattened parameter."""
    start_global: int
    """Offset of the first owned element in the full bucket buffer."""
    numel_param: int
    """Elements of the whole parameter."""

    @property
    def is_whole(self) -> bool:
        return self.in_param.start == 0 and self.in_param.numel == self.numel_param


@dataclass(frozen=True, slots=True)
class BucketLayout:
    """One flat buffer: its key, the placements of its parameters and its cut into rank ranges."""

    key: Hashable
    """The caller's grouping key (e.g. an index for (device, dtype)); buckets never mix keys."""
    num_shards: int
    bounds: tuple[int, ...]
    """num_shards + 1 offsets: rank r owns [bounds[r], bounds[r + 1]); all multiples of the alignment.
    Equal ranges in the flat layout; in the tensor layout each range fits its owner's tensors."""
    placements: tuple[ParamPlacement, ...]

    @property
    def padded_numel(self) -> int:
        return self.bounds[-1]

    @property
    def numel(self) -> int:
        """Elements that belong to parameters (padding excluded)."""
        return sum(p.numel for p in self.placements)

    @property
    def is_even(self) -> bool:
        """True when every rank's range has the same size (one all-gather can fill the bucket)."""
        sizes = {b - a for a, b in zip(self.bounds, self.bounds[1:])}
        return len(sizes) <= 1

    @property
    def shard_numel(self) -> int:
        """Elements of the largest rank range."""
        return max(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    def shard(self, rank: int) -> ShardRange:
        """Return rank's range [bounds[rank], bounds[rank + 1]) of the bucket."""
        if not 0 <= rank < self.num_shards:
            raise ValueError(f"rank {rank} is outside [0, {self.num_shards})")
        return ShardRange(self.bounds[rank], self.bounds[rank + 1])

    def _ranks_touching(self, placement: ParamPlacement) -> range:
        if placement.owner is not None:
            return range(placement.owner, placement.owner + 1)
        first = bisect.bisect_right(self.bounds, placement.start_global) - 1
        last = bisect.bisect_left(self.bounds, placement.start_global + placement.numel)
        return range(max(first, 0), min(last, self.num_shards))

    def local_slices(self, rank: int, *, bucket: int = 0) -> list[LocalSlice]:
        """Return, in placement order, the parts of parameters that fall in rank's range."""
        if not 0 <= rank < self.num_shards:
            raise ValueError(f"rank {rank} is outside [0, {self.num_shards})")
        # NOTE: int arithmetic, no ShardRange until a placement overlaps: callers ask for every
        # rank of thousands (benchmarks/scale_sim.py), and most placements miss most ranges.
        lo, hi = self.bounds[rank], self.bounds[rank + 1]
        out = []
        for placement in self.placements:
            start_global = placement.start_global
            start = max(start_global, lo)
            end = min(start_global + placement.numel, hi)
            if start >= end:
                continue
            out.append(
                LocalSlice(
                    index=placement.index,
                    bucket=bucket,
                    in_param=ShardRange(start - start_global, end - start_global),
                    start_global=start,
                    numel_param=placement.numel,
                )
            )
        return out

    def rank_to_numel(self) -> list[int]:
        """Return the parameter elements (padding excluded) inside each rank's range."""
        # NOTE: plain int arithmetic, no ShardRange per (placement, rank): at thousands of ranks a
        # large tensor touches thousands of ranges (benchmarks/scale_sim.py).
        counts = [0] * self.num_shards
        bounds = self.bounds
        for placement in self.placements:
            start, end = placement.start_global, placement.start_global + placement.numel
            for rank in self._ranks_touching(placement):
                overlap = min(end, bounds[rank + 1]) - max(start, bounds[rank])
                if overlap > 0:
                    counts[rank] += overlap
        return counts


@dataclass(frozen=True, slots=True)
class Layout:
    """All buckets of one optimizer, and summaries of how evenly they split."""

    num_shards: int
    buckets: tuple[BucketLayout, ...]

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def padded_numel(self) -> int:
        return sum(b.padded_numel for b in self.buckets)

    def local_slices(self, rank: int) -> list[LocalSlice]:
        """Return every owned part of every parameter, bucket by bucket."""
        return [s for i, b in enumerate(self.buckets) for s in b.local_slices(rank, bucket=i)]

    def rank_to_numel(self) -> list[int]:
        """Return the parameter elements (the optimizer-state elements) each rank owns."""
        totals = [0] * self.num_shards
        for bucket in self.buckets:
            for rank, numel in enumerate(bucket.rank_to_numel()):
                totals[rank] += numel
        return totals

    def imbalance(self) -> float:
        """Return largest owned elements / ideal (total / num_shards); 1.0 is perfect."""
        if self.numel == 0:
            return 1.0
        return max(self.rank_to_numel()) * self.num_shards / self.numel

    def index_to_bucket(self) -> dict[int, int]:
        return {p.index: i for i, b in enumerate(self.buckets) for p in b.placements}


def _check_common(numels: Sequence[int], keys: Sequence[Hashable], num_shards: int, align: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if len(numels) != len(keys):
        raise ValueError(f"got {len(numels)} element counts but {len(keys)} keys; pass one key per parameter")
    if any(n < 0 for n in numels):
        raise ValueError(f"element counts must be >= 0, got {[n for n in numels if n < 0][:5]}")


def build_flat_layout(
    numels: Sequence[int],
    *,
    num_shards: int,
    keys: Sequence[Hashable] | None = None,
    bucket_numel: int = 1 << 24,
    align: int = DEFAULT_ALIGN,
    key_to_align: Mapping[Hashable, int] | None = None,
) -> Layout:
    """Pack parameters into aligned buckets and cut each bucket into `num_shards` equal ranges.

    Small parameters (fewer than one alignment unit per rank: numel < num_shards * align, e.g.
    norm weights and biases at many ranks) go into buckets of their own, apart from the large ones
    of the same key. Every bucket rounds each rank's range up to a multiple of the alignment, which
    costs up to `align` elements per rank per bucket; large tensors usually have sizes with large
    power-of-two factors and need little of it, while a few small tensors in every bucket would
    make every bucket need nearly all of it. Packed together, the small ones pay that rounding in
    few buckets. With no small parameters, or at one rank, this is plain packing in order.

    Args:
        numels: elements of each parameter, in the order the optimizer lists them.
        num_shards: the world size of the shard group.
        keys: one hashable per parameter; parameters of different keys never share a bucket
            (the caller uses (device, dtype, ...)). Defaults to one key for all.
        bucket_numel: soft cap on the elements of one bucket; a larger parameter gets its own bucket.
        align: every parameter start and every shard boundary is a multiple of this many elements.
        key_to_align: the alignment of the buckets of some keys, overriding `align` for them
            (e.g. `align_for_itemsize(dtype.itemsize)` per (device, dtype) key, so every dtype is
            cut at 64 bytes).

    Returns:
        The layout; its buckets appear in the order of their first parameters (the same on every
        rank). Within a bucket, and among the buckets of one key and size class (small or large),
        parameters keep their index order.
    """
    keys = [0] * len(numels) if keys is None else keys
    _check_common(numels, keys, num_shards, align)
    key_to_align = dict(key_to_align or {})
    if any(a < 1 for a in key_to_align.values()):
        raise ValueError(f"key_to_align values must be >= 1, got {key_to_align}")
    # Open buckets per (key, is_small parameter).
    key_to_open: dict[tuple[Hashable, bool], list[tuple[int, int]]] = {}
    key_to_fill: dict[tuple[Hashable, bool], int] = {}
    buckets: list[BucketLayout] = []
    shard_to_bounds: dict[int, tuple[int, ...]] = {}

    def close(open_key: tuple[Hashable, bool]) -> None:
        members = key_to_open.pop(open_key)
        key_to_fill.pop(open_key)
        key_align = key_to_align.get(open_key[0], align)
        offset, placements = 0, []
        for index, numel in members:
            placements.append(ParamPlacement(index=index, start_global=offset, numel=numel))
            offset += round_up(numel, key_align)
        shard_numel = round_up(-(-offset // num_shards), key_align)
        # NOTE: buckets of one shard size share one bounds tuple, built by range() in C: at 4,096
        # ranks a tuple per bucket held ~35 MiB for Llama-8B and a generator took ~0.5 s
        # (benchmarks/scale_sim.py).
        bounds = shard_to_bounds.get(shard_numel)
        if bounds is None:
            if shard_numel:
                bounds = tuple(range(0, (num_shards + 1) * shard_numel, shard_numel))
            else:
                bounds = (0,) * (num_shards + 1)
            shard_to_bounds[shard_numel] = bounds
        buckets.append(BucketLayout(open_key[0], num_shards, bounds, tuple(placements)))

    for index, (numel, key) in enumerate(zip(numels, keys, strict=True)):
        key_align = key_to_align.get(key, align)
        aligned = round_up(numel, key_align)
        open_key = (key, num_shards > 1 and numel < num_shards * key_align)
        if open_key in key_to_open and key_to_fill[open_key] + aligned > bucket_numel:
            close(open_key)
        key_to_open.setdefault(open_key, []).append((index, numel))
        key_to_fill[open_key] = key_to_fill.get(open_key, 0) + aligned
    for open_key in list(key_to_open):
        close(open_key)
    # NOTE: in the order of their first parameters, not the order they were closed: a bucket of
    # small tensors from every layer is complete only when backward reaches its first tensor, and
    # stage 2 launches reduce-scatters strictly from the last bucket down (shardoptim/grads.py), so
    # at the end of the list it would hold back every other bucket until backward is over.
    buckets.sort(key=lambda bucket: bucket.placements[0].index)
    return Layout(num_shards, tuple(buckets))


def assign_whole_tensors(
    costs: Sequence[float], *, num_shards: int, initial_loads: Sequence[float] | None = None
) -> list[int]:
    """Assign every tensor to one rank, balancing the summed cost (longest processing time first).

    Ties are broken by index and by rank, so the result is the same on every rank.
    `initial_loads` (one per rank) is the cost each rank already carries, e.g. from earlier groups.

    Returns:
        `index_to_owner`: the owning rank of each tensor.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    if initial_loads is not None and len(initial_loads) != num_shards:
        raise ValueError(f"initial_loads needs one value per rank ({num_shards}), got {len(initial_loads)}")
    heap = [
        (0.0 if initial_loads is None else float(initial_loads[rank]), rank) for rank in range(num_shards)
    ]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for index in order:
        load, rank = heapq.heappop(heap)
        owners[index] = rank
        heapq.heappush(heap, (load + costs[index], rank))
    return owners


def build_tensor_layout(
    numels: Sequence[int],
    *,
    num_shards: int,
    owners: Sequence[int],
    keys: Sequence[Hashable] | None = None,
    bucket_numel: int = 1 << 24,
    align: int = DEFAULT_ALIGN,
) -> Layout:
    """Pack whole tensors rank-major: each bucket has one range per rank, holding its tensors.

    Each rank's owned tensors (per key, in index order) fill its range of the next bucket up to
    `bucket_numel / num_shards` elements (at least one tensor). Ranges are not padded to equal
    sizes, so one huge tensor costs no padding on the other ranks; a bucket whose ranges happen to
    be equal can be filled by one all-gather, others by one broadcast per rank.
    """
    keys = [0] * len(numels) if keys is None else keys
    _check_common(numels, keys, num_shards, align)
    if len(owners) != len(numels):
        raise ValueError(f"got {len(owners)} owners for {len(numels)} tensors")
    if any(not 0 <= o < num_shards for o in owners):
        raise ValueError(f"owners must lie in [0, {num_shards}), got {sorted(set(owners))}")
    cap = max(align, round_up(bucket_numel // num_shards, align))
    buckets: list[BucketLayout] = []
    for key in dict.fromkeys(keys):
        queues = [
            collections.deque(i for i in range(len(numels)) if keys[i] == key and owners[i] == r)
            for r in range(num_shards)
        ]
        while any(queues):
            bounds, placements, offset = [0], [], 0
            for rank, queue in enumerate(queues):
                fill = 0
                while queue and (fill == 0 or fill + round_up(numels[queue[0]], align) <= cap):
                    index = queue.popleft()
                    placements.append(ParamPlacement(index, offset + fill, numels[index], owner=rank))
                    fill += round_up(numels[index], align)
                offset += fill
                bounds.append(offset)
            buckets.append(BucketLayout(key, num_shards, tuple(bounds), tuple(placements)))
    return Layout(num_shards, tuple(buckets))


def greedy_param_partition(numels: Sequence[int], *, num_shards: int) -> list[int]:
    """Return the per-rank elements of a parameter-granular greedy partition (largest first).

    This is the partition torch's ZeroRedundancyOptimizer uses; it is here only as the baseline
    that benchmarks and docs compare the flat layout against.
    """
    owners = assign_whole_tensors([float(n) for n in numels], num_shards=num_shards)
    totals = [0] * num_shards
    for numel, owner in zip(numels, owners, strict=True):
        totals[owner] += numel
    return totals


def muon_cost(shape: Sequence[int]) -> float:
    """Return the cost of orthogonalising a matrix of `shape`: m * n * min(m, n) flops up to a factor."""
    if len(shape) < 2:
        return float(max(1, *shape) if shape else 1)
    m, n = shape[0], 1
    for d in shape[1:]:
        n *= d
    return float(m * n * min(m, n))
