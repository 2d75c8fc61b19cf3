"""CPU buckets over mpi4py under an MPI launcher, where that measures faster than the torch-side way.

Each operation (gather, reduce-scatter) is timed once, on its first real bucket, against the
transport it would replace (shared memory or gloo), and the faster one serves it from then on,
the same on every rank. bf16/fp16 reductions always go the other way: MPI has no type that adds
them correctly. Must not import shardoptim.optimizer or anything above shardoptim.comm.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from shardoptim.mpi_comm import MpiCollectives
from shardoptim.transports import Bucketlike, BucketTransport, PendingGather, PendingReduce, TransportName

if TYPE_CHECKING:
    from shardoptim.comm import Comm

logger = logging.getLogger("shardoptim.comm")

#: Timing repeats per candidate when choosing between MPI and torch.distributed.
_CALIBRATION_REPEATS = 3


class MpiTransport:
    """mpi4py for the CPU buckets it serves faster, `other` for the rest (see the module docstring).

    Args:
        comm: the shard group.
        mpi: the MPI collectives over the same ranks.
        other: the transport MPI is timed against and that serves what MPI does not.
        forced: use MPI wherever it can serve, without timing (comm_backend="mpi").
    """

    name: TransportName = "mpi"

    def __init__(self, comm: Comm, mpi: MpiCollectives, other: BucketTransport, *, forced: bool) -> None:
        self.comm = comm
        self.mpi = mpi
        self.other = other
        self._forced = forced
        #: Whether MPI serves gathers / fp32-fp64 reduce-scatters (None until timed on first use).
        self.gathers: bool | None = True if forced else None
        self.reduces: bool | None = True if forced else None
        self._scratches: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    @property
    def synchronous(self) -> bool:
        return self.gathers is not False or self.other.synchronous

    @property
    def in_place(self) -> bool:
        # NOTE: until gathers are timed MPI may serve them, and MPI needs whole buckets.
        return self.gathers is False and self.other.in_place

    def gather_async(self, bucket: torch.Tensor, bounds: Sequence[int], *, what: str) -> PendingGather:
        if bucket.element_size() not in (1, 2, 4, 8):
            return self.other.gather_async(bucket, bounds, what=what)
        if self.gathers is None:
            self.gathers = self._faster(
                lambda: self.mpi.all_gather_bucket_(bucket, bounds),
                lambda: self.other.gather_async(bucket, bounds, what=what).wait(),
                what="bucket gather",
            )
        if not self.gathers:
            return self.other.gather_async(bucket, bounds, what=what)
        self.mpi.all_gather_bucket_(bucket, bounds)
        return PendingGather(self.comm, [], what)

    def gather_many_(self, buckets: Sequence[tuple[Bucketlike, Sequence[int]]], *, what: str) -> None:
        if self.gathers is False:
            self.other.gather_many_(buckets, what=what)
            return
        for given, bounds in buckets:
            assert isinstance(given, torch.Tensor), "MPI gathers whole buckets, not Segments"
            self.gather_async(given, bounds, what=what).wait()

    def reduce_scatter_async(
        self, bucket: torch.Tensor, bounds: Sequence[int], out: torch.Tensor, *, accumulate: bool, what: str
    ) -> PendingReduce:
        if bucket.dtype not in (torch.float32, torch.float64):  # never bf16/fp16 (see the module docstring)
            return self.other.reduce_scatter_async(bucket, bounds, out, accumulate=accumulate, what=what)
        start, end = bounds[self.comm.rank], bounds[self.comm.rank + 1]
        total = self._scratch(end - start, bucket.dtype)
        if self.reduces is None:
            if self.other.name == "shm":  # the one other way that is idempotent and may be faster
                self.reduces = self._faster(
                    lambda: self.mpi.reduce_scatter_bucket_(bucket, bounds, total),
                    lambda: self._other_reduce(bucket, bounds, total, what),
                    what="gradient reduce-scatter",
                )
            else:
                self.reduces = True  # gloo over TCP: measured 2-4x slower (benchmarks/comm.py)
        if not self.reduces:
            return self.other.reduce_scatter_async(bucket, bounds, out, accumulate=accumulate, what=what)
        self.mpi.reduce_scatter_bucket_(bucket, bounds, total)
        return PendingReduce(self.comm, [], total=total, out=out, accumulate=accumulate, what=what)

    def _other_reduce(self, bucket: torch.Tensor, bounds: Sequence[int], like: torch.Tensor, what: str) -> None:
        """One reduce-scatter the other way, into scratch (the calibration's candidate)."""
        out = torch.empty_like(like)
        self.other.reduce_scatter_async(bucket.clone(), bounds, out, accumulate=False, what=what).wait()

    def _scratch(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Return a reused CPU scratch tensor (fresh large allocations cost page faults every step).

        NOTE: MPI's reduction is complete when the call returns, and the caller finishes it (wait)
        before launching another, so one scratch per size serves every call.
        """
        scratch = self._scratches.get((numel, dtype))
        if scratch is None:
            scratch = self._scratches[(numel, dtype)] = torch.empty(numel, dtype=dtype)
        return scratch

    def _faster(self, run_mpi: Callable[[], None], run_other: Callable[[], None], what: str) -> bool:
        """Time both ways of one idempotent collective; return whether MPI wins on the slowest rank.

        Collective: both candidates run on every rank, then one object all-gather of the timings.
        """
        if self._forced:
            return True

        def median_s(run: Callable[[], None]) -> float:
            times = []
            for _ in range(_CALIBRATION_REPEATS):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        mine = (median_s(run_mpi), median_s(run_other))
        rank_to_times = self.comm.all_gather_object(mine, what=f"{what} calibration")
        mpi_s = max(t[0] for t in rank_to_times)  # type: ignore[index]
        other_s = max(t[1] for t in rank_to_times)  # type: ignore[index]
        if self.comm.rank == 0:
            logger.info("%s: MPI %.2f ms, %s %.2f ms", what, 1e3 * mpi_s, self.other.name, 1e3 * other_s)
        return bool(mpi_s < other_s)


def open_mpi(comm: Comm) -> MpiCollectives | None:
    """Return MPI collectives when the user allows them and every rank can use them.

    Collective: one object all-gather, so every rank agrees.
    """
    mpi = MpiCollectives.create(
        comm.rank,
        world_size=comm.world_size,
        global_ranks=[comm.global_rank(r) for r in range(comm.world_size)],
        timeout_s=comm.timeout_s(),
    )
    everyone = comm.all_gather_object(mpi is not None, what="MPI availability check")
    if all(everyone):
        return mpi
    if comm.backend_choice == "mpi":
        raise ValueError(
            f"{comm.prefix}comm_backend='mpi' but MPI cannot serve this group on ranks "
            f"{[r for r, ok in enumerate(everyone) if not ok]}: launch with mpirun/mpiexec, install mpi4py "
            "(pip install shardoptim[mpi]) and shard over the whole MPI world; or use comm_backend='auto'"
        )
    return None
