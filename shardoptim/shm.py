"""A node-local shared-memory staging area for gathering CPU buckets between ranks of one host.

gloo moves CPU tensors between local ranks through TCP loopback: the kernel copies every byte
twice and the gather dominates a sharded step. When every rank of the group runs on one host, a
bucket is gathered instead by each rank copying its fresh range into a shared staging buffer
(one per host, in /dev/shm), a barrier, each rank copying the other ranges out, and a second
barrier before the buffer is reused. The parameters themselves stay private to each rank.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

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


class SharedStaging:
    """One shared byte buffer per host, grown collectively to the largest bucket gathered.

    Args:
        rank: this rank in the group.
        all_gather_object: the group's object all-gather (to agree on the file name).
        barrier: the group's barrier (under the group's timeout).
    """

    def __init__(
        self,
        rank: int,
        all_gather_object: Callable[[object], list[object]],
        barrier: Callable[[], None],
    ) -> None:
        self._rank = rank
        self._all_gather_object = all_gather_object
        self._barrier = barrier
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def _ensure(self, nbytes: int) -> None:
        """Grow the buffer to at least `nbytes` (Collective: every rank sees the same sizes)."""
        if nbytes <= self._buffer.numel():
            return
        name = self._all_gather_object(f"shardoptim-{uuid.uuid4().hex}" if self._rank == 0 else None)[0]
        path = os.path.join(SHM_DIR, str(name))
        if self._rank == 0:
            self._buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._barrier()
        if self._rank != 0:
            self._buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._barrier()
        if self._rank == 0:
            os.unlink(path)  # the mappings stay valid; nothing is left behind in /dev/shm

    def gather_(self, bucket: torch.Tensor, bounds: Sequence[int]) -> None:
        """Fill every rank's range of `bucket` from its owner through the shared buffer.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        self._ensure(bucket.numel() * bucket.element_size())
        stage = self._buffer[: bucket.numel() * bucket.element_size()].view(bucket.dtype)
        start, end = bounds[self._rank], bounds[self._rank + 1]
        stage[start:end].copy_(bucket[start:end])
        self._barrier()
        bucket[:start].copy_(stage[:start])
        bucket[end:].copy_(stage[end:])
        self._barrier()
