"""What one rank holds of the layout: its pieces of parameters and the buckets they live in.

Plain records shared by the optimizer and the modules that read its shards (gradients,
state_dict, checkpoint). Must not import torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from shardoptim.buffers import FlatBuffers, RegionOpener, from_flat, memory_perm
from shardoptim.flat_layout import build_flat_layout
from shardoptim.layout import Layout, ShardRange, align_for_itemsize
from shardoptim.master import MasterPiece, MasterShards, needs_master
from shardoptim.segments import Segments
from shardoptim.tensor_layout import build_tensor_layout
from shardoptim.tensor_owners import assign_whole_tensors


@dataclass(slots=True)
class Piece:
    """The part of one parameter this rank owns, and the tensor the local optimizer updates."""

    index: int
    """Position of the parameter in `Placement.params` (the optimizer's parameter index)."""
    bucket: int
    """Position of its bucket in `Placement.buckets`."""
    in_param: ShardRange
    """Owned elements, as offsets inside the flattened parameter."""
    start_local: int
    """Offset of the piece inside this rank's range of the bucket."""
    local: torch.Tensor
    """What the local optimizer updates: a view into the bucket (or into its master copy), 1-D
    for flat sharding, the parameter's shape for whole tensors; or the parameter itself (`is_param`)."""
    is_param: bool = False
    """Whether `local` is the parameter itself (a whole parameter the local optimizer updates as
    torch.optim would, its `.grad` included: nothing to attach or clear per step)."""


@dataclass(slots=True)
class Bucket:
    """One bucket of parameters, who owns what in it, and what this rank keeps of it."""

    buffer: torch.Tensor | None
    """The whole bucket (parameters as bucket views); None when the parameters keep their own storage."""
    segments: Segments
    """The whole bucket as flat segments: `buffer`, or the parameters' own storage end to end."""
    bounds: tuple[int, ...]
    """world_size + 1 offsets: rank r owns [bounds[r], bounds[r + 1]) of the whole bucket."""
    param_indices: list[int]
    starts: list[int]
    """Where each of `param_indices` starts in the whole bucket."""
    numel: int
    """Elements of the whole bucket (padding included)."""
    group_to_locals: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@dataclass(slots=True)
class Placed:
    """What `place_params` built for one batch of new parameters."""

    layout: Layout
    buffers: FlatBuffers
    buckets: list[Bucket]
    pieces: list[Piece]


def place_params(
    params: Sequence[torch.Tensor],
    *,
    first_index: int,
    first_bucket: int,
    index_to_group: dict[int, int],
    rank: int,
    world_size: int,
    whole_tensors: bool,
    cost: Callable[[torch.Size], float],
    tensor_loads: list[float],
    bucket_numel: int,
    masters: MasterShards,
    master_dtype: torch.dtype | None,
    full: bool = True,
    param_locals: bool = False,
    open_region: RegionOpener | None = None,
) -> Placed:
    """Lay out `params`, copy them into new buckets, and cut this rank's pieces (and master copies).

    Parameters are split into buckets by (device, dtype, requires_grad). The parameters are not
    bound to the buckets here. `tensor_loads` (per-rank cost already owned, whole-tensor sharding)
    and `masters` are updated in place.

    Args:
        params: the new parameters; index i is parameter `first_index + i` of the optimizer.
        first_index: optimizer index of params[0].
        first_bucket: optimizer index of the first new bucket.
        index_to_group: optimizer parameter index -> its param group.
        rank: this rank; world_size: ranks to shard over.
        whole_tensors: give each parameter whole to one rank (else flat element ranges).
        cost: per-tensor cost for whole-tensor balancing.
        tensor_loads: cost each rank already owns (whole-tensor sharding), updated.
        bucket_numel: soft cap on elements per bucket.
        masters: where master copies go; master_dtype: their dtype (None: no master copies).
        full: keep whole buckets (parameters as bucket views) or only this rank's range of each.
        param_locals: let the local optimizer update a wholly owned parameter itself (whole-tensor
            sharding, or a whole 1-D parameter of the flat layout, without a master copy), so its
            state has the shape it would have unsharded and its `.grad` serves as it is (stage 1).
        open_region: opens the peer region the CPU buckets may live in (see FlatBuffers); collective.
    """
    key_to_id: dict[tuple[str, torch.dtype, bool], int] = {}
    keys = [key_to_id.setdefault((str(p.device), p.dtype, p.requires_grad), len(key_to_id)) for p in params]
    numels = [p.numel() for p in params]
    layout: Layout
    if not whole_tensors:
        # Cuts every 64 bytes of each dtype: 16 fp32, 32 bf16/fp16, 8 fp64 elements (see layout.py).
        key_to_align: dict[Hashable, int] = {i: align_for_itemsize(key[1].itemsize) for key, i in key_to_id.items()}
        layout = build_flat_layout(
            numels, num_shards=world_size, keys=keys, bucket_numel=bucket_numel, key_to_align=key_to_align
        )
    else:
        costs = [cost(p.shape) for p in params]
        owners = assign_whole_tensors(costs, num_shards=world_size, initial_loads=tensor_loads)
        for owner, value in zip(owners, costs):
            tensor_loads[owner] += value
        layout = build_tensor_layout(
            numels, num_shards=world_size, owners=owners, keys=keys, bucket_numel=bucket_numel
        )
    buffers = FlatBuffers(layout, params, full=full, offset=first_index, open_region=open_region)
    buckets = []
    for b, bucket in enumerate(layout.buckets):
        segments = buffers.segments(b)
        buckets.append(
            Bucket(
                buffers.buffers[b],
                segments,
                bucket.bounds,
                [first_index + pl.index for pl in bucket.placements],
                [pl.start_global for pl in bucket.placements],
                bucket.padded_numel,
            )
        )
        if needs_master(segments.dtype, master_dtype):
            masters.add_bucket(first_bucket + b, bucket.bounds[rank + 1] - bucket.bounds[rank], segments.device)
    pieces = []
    for piece in layout.local_slices(rank):
        index = first_index + piece.index
        b = first_bucket + piece.bucket
        shape = params[piece.index].shape if whole_tensors else None
        start_local = piece.start_global - buckets[piece.bucket].bounds[rank]
        param = params[piece.index]
        whole = piece.in_param.start == 0 and piece.in_param.numel == param.numel()
        if param_locals and whole and not masters.has(b) and (whole_tensors or (param.dim() == 1 and param.is_contiguous())):
            local = param
        elif masters.has(b):
            target = buffers.local_view(piece)
            local = masters.add_piece(MasterPiece(index, b, start_local, piece.in_param.numel), target)
            local = local if shape is None else from_flat(local, shape, memory_perm(params[piece.index]))
        else:
            local = buffers.local_view(piece, shape=shape)
        buckets[piece.bucket].group_to_locals.setdefault(index_to_group[index], []).append(local)
        pieces.append(Piece(index, b, piece.in_param, start_local, local, is_param=local is param))
    return Placed(layout, buffers, buckets, pieces)
