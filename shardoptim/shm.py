"""A node-local shared-memory staging area for gathering CPU buckets between ranks of one host.

gloo moves CPU tensors between local ranks through TCP loopback: the kernel copies every byte
twice and the gather dominates a sharded step. When every rank of the group runs on one host, a
bucket is gathered instead by each rank copying its fresh range into a shared staging buffer
(one per host, in /dev/shm), a barrier, each rank copying the other ranges out, and a second
barrier before the buffer is reused. The parameters themselves stay private to each rank.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

#: Where the staging files live while the ranks map them (unlinked right after).
SHM_DIR = "/dev/shm"


def same_host(all_gather_object: Callable[[object], list[object]]) -> bool:
    """Return whether every rank runs on this host (same hostname and boot id).

    Collective: call on every rank of the group, in the same order. Same result on every rank.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = ""
    mine = (socket.gethostname(), boot, os.path.isdir(SHM_DIR))
    everyone = all_gather_object(mine)
    return all(other == mine for other in everyone) and mine[2]


def _aligned(nbytes: int) -> int:
    """Round `nbytes` up to a multiple of 64 (a cache line), where each staged block starts."""
    return -(-nbytes // 64) * 64


class SharedStaging:
    """One shared byte buffer per host, grown collectively to the largest bucket gathered.

    Args:
        rank: this rank in the group.
        world_size: ranks in the group.
        all_gather_object: the group's object all-gather (to agree on the file name).
        barrier: the group's barrier (under the group's timeout).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        all_gather_object: Callable[[object], list[object]],
        barrier: Callable[[], None],
    ) -> None:
        self._rank = rank
        self._world_size = world_size
        self._next_set = 0
        self._all_gather_object = all_gather_object
        self._barrier = barrier
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def _ensure(self, nbytes: int) -> bool:
        """Grow the buffer to at least `nbytes`; return False on every rank if /dev/shm is too small.

        Rank 0 reserves the file's blocks with posix_fallocate before anyone maps it: a sparse
        mapping of a too-small tmpfs would otherwise die with SIGBUS on first touch.

        Collective: every rank sees the same sizes, in the same order.
        """
        if nbytes <= self._buffer.numel():
            return True
        name: str | None = None
        if self._rank == 0:
            name = f"shardoptim-{uuid.uuid4().hex}"
            path = os.path.join(SHM_DIR, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                finally:
                    os.close(fd)
            except OSError as err:
                logger.warning(
                    "cannot reserve %d bytes in %s (%s); gathering through gloo instead", nbytes, SHM_DIR, err
                )
                with contextlib.suppress(OSError):
                    os.unlink(path)
                name = None
        name = self._all_gather_object(name)[0]  # type: ignore[assignment]
        if name is None:
            return False
        path = os.path.join(SHM_DIR, str(name))
        self._buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._barrier()
        if self._rank == 0:
            os.unlink(path)  # the mappings stay valid; nothing is left behind in /dev/shm
        return True

    def gather_(self, bucket: torch.Tensor, bounds: Sequence[int]) -> bool:
        """Fill every rank's range of `bucket` from its owner through the shared buffer.

        Returns False (on every rank, having done nothing) when the staging buffer cannot grow.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        return self.gather_many_([(bucket, bounds)])

    def gather_many_(self, buckets: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> bool:
        """Gather several CPU buckets in one round: all copies in, one barrier, all copies out.

        Two barriers for the lot instead of two per bucket. Returns False (on every rank, having
        done nothing) when the staging buffer cannot grow to hold them all.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        offsets, total = [], 0
        for bucket, _ in buckets:
            offsets.append(total)
            total += _aligned(bucket.numel() * bucket.element_size())
        if not self._ensure(total):
            return False
        stages = []
        for (bucket, bounds), offset in zip(buckets, offsets):
            nbytes = bucket.numel() * bucket.element_size()
            stage = self._buffer[offset : offset + nbytes].view(bucket.dtype)
            start, end = bounds[self._rank], bounds[self._rank + 1]
            stage[start:end].copy_(bucket[start:end])
            stages.append(stage)
        self._barrier()
        for (bucket, bounds), stage in zip(buckets, stages):
            start, end = bounds[self._rank], bounds[self._rank + 1]
            bucket[:start].copy_(stage[:start])
            bucket[end:].copy_(stage[end:])
        self._barrier()
        return True

    def reduce_scatter_(
        self,
        bucket: torch.Tensor,
        bounds: Sequence[int],
        out: torch.Tensor,
        *,
        accumulate: bool = False,
        scale: float = 1.0,
    ) -> bool:
        """Set `out` to `scale` times the sum over ranks of this rank's range of `bucket` (or add it).

        Each rank copies its whole bucket into its slot of one of two slot sets, used in turn;
        after one barrier each rank adds up its range across the slots in rank order (the same
        order on every rank, so the result does not depend on timing). No second barrier: a set
        is written again only two calls later, after the next call's barrier, which every rank
        reaches only once done reading. So a staging area used for reductions must serve nothing
        else. `out` may be wider than `bucket` (fp32 sums of a bf16 bucket). Returns False (on
        every rank, having done nothing) when the staging buffer cannot grow.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        numel, itemsize = bucket.numel(), bucket.element_size()
        set_nbytes = _aligned(self._world_size * numel * itemsize)
        if not self._ensure(2 * set_nbytes):
            return False
        # NOTE: the sets are the two halves of the buffer, whatever this bucket's size: a set sized
        # per call would let a larger bucket's set 0 overlap a smaller one's set 1 still being read.
        offset = self._next_set * (self._buffer.numel() // 2 // 64 * 64)
        self._next_set ^= 1
        slots = self._buffer[offset : offset + self._world_size * numel * itemsize].view(bucket.dtype)
        slots = slots.view(self._world_size, numel)
        slots[self._rank].copy_(bucket)
        self._barrier()
        start, end = bounds[self._rank], bounds[self._rank + 1]
        if accumulate:
            for rank in range(self._world_size):
                out.add_(slots[rank, start:end], alpha=scale)
        else:
            out.copy_(slots[0, start:end])
            for rank in range(1, self._world_size):
                out.add_(slots[rank, start:end])
            if scale != 1.0:
                out.mul_(scale)
        return True
