"""The parameter gathers of one step: every updated bucket back to every rank, in bucket order.

Synchronous transports (shared memory, MPI) take several buckets in one round; asynchronous ones
(torch collectives) keep a bounded number in flight. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch

from shardoptim.comm import Comm
from shardoptim.pieces import Bucket
from shardoptim.storage import ParamStorage
from shardoptim.transports import PendingGather

if TYPE_CHECKING:
    from shardoptim.placement import Placement


#: Own-storage mode: gathers through a scratch bucket that are synchronous (MPI) share a round
#: while their scratch buckets total under this many bytes (one large bucket goes alone, so its
#: scratch is the only one alive), and at most _SCRATCH_IN_FLIGHT asynchronous ones are in
#: flight: the whole buckets alive at once stay bounded whatever the model. Shared-memory gathers
#: need no scratch: they read and write the parameters in place.
_GATHER_BATCH_NBYTES = 4 << 20
_SCRATCH_IN_FLIGHT = 2


class GatherQueue:
    """The gathers of one step, in bucket order: synchronous ones batched, the others in flight.

    Collective: every rank adds the same buckets in the same order, then calls `finish`.
    """

    def __init__(self, comm: Comm, storage: ParamStorage, params: list[torch.Tensor]) -> None:
        self._comm = comm
        self._storage = storage
        self._params = params
        self._batched: list[tuple[Bucket, torch.Tensor | None]] = []
        self._batched_nbytes = 0
        self._pending: deque[tuple[Bucket, torch.Tensor, PendingGather]] = deque()

    def add(self, b: int, bucket: Bucket) -> None:
        """Start gathering bucket `b` (after its local update)."""
        device = bucket.segments.device
        if self._comm.world_size == 1:
            self._storage.finish_gather_(bucket, None)
            return
        if self._comm.gathers_in_place(device):
            self._batched.append((bucket, None))  # one round for several; no scratch at all
            return
        bounded = bucket.buffer is None
        synchronous = self._comm.gathers_synchronously(device)
        nbytes = bucket.numel * bucket.segments.element_size()
        if synchronous and bounded and self._batched_nbytes + nbytes > _GATHER_BATCH_NBYTES:
            self._flush()  # before taking this bucket's scratch: the previous ones go back first
        whole = self._storage.gather_target(bucket, self._comm.rank)
        if synchronous:
            self._batched.append((bucket, whole))  # no overlap to gain: one round for several
            self._batched_nbytes += nbytes
        else:
            handle = self._comm.gather_bucket_async(whole, bucket.bounds, what=f"parameter gather (bucket {b})")
            self._pending.append((bucket, whole, handle))
            if bounded and len(self._pending) > _SCRATCH_IN_FLIGHT:
                self._finish_oldest()

    def finish(self) -> None:
        """Wait for every gather and copy the values out into the parameters (own storage)."""
        self._flush()
        while self._pending:
            self._finish_oldest()
        self._storage.in_step_(self._params)

    def _flush(self) -> None:
        if not self._batched:
            return
        self._comm.gather_buckets_(
            [(bucket.segments if whole is None else whole, bucket.bounds) for bucket, whole in self._batched],
            what="parameter gather",
        )
        for bucket, whole in self._batched:
            self._storage.finish_gather_(bucket, whole)
        self._batched.clear()
        self._batched_nbytes = 0

    def _finish_oldest(self) -> None:
        bucket, whole, handle = self._pending.popleft()
        handle.wait()
        self._storage.finish_gather_(bucket, whole)


def gather_all(placement: Placement) -> None:
    """All-gather every bucket so each rank holds the full parameters.

    Collective: call on every rank of the group, in the same order.
    """
    gathers = GatherQueue(placement.comm, placement.storage, placement.params)
    for b, bucket in enumerate(placement.buckets):
        gathers.add(b, bucket)
    gathers.finish()
