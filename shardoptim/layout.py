"""Pure layout math shared by both layouts: ranges, alignment, and how a layout is represented.

A layout is a list of `BucketLayout`: each bucket places some parameters at aligned offsets of one
flat buffer and cuts the buffer into one half-open range per rank. `Layout` answers which parts of
which parameters a rank owns (`local_slices`) and how evenly the ranges split (`rank_to_numel`,
`imbalance`). The layouts themselves are built elsewhere, from the same inputs on every rank:

- shardoptim.flat_layout: parameters packed back to back, every bucket cut into `num_shards`
  equal ranges that ignore tensor boundaries;
- shardoptim.tensor_layout: every parameter owned whole by one rank (chosen by
  shardoptim.tensor_owners), one range per rank that fits exactly that rank's tensors.

Everything here is a deterministic function of its inputs and testable without processes. This
module must not import torch or torch.distributed.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

# NOTE: re-exported for shardoptim/kinds.py, which imports it from here.
from shardoptim.tensor_owners import muon_cost as muon_cost

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


def check_layout_args(numels: Sequence[int], keys: Sequence[Hashable], num_shards: int, align: int) -> None:
    """Raise ValueError for inputs no layout can be built from (the checks both builders share)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if len(numels) != len(keys):
        raise ValueError(f"got {len(numels)} element counts but {len(keys)} keys; pass one key per parameter")
    if any(n < 0 for n in numels):
        raise ValueError(f"element counts must be >= 0, got {[n for n in numels if n < 0][:5]}")
