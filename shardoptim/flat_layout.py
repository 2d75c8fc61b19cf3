"""Pure layout math: the flat layout, which cuts every bucket into equal ranges across tensor boundaries.

`build_flat_layout` packs parameters back to back (each start aligned) into buckets per key and cuts
every bucket into `num_shards` equal ranges: the element-granular layout of ShardedOptimizer's "flat"
kind, balanced up to padding. The same inputs give the same layout on every rank. This module must
not import torch or torch.distributed.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from shardoptim.layout import DEFAULT_ALIGN, BucketLayout, Layout, ParamPlacement, check_layout_args, round_up

__all__ = ["build_flat_layout"]


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
    check_layout_args(numels, keys, num_shards, align)
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
