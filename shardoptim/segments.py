"""A flat bucket held in several tensors: the parameters' own storage, addressed by bucket offset.

With `parameters_as_bucket_view=False` a bucket is not one buffer: each parameter keeps its own
storage, and the bucket's elements are those parameters laid end to end (with padding between
them, which no tensor holds). `Segments` lets a shared-memory gather read this rank's range of
such a bucket out of the parameters and write the other ranks' ranges straight into them, with
no whole-bucket buffer. A plain 1-D tensor is the special case of one segment. Pure torch: must
not import torch.distributed.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardoptim.peer_region import PeerBucket


class Segments:
    """Disjoint 1-D tensors, each at an offset of one flat bucket; the gaps between them are padding.

    Args:
        parts: (start in the bucket, 1-D tensor) per segment, sorted by start and disjoint, all of
            one dtype and device.
        numel: elements of the whole bucket (padding included).
        peer: the bucket in every rank's mapping when it lives in a peer region (shardoptim.peer_region):
            a shared-memory gather then reads the other ranks' ranges straight from their mappings.
    """

    def __init__(
        self, parts: Sequence[tuple[int, torch.Tensor]], numel: int, *, peer: PeerBucket | None = None
    ) -> None:
        if not parts:
            raise ValueError("Segments needs at least one tensor")
        self.dtype = parts[0][1].dtype
        self.device = parts[0][1].device
        self.numel = numel
        self.peer = peer
        self.parts = [(start, t) for start, t in parts if t.numel()]
        self._starts = [start for start, _ in self.parts]
        ends = [start + t.numel() for start, t in self.parts]
        if any(end > nxt for end, nxt in zip(ends, self._starts[1:])) or max(ends, default=0) > numel:
            spans = [(start, t.numel()) for start, t in self.parts]
            raise ValueError(f"segments overlap or pass the bucket's {numel} elements: (start, numel) {spans}")

    @classmethod
    def whole(cls, tensor: torch.Tensor, *, peer: PeerBucket | None = None) -> Segments:
        """Return a 1-D tensor as a bucket of one segment."""
        return cls([(0, tensor)], tensor.numel(), peer=peer)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def pairs(self, lo: int, hi: int, flat: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return matching views of the segments and of `flat` (bucket elements lo..hi) where they overlap.

        One view per segment in range: a caller that copies the same ranges every step should
        keep the lists (the segments never change) rather than ask again.
        """
        mine: list[torch.Tensor] = []
        theirs: list[torch.Tensor] = []
        first = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        for start, tensor in self.parts[first:]:
            if start >= hi:
                break
            a, b = max(lo, start), min(hi, start + tensor.numel())
            if a < b:
                mine.append(tensor.narrow(0, a - start, b - a))
                theirs.append(flat.narrow(0, a - lo, b - a))
        return mine, theirs

    def read_(self, lo: int, hi: int, out: torch.Tensor) -> None:
        """Copy bucket elements [lo, hi) into `out` (out[0] is element lo); padding leaves `out` as it was."""
        mine, theirs = self.pairs(lo, hi, out)
        if mine:
            torch._foreach_copy_(theirs, mine)

    def write_(self, lo: int, hi: int, src: torch.Tensor) -> None:
        """Copy `src` (bucket elements [lo, hi)) into the segments; padding is dropped."""
        mine, theirs = self.pairs(lo, hi, src)
        if mine:
            torch._foreach_copy_(mine, theirs)
