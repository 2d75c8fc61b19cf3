"""Every collective the library issues, on one process group, with timeouts and rank-prefixed errors.

The rest of the package never calls torch.distributed directly: it holds a `Comm` and asks it to
gather buckets, broadcast or reduce small tensors. A `Comm` over no process group (torch.distributed
not initialised, world size 1) turns every collective into a local no-op, so a single process can
use ShardedOptimizer without any setup.

Must not import shardoptim.optimizer or anything above it.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from shardoptim.segments import Segments
from shardoptim.shm import SharedStaging, same_host
from shardoptim.sidegroup import host_side_group
from shardoptim.teardown import hold_until_exit

if TYPE_CHECKING:
    from shardoptim.mpi_comm import MpiCollectives

logger = logging.getLogger(__name__)

#: How a bucket's shards reach every rank after the local update.
#: "broadcast": one async broadcast per rank, each from the owner straight into its range of the
#: bucket (measured about 3x faster than gloo's all_gather_into_tensor at 100 MB, 2 ranks);
#: "all_gather": one in-place all_gather_into_tensor per bucket (the right call on NCCL);
#: "shm": through a shared-memory staging buffer, when every rank of a CPU group is on one host
#: (about 5x faster than gloo's broadcasts at 2 ranks; see benchmarks/step_time.py).
#: Under an MPI launcher, CPU buckets may go through mpi4py instead (see `Comm.mpi_gather`).
GatherMethod = Literal["broadcast", "all_gather", "shm"]

#: Timing repeats per candidate when choosing between MPI and torch.distributed.
_CALIBRATION_REPEATS = 3
#: Waits outside torch.distributed (MPI, the shared-memory barrier) last at most this long when
#: neither the Comm nor its process group says how long: torch's default group timeout.
_DEFAULT_TIMEOUT_S = 1800.0
#: Reductions (max/min) of CPU tensors up to this many bytes go through the shared staging when
#: every rank is on one host: the per-step hyperparameter and flag agreement, mostly.
_SMALL_SHM_NBYTES = 64 << 10
#: Bucket bounds whose range sizes are kept (see Comm._ranges); more buckets than this recompute.
_MAX_KEPT_RANGES = 1024

ReduceOp = Literal["sum", "mean", "max", "min"]

#: The CPU side group of each accelerator-only process group (see `Comm.for_metadata`).
_SIDE_GROUPS: dict[dist.ProcessGroup, dist.ProcessGroup] = {}

# NOTE: torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names warn).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


_warned_unsharded = False


def _warn_if_launched_unsharded() -> None:
    """Warn once per process when a launcher set WORLD_SIZE > 1 but no process group exists.

    The warning points at the first caller outside this package (the user's ShardedOptimizer(...)).
    """
    global _warned_unsharded
    raw = os.environ.get("WORLD_SIZE", "")
    if _warned_unsharded or not raw.strip().isdigit() or int(raw) <= 1:
        return
    _warned_unsharded = True
    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, stacklevel = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(
        f"WORLD_SIZE={int(raw)} is set but torch.distributed is not initialised, so the optimizer is not "
        "sharded: every process runs alone at world size 1 with the full optimizer state; call "
        "shardoptim.init_distributed() (or torch.distributed.init_process_group) before building it",
        stacklevel=stacklevel,
    )


#: The padded transports of uneven ranges (whole-tensor layouts) send world_size x the largest
#: range; above this multiple of the bucket itself they fall back to one call per owner.
_MAX_PADDED_RATIO = 2.0


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


def _group_device_types(group: dist.ProcessGroup | None, backend: str) -> tuple[str, ...]:
    """Return the device types `group` has backends for, from the group (or the backend string)."""
    try:
        assert group is not None
        types = tuple(dict.fromkeys(d.type for d in group._device_types))
    except (AttributeError, AssertionError, RuntimeError):
        types = ()
    if types:
        return types
    # A torch without _device_types, or a group whose backends are not registered yet:
    # "cpu:gloo,cuda:nccl" names its devices; a plain name is NCCL's CUDA or a CPU backend.
    if ":" in backend:
        return tuple(dict.fromkeys(part.split(":")[0].strip() for part in backend.split(",")))
    return ("cuda",) if backend == "nccl" else ("cpu",)


class Comm:
    """The shard group: this rank, the world size, and the collectives used on it.

    Args:
        group: the process group to shard over; None means the default group when
            torch.distributed is initialised, else a single local process.
        timeout: how long a wait on an async collective may take before it raises. None uses
            the process group's own timeout (set by `init_process_group(timeout=...)`).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: timedelta | None = None,
        backend_choice: str = "auto",
    ) -> None:
        self.group = group
        self.backend_choice = backend_choice
        self.is_distributed = dist.is_available() and dist.is_initialized()
        if group is not None and not self.is_distributed:
            raise RuntimeError(
                "a process_group was given but torch.distributed is not initialised; call "
                "shardoptim.init_distributed() (or torch.distributed.init_process_group) first"
            )
        if self.is_distributed:
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self.backend = str(dist.get_backend(group))
            if self.rank < 0:
                raise ValueError(
                    f"this process (global rank {dist.get_rank()}) is not a member of the given "
                    "process_group; build the optimizer only on the group's ranks"
                )
            # NOTE: so the group is never destroyed where its gloo workers cannot finish (see teardown.py).
            hold_until_exit(group)
        else:
            self.rank, self.world_size, self.backend = 0, 1, "none"
            _warn_if_launched_unsharded()
        self.timeout = timeout
        #: None until the first bucket gather picks one (that choice is a collective).
        self.gather_method: GatherMethod | None = None if self.backend == "gloo" else "all_gather"
        #: Whether CPU bucket gathers / fp32-fp64 reduce-scatters go through mpi4py (None: not
        #: decided yet; decided on first use by timing both ways, the same on every rank).
        self.mpi_gather: bool | None = None if self.backend == "gloo" else False
        self.mpi_reduce: bool | None = None if self.backend == "gloo" else False
        self._staging: SharedStaging | None = None
        self._mpi: MpiCollectives | None = None
        self._scratches: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        #: Host reads of collective results off the CPU so far (see `to_host`); shared with the
        #: metadata Comm (`for_metadata`), so one count covers the whole step.
        self.host_reads = [0]
        self._bounds_to_ranges: dict[int, tuple[Sequence[int], list[int], bool]] = {}

    def for_metadata(self) -> Comm:
        """Return the Comm for the step's small metadata that the host reads (agreements, flags).

        This Comm itself when its group has a CPU backend (or there is no group); else a Comm over
        a gloo group of the same ranks (see shardoptim.sidegroup), made once per process group and
        kept, so reading the agreed values never waits for the accelerator.

        Collective the first time for a group without a CPU backend: call on every rank of the
        group, in the same order (ShardedOptimizer calls it at construction).
        """
        if not self.is_distributed or self.world_size == 1 or "cpu" in self.device_types:
            return self
        group = self.group if self.group is not None else dist.group.WORLD
        assert group is not None
        side = _SIDE_GROUPS.get(group)
        if side is None:
            side = host_side_group(self.group, timeout_s=self.timeout_s())
            hold_until_exit(side)
            _SIDE_GROUPS[group] = side
        meta = Comm(side, timeout=self.timeout, backend_choice="torch")
        meta.host_reads = self.host_reads
        if meta.rank != self.rank:
            raise RuntimeError(
                f"{self.prefix}the CPU side group numbers this rank {meta.rank}, not {self.rank}: the process "
                "group's ranks are not in ascending global order; build it from sorted ranks"
            )
        return meta

    def _resolve_gather_method(self) -> GatherMethod:
        if self.gather_method is None:
            gather_object = functools.partial(self.all_gather_object, what="host check")
            self.gather_method = "shm" if same_host(gather_object) else "broadcast"
            self._mpi = self._open_mpi()
            logger.debug("%sbucket gather method: %s", self.prefix, self.gather_method)
        return self.gather_method

    def _open_mpi(self) -> MpiCollectives | None:
        """Return MPI collectives when the user allows them and every rank can use them.

        Collective: one object all-gather, so every rank agrees.
        """
        if self.backend_choice == "torch":
            return None
        from shardoptim.mpi_comm import MpiCollectives

        mpi = MpiCollectives.create(
            self.rank,
            world_size=self.world_size,
            global_ranks=[self.global_rank(r) for r in range(self.world_size)],
            timeout_s=self.timeout_s(),
        )
        everyone = self.all_gather_object(mpi is not None, what="MPI availability check")
        if all(everyone):
            return mpi
        if self.backend_choice == "mpi":
            raise ValueError(
                f"{self.prefix}comm_backend='mpi' but MPI cannot serve this group on ranks "
                f"{[r for r, ok in enumerate(everyone) if not ok]}: launch with mpirun/mpiexec, install mpi4py "
                "(pip install shardoptim[mpi]) and shard over the whole MPI world; or use comm_backend='auto'"
            )
        return None

    def _faster_than_torch(
        self, run_mpi: Callable[[], None], run_torch: Callable[[], None], what: str
    ) -> bool:
        """Time both ways of one idempotent collective; return whether MPI wins on the slowest rank.

        Collective: both candidates run on every rank, then one object all-gather of the timings.
        """
        if self.backend_choice == "mpi":
            return True

        def median_s(run: Callable[[], None]) -> float:
            times = []
            for _ in range(_CALIBRATION_REPEATS):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        mine = (median_s(run_mpi), median_s(run_torch))
        rank_to_times = self.all_gather_object(mine, what=f"{what} calibration")
        mpi_s = max(t[0] for t in rank_to_times)  # type: ignore[index]
        torch_s = max(t[1] for t in rank_to_times)  # type: ignore[index]
        if self.rank == 0:
            logger.info("%s: MPI %.2f ms, torch.distributed %.2f ms", what, 1e3 * mpi_s, 1e3 * torch_s)
        return bool(mpi_s < torch_s)

    def timeout_s(self) -> float:
        """Seconds a wait outside torch.distributed (MPI, the shared-memory barrier) may last.

        The timeout given to this Comm, else the process group's own (`init_process_group(timeout=)`,
        `new_group(timeout=)`), else torch's default of 30 minutes.
        """
        if self.timeout is not None:
            return self.timeout.total_seconds()
        if not self.is_distributed:
            return _DEFAULT_TIMEOUT_S
        group = self.group if self.group is not None else dist.group.WORLD
        try:
            assert group is not None
            return float(group._get_backend(self.device).options._timeout.total_seconds())
        except (AttributeError, RuntimeError):  # a backend without options, or a torch without the field
            return _DEFAULT_TIMEOUT_S

    def _shared_staging(self) -> SharedStaging:
        """Return the one staging area of the group, for gathers and reduce-scatters alike.

        NOTE: one fixed area of two halves (shm.HALF_NBYTES each) serves every shared-
        memory collective, in the order they are called: its RSS is bounded whatever the model.
        """
        if self._staging is None:
            self._staging = SharedStaging(
                self.rank,
                self.world_size,
                functools.partial(self.all_gather_object, what="shared-memory setup"),
                lambda what: self.barrier(what=what),
                timeout_s=self.timeout_s(),
            )
        return self._staging

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}/{self.world_size}] "

    @property
    def device_types(self) -> tuple[str, ...]:
        """The device types the group has a backend for ("cpu", "cuda", ...; ("cpu",) without a group).

        Read from the group itself (`ProcessGroup._device_types`), never from the backend's name:
        `init_process_group()` without a backend reports "undefined", `init_device_mesh("cuda", ...)`
        makes such groups too, and "cpu:gloo,cuda:nccl" names two.
        """
        if not self.is_distributed:
            return ("cpu",)
        return _group_device_types(self.group if self.group is not None else dist.group.WORLD, self.backend)

    @property
    def device(self) -> torch.device:
        """The device small collective tensors live on.

        The CPU whenever the group has a CPU backend (gloo, or "cpu:gloo,cuda:nccl": flags and
        metadata then never touch an accelerator), else the group's accelerator: the current CUDA
        device for an NCCL-only group, the meta device for a fake group registered for "meta".
        """
        types = self.device_types
        if "cpu" in types:
            return torch.device("cpu")
        kind = "cuda" if "cuda" in types else types[0]
        if kind == "meta":
            return torch.device("meta")
        module = getattr(torch, kind, None)
        current = getattr(module, "current_device", None)
        return torch.device(kind, current()) if callable(current) else torch.device(kind)

    def wire_device(self, device: torch.device) -> torch.device:
        """Return the device a tensor living on `device` travels on between ranks.

        `device` itself when the group has a backend for its type (CUDA state over NCCL), else
        `self.device` (a CPU `step` scalar beside CUDA parameters on an NCCL-only group). The sender
        and the receiver of a point-to-point transfer must pass the same `device` type: the
        receiver passes the sender's (the parameter's device type is the same on every rank).
        """
        if device.type in self.device_types:
            if device.type == "cuda" and device.index is None:
                return torch.device("cuda", torch.cuda.current_device())
            return device
        return self.device

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return a small collective result on the CPU (a host-device sync when it lives on an accelerator).

        Every host read of a collective result goes through here, and `num_host_reads` counts those
        off the CPU, so tests can check how many syncs a step makes.

        NOTE: a meta tensor (torch's fake process group registered for "meta", which simulates
        an accelerator-only group in one process) has no values: it reads as zeros.
        """
        if tensor.device.type == "cpu":
            return tensor
        self.host_reads[0] += 1
        if tensor.device.type == "meta":
            return torch.zeros(tensor.shape, dtype=tensor.dtype)
        return tensor.cpu()

    @property
    def num_host_reads(self) -> int:
        """Host reads of collective results off the CPU so far, this Comm's and its metadata Comm's."""
        return self.host_reads[0]

    def global_rank(self, rank: int) -> int:
        """Return the global rank of `rank` in the shard group."""
        if not self.is_distributed or self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    def wait_work(self, work: dist.Work, what: str, *, host: bool = False) -> None:
        """Wait for one async handle; turn a failure or timeout into an error naming `what`.

        On a CPU backend (gloo) the wait always blocks the host. On NCCL a wait without a timeout
        only makes the current stream wait for the collective (what the step wants: no host
        sync); `host=True` (or a Comm built with a timeout) passes the timeout, which makes NCCL
        block the host until the collective completes and raise here when it takes longer, so the
        "a peer may have died" error fires on NCCL too. Un-waited NCCL failures are reported by
        NCCL's own watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING), which ends the process.
        """
        try:
            if self.timeout is not None:
                work.wait(self.timeout)
            elif host and self.device.type != "cpu":
                work.wait(timedelta(seconds=self.timeout_s()))
            else:
                work.wait()
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.prefix}{what} failed or timed out: {err}. A peer rank may have died or "
                "skipped this call; every rank must call the optimizer's collectives in the same order"
            ) from err

    def gather_bucket_async(self, bucket: torch.Tensor, bounds: Sequence[int], *, what: str) -> PendingGather:
        """Start filling every rank's range of `bucket` from its owner; return the pending handle.

        Collective: call on every rank of the group, in the same order.

        Args:
            bucket: the full flat buffer; this rank's range [bounds[rank], bounds[rank + 1]) holds
                its fresh values.
            bounds: world_size + 1 offsets cutting the bucket into rank ranges (same on every rank).
            what: a name for error messages.
        """
        if self.world_size == 1 or bounds[-1] == 0:
            return PendingGather(self, [], what)
        sizes, even = self._ranges(bounds)
        works: list[dist.Work] = []
        method = self._resolve_gather_method()
        mpi = self._mpi
        if mpi is not None and bucket.device.type == "cpu" and bucket.element_size() in (1, 2, 4, 8):
            if self.mpi_gather is None:
                self.mpi_gather = False  # the torch candidate below must not recurse into MPI
                self.mpi_gather = self._faster_than_torch(
                    lambda: mpi.all_gather_bucket_(bucket, bounds),
                    lambda: self.gather_bucket_async(bucket, bounds, what=what).wait(),
                    what="bucket gather",
                )
            if self.mpi_gather:
                mpi.all_gather_bucket_(bucket, bounds)
                return PendingGather(self, [], what)
        if method == "shm" and bucket.device.type == "cpu":
            if self._shared_staging().gather_(bucket, bounds):
                return PendingGather(self, [], what)
            self.gather_method = method = "broadcast"  # /dev/shm too small: same on every rank
        if method == "all_gather" and even:
            mine = bucket.narrow(0, bounds[self.rank], sizes[self.rank])
            work = _all_gather_single(bucket, mine, group=self.group, async_op=True)
            assert work is not None
            works.append(work)
        elif method == "all_gather" and _pads_cheaply(sizes):
            # Uneven ranges (whole-tensor layouts): every range padded to the largest, one call.
            width = max(sizes)
            padded = torch.empty(self.world_size * width, dtype=bucket.dtype, device=bucket.device)
            rows, parts = _padded_rows(padded, bucket, bounds, width)
            rows[self.rank].copy_(parts[self.rank])
            work = _all_gather_single(padded, padded.narrow(0, self.rank * width, width), group=self.group, async_op=True)
            assert work is not None
            others = [r for r in range(self.world_size) if r != self.rank and sizes[r]]

            def unpad() -> None:
                torch._foreach_copy_([parts[r] for r in others], [rows[r] for r in others])

            return PendingGather(self, [work], what, finish=unpad if others else None)
        else:
            for rank, numel in enumerate(sizes):
                if numel == 0:
                    continue
                part = bucket.narrow(0, bounds[rank], numel)
                work = dist.broadcast(part, src=self.global_rank(rank), group=self.group, async_op=True)
                assert work is not None
                works.append(work)
        return PendingGather(self, works, what)

    def _ranges(self, bounds: Sequence[int]) -> tuple[list[int], bool]:
        """Return the size of every rank's range of `bounds` and whether they are all equal.

        Kept per bounds object (a bucket's bounds never change): at thousands of ranks, building
        them again for every bucket of every step was most of the step's host time.
        """
        key = id(bounds)
        hit = self._bounds_to_ranges.get(key)
        if hit is not None and hit[0] is bounds:
            return hit[1], hit[2]
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        even = len(set(sizes)) == 1
        if len(self._bounds_to_ranges) >= _MAX_KEPT_RANGES:
            self._bounds_to_ranges.clear()
        self._bounds_to_ranges[key] = (bounds, sizes, even)
        return sizes, even

    def gathers_synchronously(self, device: torch.device) -> bool:
        """Whether bucket gathers on `device` complete inside the call (shared memory or MPI).

        Such gathers cannot overlap the next bucket's update, so the optimizer batches them with
        `gather_buckets_`. Collective on first use (it settles the gather method).
        """
        if self.world_size == 1 or device.type != "cpu":
            return False
        method = self._resolve_gather_method()
        return method == "shm" or (self._mpi is not None and self.mpi_gather is not False)

    def gathers_in_place(self, device: torch.device) -> bool:
        """Whether bucket gathers on `device` go through shared memory, which takes `Segments`.

        Such a gather reads and writes the parameters' own storage directly (no whole-bucket
        buffer). Collective on first use (it settles the gather method).
        """
        synchronous = self.gathers_synchronously(device)  # settles gather_method and MPI
        return synchronous and self.gather_method == "shm" and (self._mpi is None or self.mpi_gather is False)

    def gather_buckets_(self, buckets: Sequence[tuple[torch.Tensor | Segments, Sequence[int]]], *, what: str) -> None:
        """Gather several buckets now; on shared memory in rounds of one staging half, one barrier each.

        A bucket may be given as `Segments` only where `gathers_in_place` holds (it still works
        if the shared memory turns out too small, through a whole-bucket copy).

        Collective: call on every rank of the group, in the same order, with the same buckets.
        """
        batch: list[tuple[torch.Tensor | Segments, Sequence[int]]] = []
        method = self._resolve_gather_method()
        if method == "shm" and (self._mpi is None or self.mpi_gather is False):
            staged = [(b, bounds) for b, bounds in buckets if b.device.type == "cpu" and bounds[-1] > 0]
            batch = [(b, bounds) for b, bounds in buckets if b.device.type != "cpu" or bounds[-1] == 0]
            if staged and not self._shared_staging().gather_many_(staged):
                self.gather_method = "broadcast"  # /dev/shm too small: same on every rank
                batch.extend(staged)
        else:
            batch = list(buckets)
        pending = []
        for given, bounds in batch:
            if isinstance(given, Segments):  # the shared memory failed: through a whole copy
                whole = torch.zeros(given.numel, dtype=given.dtype, device=given.device)
                given.read_(0, given.numel, whole)
                self.gather_bucket_async(whole, bounds, what=what).wait()
                given.write_(0, given.numel, whole)
            else:
                pending.append(self.gather_bucket_async(given, bounds, what=what))
        for handle in pending:
            handle.wait()

    def reduce_scatter_mean_async(
        self, bucket: torch.Tensor, bounds: Sequence[int], out: torch.Tensor, *, accumulate: bool, what: str
    ) -> PendingReduce:
        """Start averaging `bucket` over the ranks into `out`, this rank's range; return the handle.

        After `wait()`, out = (out if `accumulate` else 0) + (sum over ranks of the range) /
        world_size. `out` may be wider than the bucket (fp32 shards of a bf16 bucket): the
        shared-memory path sums straight into it, the others sum in the bucket's dtype first.
        `bucket` is scratch afterwards (its contents on any rank are unspecified).

        Collective: call on every rank of the group, in the same order, with the same sizes.

        Args:
            bucket: this rank's full flat contribution.
            bounds: world_size + 1 offsets; rank r owns [bounds[r], bounds[r + 1]).
            out: bounds[rank + 1] - bounds[rank] elements, on the bucket's device.
            accumulate: add to `out` instead of overwriting it.
            what: a name for error messages.
        """
        start, end = bounds[self.rank], bounds[self.rank + 1]
        if self.world_size == 1 or bounds[-1] == 0:
            return PendingReduce(self, [], total=bucket[start:end], out=out, accumulate=accumulate, what=what)
        sizes, even = self._ranges(bounds)
        method = self._resolve_gather_method()
        mpi = self._mpi
        if mpi is not None and bucket.device.type == "cpu" and bucket.dtype in (torch.float32, torch.float64):
            # NOTE: never bf16/fp16: MPI has no type that adds them correctly.
            total = self._scratch(end - start, bucket.dtype)
            if self.mpi_reduce is None:
                self.mpi_reduce = False
                if method == "shm":  # the one torch way that is idempotent and may be faster
                    staging = self._shared_staging()

                    def torch_way() -> None:
                        staging.reduce_scatter_(bucket, bounds, torch.empty_like(total))

                    self.mpi_reduce = self._faster_than_torch(
                        lambda: mpi.reduce_scatter_bucket_(bucket, bounds, total),
                        torch_way,
                        what="gradient reduce-scatter",
                    )
                else:
                    self.mpi_reduce = True  # gloo over TCP: measured 2-4x slower (benchmarks/comm.py)
            if self.mpi_reduce:
                mpi.reduce_scatter_bucket_(bucket, bounds, total)
                return PendingReduce(self, [], total=total, out=out, accumulate=accumulate, what=what)
        if method == "shm" and bucket.device.type == "cpu":
            scale = 1.0 / self.world_size
            if out.dtype in (torch.float16, torch.bfloat16):  # sums in out's dtype: divide first
                bucket.div_(self.world_size)
                scale = 1.0
            staging = self._shared_staging()
            if staging.reduce_scatter_(bucket, bounds, out, accumulate=accumulate, scale=scale):
                return PendingReduce(self, [], total=None, out=out, accumulate=accumulate, what=what)
            self.gather_method = method = "broadcast"  # /dev/shm too small: same on every rank
        works: list[dist.Work | None] = []
        op, mean_scale = self._mean_op_(bucket)
        if even:
            # a fresh result per launch: several of these may be in flight at once
            total = torch.empty(end - start, dtype=bucket.dtype, device=bucket.device)
            works.append(_reduce_scatter_single(total, bucket, op=op, group=self.group, async_op=True))
        elif method == "all_gather" and _pads_cheaply(sizes):
            # Uneven ranges (whole-tensor layouts): every range padded to the largest, one call.
            width = max(sizes)
            padded = torch.zeros(self.world_size * width, dtype=bucket.dtype, device=bucket.device)
            rows, parts = _padded_rows(padded, bucket, bounds, width)
            filled = [r for r in range(self.world_size) if sizes[r]]
            torch._foreach_copy_([rows[r] for r in filled], [parts[r] for r in filled])
            result = torch.empty(width, dtype=bucket.dtype, device=bucket.device)
            works.append(_reduce_scatter_single(result, padded, op=op, group=self.group, async_op=True))
            total = result.narrow(0, 0, end - start)
        else:
            # Uneven ranges (whole-tensor layouts): one reduce per owner, into its own range.
            for rank, numel in enumerate(sizes):
                if numel:
                    part = bucket.narrow(0, bounds[rank], numel)
                    works.append(
                        dist.reduce(part, dst=self.global_rank(rank), op=op, group=self.group, async_op=True)
                    )
            total = bucket[start:end]
        assert all(work is not None for work in works)
        done = [w for w in works if w is not None]
        return PendingReduce(
            self, done, total=total, out=out, accumulate=accumulate, what=what, scale=mean_scale
        )

    def _averages_natively(self, device: torch.device) -> bool:
        """Whether the group's backend for `device` averages itself (NCCL's ReduceOp.AVG; gloo has none)."""
        if device.type != "cuda" or not self.is_distributed:
            return False
        group = self.group if self.group is not None else dist.group.WORLD
        try:
            assert group is not None
            backend = group._get_backend(device)
        except (AssertionError, AttributeError, RuntimeError):
            return False
        return "nccl" in type(backend).__name__.lower()

    def _mean_op_(self, tensor: torch.Tensor) -> tuple[dist.ReduceOp.RedOpType, float | None]:
        """Return (the reduce op, the scale of its result) for a mean of `tensor` over the ranks.

        fp32/fp64: a SUM, divided afterwards (scale None: 1 / world_size). fp16/bf16, whose sum over
        many ranks of loss-scaled gradients can overflow (false infs, skipped steps): NCCL's AVG
        where the backend has it, else `tensor` is divided by the world size first, as DDP does
        (mutates `tensor`); either way the result is the mean already (scale 1).
        """
        if tensor.dtype not in (torch.float16, torch.bfloat16):
            return dist.ReduceOp.SUM, None
        if self._averages_natively(tensor.device):
            return dist.ReduceOp.AVG, 1.0
        tensor.div_(self.world_size)
        return dist.ReduceOp.SUM, 1.0

    def _scratch(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Return a reused CPU scratch tensor (fresh large allocations cost page faults every step).

        NOTE: for the synchronous (MPI) path only: its reduction is complete when the call
        returns, and the caller finishes it (wait) before launching another.
        """
        scratch = self._scratches.get((numel, dtype))
        if scratch is None:
            scratch = self._scratches[(numel, dtype)] = torch.empty(numel, dtype=dtype)
        return scratch

    def broadcast_(self, tensor: torch.Tensor, *, src: int = 0, what: str) -> None:
        """Overwrite `tensor` with rank `src`'s copy (src is a rank in the shard group).

        Collective: call on every rank of the group, in the same order.
        """
        if self.world_size == 1:
            return
        work = dist.broadcast(tensor, src=self.global_rank(src), group=self.group, async_op=True)
        assert work is not None
        self.wait_work(work, what)

    def all_reduce_(self, tensor: torch.Tensor, *, op: ReduceOp = "sum", what: str) -> None:
        """Reduce `tensor` in place over the group ("mean" divides the sum by the world size).

        Collective: call on every rank of the group, in the same order.
        """
        if self.world_size == 1:
            return
        if op in ("max", "min") and self._small_through_shm(tensor):
            if self._shared_staging().all_reduce_max_(tensor, what=what, negate=op == "min"):
                return
            self.gather_method = "broadcast"  # /dev/shm too small: same on every rank
        red = {
            "sum": dist.ReduceOp.SUM,
            "mean": dist.ReduceOp.SUM,
            "max": dist.ReduceOp.MAX,
            "min": dist.ReduceOp.MIN,
        }
        scale: float | None = None
        red_op = red[op]
        if op == "mean":
            red_op, scale = self._mean_op_(tensor)
        work = dist.all_reduce(tensor, op=red_op, group=self.group, async_op=True)
        assert work is not None
        self.wait_work(work, what)
        if op == "mean" and scale is None:
            tensor.div_(self.world_size)

    def _small_through_shm(self, tensor: torch.Tensor) -> bool:
        """Whether a small CPU reduction goes through the shared staging (every rank on one host).

        The same answer on every rank for the same tensor sizes. Collective on first use (it
        settles the gather method).
        """
        if tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() > _SMALL_SHM_NBYTES:
            return False
        if not (dist.is_available() and self.backend == "gloo"):
            return False
        return self._resolve_gather_method() == "shm" and (self._mpi is None or self.mpi_gather is False)

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> torch.Tensor:
        """Return a (world_size, *tensor.shape) tensor of every rank's `tensor`.

        Collective: call on every rank of the group, in the same order. Same result on every rank.
        """
        flat = tensor.contiguous().reshape(-1)
        out = torch.empty(self.world_size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        if self.world_size == 1:
            out.copy_(flat)
        else:
            work = _all_gather_single(out, flat, group=self.group, async_op=True)
            assert work is not None
            self.wait_work(work, what)
        return out.view(self.world_size, *tensor.shape)

    def barrier(self, *, what: str) -> None:
        """Wait until every rank got here, hearing from each rank directly.

        One one-element broadcast per rank: a rank that died is noticed by every survivor at
        once (a ring all-reduce would leave some survivors waiting on a live peer until timeout).
        It blocks the host on every backend: on NCCL each wait passes a timeout (which makes it a
        host wait, not a stream wait) and the flags are then read on the host, so no rank returns
        before every rank got here (checkpoint files are published and read behind it).

        Collective: call on every rank of the group, in the same order.
        """
        if self.world_size == 1:
            return
        flags = torch.ones(self.world_size, device=self.device)
        works = []
        for rank in range(self.world_size):
            work = dist.broadcast(
                flags[rank : rank + 1], src=self.global_rank(rank), group=self.group, async_op=True
            )
            assert work is not None
            works.append(work)
        for work in works:
            self.wait_work(work, what, host=True)
        self.to_host(flags)  # NOTE: a device-to-host copy of the result: the host waits for it

    def raise_if_any_failed(self, failure: Exception | None, *, what: str) -> None:
        """Raise on every rank when the local step `what` failed on any rank (else return).

        The failing rank re-raises its own exception unchanged; the others raise a ValueError that
        names that rank and its message, so no rank is left waiting in a later collective.

        Collective: call on every rank of the group, in the same order.
        """
        if self.world_size == 1:
            if failure is not None:
                raise failure
            return
        # NOTE: a one-element flag first: the object gather (N unpickles) only runs after a failure.
        flag = torch.tensor([0.0 if failure is None else 1.0], device=self.device)
        self.all_reduce_(flag, op="max", what=what)
        if not bool(self.to_host(flag).item()):
            if failure is not None:  # a flag without values (meta, see to_host): no one else knows
                raise failure
            return
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        messages = self.all_gather_object(mine, what=what)
        if failure is not None:
            raise failure
        for rank, message in enumerate(messages):
            if message is not None:
                raise ValueError(f"{self.prefix}{what} on rank {rank}: {message}")

    def all_gather_object(self, obj: object, *, what: str) -> list[object]:
        """Return every rank's small picklable `obj` (metadata only, never tensors of state).

        Collective: call on every rank of the group, in the same order. Same result on every rank.
        """
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as err:
            raise RuntimeError(f"{self.prefix}{what} failed: {err}") from err
        return out

    def send(self, tensor: torch.Tensor, *, dst: int, what: str) -> None:
        """Send `tensor` to rank `dst` of the group (point to point; pair with `recv` there).

        The wait blocks the host on NCCL too (consolidation is not on the step's path), so a peer that
        died or skipped the call raises here, naming `what`, instead of waiting for NCCL's watchdog.
        """
        work = dist.isend(tensor, dst=self.global_rank(dst), group=self.group)
        assert work is not None
        self.wait_work(work, what, host=True)

    def recv(self, tensor: torch.Tensor, *, src: int, what: str) -> None:
        """Receive into `tensor` from rank `src` of the group (pair with `send` there; host wait, as `send`)."""
        work = dist.irecv(tensor, src=self.global_rank(src), group=self.group)
        assert work is not None
        self.wait_work(work, what, host=True)
