"""How whole buckets move between ranks: one interface, one implementation per way.

A bucket transport gathers a flat bucket (every rank's range from its owner) and mean-reduce-
scatters one (every rank gets the average of its range). `Comm` picks one per device type on
first use, the same on every rank, and keeps it: nothing switches ways in the middle of a run.

- `TorchTransport`: torch.distributed collectives. "all_gather" (in-place all_gather_into_tensor,
  right for NCCL; uneven ranges padded to the largest) or "broadcast" (one async broadcast per
  owner straight into its range: about 3x faster than gloo's all-gather at 100 MB, 2 ranks).
- `ShmTransport`: when every rank of a CPU group is on one host, through shared memory: buckets in
  peer regions (shardoptim.peer_region) are gathered by copying each owner's range straight out
  of its mapping (one copy), the others through a staging area mapped up front (shardoptim.shm:
  in, then out); either way about 5x faster than gloo's broadcasts at 2 ranks or better, reading
  and writing the parameters' own storage (`Segments`) directly.
- `MpiTransport` (shardoptim.mpi_transport): mpi4py under an MPI launcher, timed once against
  the transport it would replace.

Must not import shardoptim.optimizer or anything above shardoptim.comm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.distributed as dist

from shardoptim.kept import KeptByIdentity
from shardoptim.peer_region import PeerBucket, PeerGather
from shardoptim.segments import Segments
from shardoptim.shm import SharedStaging

if TYPE_CHECKING:
    from shardoptim.comm import Comm

#: The ways a bucket can move (see the module docstring); "mpi" wraps one of the others.
TransportName = Literal["broadcast", "all_gather", "shm", "mpi"]

# NOTE: torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names warn).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

#: The padded transports of uneven ranges (whole-tensor layouts) send world_size x the largest
#: range; above this multiple of the bucket itself they fall back to one call per owner.
_MAX_PADDED_RATIO = 2.0
#: Bucket bounds whose range sizes are kept (see `Ranges`); more buckets than this recompute.
_MAX_KEPT_RANGES = 1024

Bucketlike = torch.Tensor | Segments


class PendingGather:
    """Handles of the async collectives that fill one bucket; `wait()` blocks until they finish."""

    def __init__(
        self, comm: Comm, works: Sequence[dist.Work], what: str, finish: Callable[[], None] | None = None
    ) -> None:
        self._comm = comm
        self._works = list(works)
        self._what = what
        self._finish = finish

    def wait(self) -> None:
        """Wait for every handle, raising a RuntimeError that names the operation on failure."""
        for work in self._works:
            self._comm.wait_work(work, self._what)
        self._works.clear()
        finish, self._finish = self._finish, None
        if finish is not None:  # the padded transport: copy the ranks' ranges out into the bucket
            finish()


class PendingReduce:
    """The async mean-reduce-scatter of one bucket; `wait()` finishes it into its `out` tensor."""

    def __init__(
        self,
        comm: Comm,
        works: Sequence[dist.Work],
        *,
        total: torch.Tensor | None,
        out: torch.Tensor,
        accumulate: bool,
        what: str,
        scale: float | None = None,
    ) -> None:
        self._comm = comm
        self._works = list(works)
        self._total = total
        self._out = out
        self._accumulate = accumulate
        self._what = what
        #: What the arrived total is multiplied by: 1 / world_size for a sum, 1 when already averaged.
        self._scale = 1.0 / comm.world_size if scale is None else scale

    @property
    def done(self) -> bool:
        """Whether the communication has finished (waiting would not block)."""
        return all(work.is_completed() for work in self._works)

    def wait(self) -> torch.Tensor:
        """Wait; then `out` holds (out if accumulating, else 0) + sum / world_size. Returns `out`."""
        for work in self._works:
            self._comm.wait_work(work, self._what)
        self._works.clear()
        total, self._total = self._total, None
        if total is not None:  # the sum arrived in a scratch tensor: take the mean into out
            scale = self._scale
            if self._accumulate:
                self._out.add_(total, alpha=scale)
            else:
                self._out.copy_(total)
                if scale != 1.0:
                    self._out.mul_(scale)
        return self._out


class BucketTransport(Protocol):
    """One way of moving whole buckets (see the module docstring). Every method is a collective."""

    name: TransportName

    @property
    def synchronous(self) -> bool:
        """Whether a gather completes inside the call (no overlap with the next bucket's update)."""
        ...

    @property
    def in_place(self) -> bool:
        """Whether gathers take `Segments` (the parameters' own storage) instead of a whole bucket."""
        ...

    def gather_async(self, bucket: torch.Tensor, bounds: Sequence[int], *, what: str) -> PendingGather: ...

    def gather_many_(self, buckets: Sequence[tuple[Bucketlike, Sequence[int]]], *, what: str) -> None: ...

    def reduce_scatter_async(
        self, bucket: torch.Tensor, bounds: Sequence[int], out: torch.Tensor, *, accumulate: bool, what: str
    ) -> PendingReduce: ...


class Ranges:
    """The size of every rank's range of a bucket's bounds, and whether all are equal, kept per bounds.

    A bucket's bounds never change: at thousands of ranks, building the sizes again for every
    bucket of every step was most of the step's host time.
    """

    def __init__(self) -> None:
        self._kept: KeptByIdentity[tuple[list[int], bool]] = KeptByIdentity(_MAX_KEPT_RANGES)

    def __call__(self, bounds: Sequence[int]) -> tuple[list[int], bool]:
        hit = self._kept.get((bounds,))
        if hit is not None:
            return hit
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        return self._kept.put((bounds,), (sizes, len(set(sizes)) == 1))


class TorchTransport:
    """Buckets over torch.distributed collectives: `name` "all_gather" or "broadcast"."""

    synchronous = False
    in_place = False

    def __init__(self, comm: Comm, name: Literal["all_gather", "broadcast"]) -> None:
        self.comm = comm
        self.name: TransportName = name
        self._ranges = Ranges()

    def gather_async(self, bucket: torch.Tensor, bounds: Sequence[int], *, what: str) -> PendingGather:
        comm = self.comm
        sizes, even = self._ranges(bounds)
        rank, group = comm.rank, comm.group
        if self.name == "all_gather" and even:
            work = all_gather_single(bucket, bucket.narrow(0, bounds[rank], sizes[rank]), group=group, async_op=True)
            assert work is not None
            return PendingGather(comm, [work], what)
        if self.name == "all_gather" and _pads_cheaply(sizes):
            # Uneven ranges (whole-tensor layouts): every range padded to the largest, one call.
            width = max(sizes)
            padded = torch.empty(comm.world_size * width, dtype=bucket.dtype, device=bucket.device)
            rows, parts = _padded_rows(padded, bucket, bounds, width)
            rows[rank].copy_(parts[rank])
            work = all_gather_single(padded, padded.narrow(0, rank * width, width), group=group, async_op=True)
            assert work is not None
            others = [r for r in range(comm.world_size) if r != rank and sizes[r]]

            def unpad() -> None:
                torch._foreach_copy_([parts[r] for r in others], [rows[r] for r in others])

            return PendingGather(comm, [work], what, finish=unpad if others else None)
        works = []
        for owner, numel in enumerate(sizes):
            if numel:
                part = bucket.narrow(0, bounds[owner], numel)
                work = dist.broadcast(part, src=comm.global_rank(owner), group=group, async_op=True)
                assert work is not None
                works.append(work)
        return PendingGather(comm, works, what)

    def gather_many_(self, buckets: Sequence[tuple[Bucketlike, Sequence[int]]], *, what: str) -> None:
        pending = []
        for given, bounds in buckets:
            assert isinstance(given, torch.Tensor), "torch collectives gather whole buckets, not Segments"
            pending.append(self.gather_async(given, bounds, what=what))
        for handle in pending:
            handle.wait()

    def reduce_scatter_async(
        self, bucket: torch.Tensor, bounds: Sequence[int], out: torch.Tensor, *, accumulate: bool, what: str
    ) -> PendingReduce:
        comm = self.comm
        sizes, even = self._ranges(bounds)
        start, end = bounds[comm.rank], bounds[comm.rank + 1]
        works: list[dist.Work | None] = []
        op, mean_scale = comm.mean_op_(bucket)
        if even:
            # a fresh result per launch: several of these may be in flight at once
            total = torch.empty(end - start, dtype=bucket.dtype, device=bucket.device)
            works.append(reduce_scatter_single(total, bucket, op=op, group=comm.group, async_op=True))
        elif self.name == "all_gather" and _pads_cheaply(sizes):
            # Uneven ranges (whole-tensor layouts): every range padded to the largest, one call.
            width = max(sizes)
            padded = torch.zeros(comm.world_size * width, dtype=bucket.dtype, device=bucket.device)
            rows, parts = _padded_rows(padded, bucket, bounds, width)
            filled = [r for r in range(comm.world_size) if sizes[r]]
            torch._foreach_copy_([rows[r] for r in filled], [parts[r] for r in filled])
            result = torch.empty(width, dtype=bucket.dtype, device=bucket.device)
            works.append(reduce_scatter_single(result, padded, op=op, group=comm.group, async_op=True))
            total = result.narrow(0, 0, end - start)
        else:
            # Uneven ranges (whole-tensor layouts): one reduce per owner, into its own range.
            for owner, numel in enumerate(sizes):
                if numel:
                    part = bucket.narrow(0, bounds[owner], numel)
                    works.append(dist.reduce(part, dst=comm.global_rank(owner), op=op, group=comm.group, async_op=True))
            total = bucket[start:end]
        done = [w for w in works if w is not None]
        assert len(done) == len(works)
        return PendingReduce(comm, done, total=total, out=out, accumulate=accumulate, what=what, scale=mean_scale)


class ShmTransport:
    """CPU buckets through the group's shared-memory staging area (already mapped on every rank)."""

    name: TransportName = "shm"
    synchronous = True
    in_place = True

    def __init__(self, comm: Comm, staging: SharedStaging) -> None:
        self.comm = comm
        self.staging = staging
        self._peers = PeerGather(staging.barrier)

    def gather_async(self, bucket: torch.Tensor, bounds: Sequence[int], *, what: str) -> PendingGather:
        self.gather_many_([(bucket, bounds)], what=what)
        return PendingGather(self.comm, [], what)

    def gather_many_(self, buckets: Sequence[tuple[Bucketlike, Sequence[int]]], *, what: str) -> None:
        # NOTE: the same buckets are in peer regions on every rank (agreed when the regions opened).
        direct: list[tuple[PeerBucket, Sequence[int]]] = []
        staged: list[tuple[Bucketlike, Sequence[int]]] = []
        for given, bounds in buckets:
            peer = given.peer if isinstance(given, Segments) else None
            if peer is None:
                staged.append((given, bounds))
            else:
                direct.append((peer, bounds))
        if direct:
            self._peers.gather_(direct, what=what)
        if staged:
            mapped = self.staging.gather_many_(staged)
            assert mapped, "the staging area is mapped before this transport is chosen"

    def reduce_scatter_async(
        self, bucket: torch.Tensor, bounds: Sequence[int], out: torch.Tensor, *, accumulate: bool, what: str
    ) -> PendingReduce:
        world_size = self.comm.world_size
        scale = 1.0 / world_size
        if out.dtype in (torch.float16, torch.bfloat16):  # sums in out's dtype: divide first
            bucket.div_(world_size)
            scale = 1.0
        mapped = self.staging.reduce_scatter_(bucket, bounds, out, accumulate=accumulate, scale=scale)
        assert mapped, "the staging area is mapped before this transport is chosen"
        return PendingReduce(self.comm, [], total=None, out=out, accumulate=accumulate, what=what)


def _pads_cheaply(sizes: Sequence[int]) -> bool:
    """Whether padding every range of `sizes` to the largest costs at most _MAX_PADDED_RATIO x their sum."""
    total = sum(sizes)
    return total > 0 and len(sizes) * max(sizes) <= _MAX_PADDED_RATIO * total


def _padded_rows(
    padded: torch.Tensor, bucket: torch.Tensor, bounds: Sequence[int], width: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return, per rank, its row of `padded` (the first `size` elements of it) and its range of `bucket`."""
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    rows = [padded.narrow(0, r * width, numel) for r, numel in enumerate(sizes)]
    parts = [bucket.narrow(0, lo, numel) for lo, numel in zip(bounds, sizes)]
    return rows, parts
