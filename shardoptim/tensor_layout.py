"""Pure layout math: the tensor layout, which packs whole tensors into one range per owning rank.

`build_tensor_layout` takes the owner of every tensor (from shardoptim.tensor_owners) and packs each
rank's tensors back to back into that rank's range of a bucket, so ranges fit their tensors and
need not be equal. The same inputs give the same layout on every rank. This module must not import
torch or torch.distributed.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence

from shardoptim.layout import DEFAULT_ALIGN, BucketLayout, Layout, ParamPlacement, check_layout_args, round_up

__all__ = ["build_tensor_layout"]


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
    check_layout_args(numels, keys, num_shards, align)
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
