"""Flat padded buffers, one per bucket of a layout, and the parameter views into them.

Two kinds, chosen by `full`:

- full (parameters as bucket views): one buffer per whole bucket; after `bind_params_` every
  parameter's storage is a view into it, so the all-gather of a bucket writes straight into the
  model's weights (no copy), and the local optimizer's slices are views of the same memory.
- own storage: no buffers at all. Every parameter keeps a storage of its own (its "home"), the
  local optimizer's slices are views into the homes, and a bucket is the homes laid end to end
  (`segments`): a shared-memory gather reads and writes them in place; other gathers go through
  a whole-bucket scratch buffer (`ParamStorage.gather_target`).

Where the group's CPU buckets move through shared memory (every rank on one host), they live in a
peer region (shardoptim.peer_region) instead: the bucket buffers, or the own-storage homes, each
home still a storage of its own, are carved from a mapping every peer can read, so a gather is
one copy out of the owners' mappings. Own storage then moves each parameter once, at binding,
into its new home, as bucket views do.

A parameter keeps its memory format (channels_last, or any other dense permuted layout): its
flat range in a bucket (its home's flat view) holds its elements in memory order, not in the
logical row-major order, and everything that maps a flat range to a tensor (gradients, state
slices, checkpoints) goes through `to_flat` / `from_flat` with the parameter's `memory_perm`.

Must not import torch.distributed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from shardoptim.layout import Layout, LocalSlice
from shardoptim.peer_region import PeerBucket, PeerRegion, aligned
from shardoptim.segments import Segments

#: The order of a tensor's dimensions in memory, outermost first; None for row-major (contiguous).
MemoryPerm = tuple[int, ...] | None


def memory_perm(tensor: torch.Tensor) -> MemoryPerm:
    """Return the dimension order in which `tensor`'s elements lie in memory, outermost first.

    None when `tensor` is contiguous (row-major), or when it is not a permutation of a dense
    layout (overlapping or with gaps: such a parameter gets a row-major home). channels_last
    NCHW gives (0, 2, 3, 1).
    """
    if tensor.dim() < 2 or tensor.is_contiguous():
        return None
    strides = tensor.stride()
    perm = tuple(sorted(range(tensor.dim()), key=lambda d: (-strides[d], d)))
    return perm if tensor.permute(perm).is_contiguous() else None


def to_flat(tensor: torch.Tensor, perm: MemoryPerm) -> torch.Tensor:
    """Return `tensor`'s elements as 1-D, in the memory order `perm` (a view when laid out so, else a copy)."""
    return tensor.reshape(-1) if perm is None else tensor.permute(perm).reshape(-1)


def from_flat(flat: torch.Tensor, shape: Sequence[int], perm: MemoryPerm) -> torch.Tensor:
    """Return a view of 1-D `flat` (elements in memory order `perm`) as a tensor of `shape` laid out so."""
    if perm is None:
        return flat.view(tuple(shape))
    inverse = [0] * len(perm)
    for position, dim in enumerate(perm):
        inverse[dim] = position
    return flat.view([shape[d] for d in perm]).permute(inverse)


#: Opens a peer region of the given bytes for buckets of the given signature (collective), or None.
RegionOpener = Callable[[int, object], "PeerRegion | None"]


class FlatBuffers:
    """Allocate one zero-padded buffer per bucket of `layout` and copy the parameters in (or not: own storage).

    Args:
        layout: where every parameter goes (indices refer to `params`).
        params: the parameters the layout places, in layout index order. All parameters of a
            bucket must share a device and dtype (the layout's keys guarantee it).
        full: hold whole buckets (True), or keep the parameters in their own storage (False).
        offset: position of `params[0]` in the optimizer's list of all parameters; the methods
            below take and return indices into that list.
        open_region: when given (CPU buckets of a group on one host), the CPU buckets go into a
            peer region (shardoptim.peer_region): the buffers, or the parameters' new homes, each
            its own storage. Own-storage buckets go there only when each of their parameters owns
            its whole storage and shares it with no other parameter (moving a view of a larger
            tensor, or a parameter tied to another through `.data`, would cut it off from that
            tensor); the others keep their homes. Collective: called once, on every rank.

    The parameters are not touched until `bind_params_` is called.
    """

    def __init__(
        self,
        layout: Layout,
        params: Sequence[torch.Tensor],
        *,
        full: bool = True,
        offset: int = 0,
        open_region: RegionOpener | None = None,
    ) -> None:
        self.layout = layout
        self.full = full
        self.buffers: list[torch.Tensor | None] = []
        """Per bucket: the whole bucket (full), else None."""
        self.peers: list[PeerBucket | None] = [None] * len(layout.buckets)
        """Per bucket: the bucket in every rank's peer region, or None when it is not in one."""
        self._index_to_home: dict[int, torch.Tensor] = {}
        firsts = [params[bucket.placements[0].index] for bucket in layout.buckets]
        region, b_to_offset = self._open_region(params, firsts, open_region)
        with torch.no_grad():
            for b, bucket in enumerate(layout.buckets):
                first, start = firsts[b], b_to_offset.get(b)
                if region is not None and start is not None:
                    self.peers[b] = region.bucket(start, bucket.padded_numel, first.dtype)
                buffer: torch.Tensor | None = None
                if full and region is not None and start is not None:
                    buffer = region.carve(start, bucket.padded_numel, first.dtype)  # zeros: a fresh file
                elif full:
                    buffer = torch.zeros(bucket.padded_numel, dtype=first.dtype, device=first.device)
                self.buffers.append(buffer)
                for placement in bucket.placements:
                    param = params[placement.index]
                    perm = memory_perm(param)
                    if buffer is not None:
                        home_flat = buffer.narrow(0, placement.start_global, placement.numel)
                    elif region is not None and start is not None:
                        home_flat = region.carve(
                            start + placement.start_global * first.element_size(), placement.numel, first.dtype
                        )
                    else:
                        # NOTE: a parameter neither contiguous nor dense-permuted (rare) gets a contiguous home.
                        detached = param.detach()
                        home = detached if perm is not None else detached.contiguous()
                        self._index_to_home[offset + placement.index] = home
                        continue
                    home_flat.copy_(to_flat(param.detach(), perm))
                    self._index_to_home[offset + placement.index] = from_flat(home_flat, param.shape, perm)
        self._offset = offset

    def _open_region(
        self, params: Sequence[torch.Tensor], firsts: Sequence[torch.Tensor], open_region: RegionOpener | None
    ) -> tuple[PeerRegion | None, dict[int, int]]:
        """Open the peer region of the buckets that may live in one; return it and their byte offsets in it."""
        if open_region is None:
            return None, {}
        b_to_offset: dict[int, int] = {}
        nbytes = 0
        alone = _alone_in_storage(params)
        for b, bucket in enumerate(self.layout.buckets):
            first = firsts[b]
            movable = self.full or all(alone[p.index] for p in bucket.placements)
            if first.device.type == "cpu" and bucket.padded_numel and movable:
                b_to_offset[b] = nbytes
                nbytes = aligned(nbytes + bucket.padded_numel * first.element_size())
        signature = tuple((b, self.layout.buckets[b].padded_numel, str(firsts[b].dtype)) for b in b_to_offset)
        region = open_region(nbytes, signature)
        return region, (b_to_offset if region is not None else {})

    def indices(self) -> list[int]:
        """Return the optimizer indices of the parameters these buffers hold."""
        return list(self._index_to_home)

    def pinned(self) -> list[int]:
        """Return the indices whose homes are in a peer region: the peers read them where they are."""
        return [
            self._offset + p.index
            for b, bucket in enumerate(self.layout.buckets)
            if self.peers[b] is not None
            for p in bucket.placements
        ]

    def homes(self) -> list[tuple[int, torch.Tensor]]:
        """Return (optimizer index, full-shape tensor the parameter's storage will be) for every parameter."""
        return list(self._index_to_home.items())

    def segments(self, b: int) -> Segments:
        """Return bucket `b` as flat segments: its one buffer, or its parameters' homes end to end."""
        buffer = self.buffers[b]
        if buffer is not None:
            return Segments.whole(buffer, peer=self.peers[b])
        bucket = self.layout.buckets[b]
        parts = [
            (p.start_global, self._flat_home(self._offset + p.index))
            for p in sorted(bucket.placements, key=lambda p: p.start_global)
        ]
        return Segments(parts, bucket.padded_numel, peer=self.peers[b])

    def local_view(self, piece: LocalSlice, *, shape: torch.Size | None = None) -> torch.Tensor:
        """Return the owned piece of a parameter as a view of its bucket or home (1-D, or `shape` if given)."""
        home = self._index_to_home[self._offset + piece.index]
        view = to_flat(home, memory_perm(home)).narrow(0, piece.in_param.start, piece.in_param.numel)
        if shape is None:
            return view
        return from_flat(view, shape, memory_perm(home))

    def _flat_home(self, index: int) -> torch.Tensor:
        """Return parameter `index`'s home as a 1-D view in memory order."""
        home = self._index_to_home[index]
        return to_flat(home, memory_perm(home))

    def bind_params_(self, params: Sequence[torch.Tensor]) -> None:
        """Point every parameter's storage at its home (values are already there).

        Args:
            params: the optimizer's list of all parameters (indexed with the offset).
        """
        for index, home in self._index_to_home.items():
            if not at_home(params[index], home):
                params[index].data = home


def at_home(param: torch.Tensor, home: torch.Tensor) -> bool:
    """Return whether `param`'s storage is `home` (the same memory, laid out the same way)."""
    return param.data_ptr() == home.data_ptr() and param.stride() == home.stride()


def _alone_in_storage(params: Sequence[torch.Tensor]) -> list[bool]:
    """Return, per parameter, whether it is all of its storage, dense, not shared, and alone in it.

    Only such a parameter can move to a new home without cutting it off from another tensor (a
    larger tensor it is a view of, or a parameter tied to it through `.data`).
    """
    ptrs: list[int | None] = []
    for param in params:
        try:
            storage = param.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            ptrs.append(None)
            continue
        dense = param.is_contiguous() or memory_perm(param) is not None
        whole = param.storage_offset() == 0 and storage.nbytes() == param.numel() * param.element_size()
        # NOTE: already in shared memory (model.share_memory(), for other processes): stays there.
        ptrs.append(storage.data_ptr() if dense and whole and not storage.is_shared() else None)
    counts = Counter(ptrs)
    # NOTE: an empty parameter holds nothing to cut off (and empty storages may share address 0).
    return [p.numel() == 0 or (ptr is not None and counts[ptr] == 1) for p, ptr in zip(params, ptrs)]
