"""Optional mpi4py path for the flat CPU bucket collectives: all-gather and reduce-scatter by ranges.

`MpiCollectives.create()` decides, from environment variables and MPI's world only, whether this
process can use MPI for its shard group; it returns None (never raises) when it cannot, and the
caller then uses torch.distributed. The decision is deterministic, but the caller must still agree
on it across ranks with a collective before using it. Only a shard group that is the whole MPI world
(global rank i == MPI_COMM_WORLD rank i) is served: building a communicator for a subgroup
(`Comm.Create_group`) is itself collective over MPI_COMM_WORLD, so subgroups stay on gloo.

Every call is nonblocking MPI polled against a deadline, so a dead or absent peer raises a
RuntimeError instead of hanging. Tensors are moved through zero-copy numpy views.

Must not import shardoptim.comm, shardoptim.optimizer or anything above them (comm.py imports this
module lazily). mpi4py is imported only by `create()` (after the launcher check) and the constructor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["MPI_LAUNCHER_VARS", "MpiCollectives"]

#: Set by an MPI launcher (Open MPI, MPICH/Intel hydra, PMIx, MVAPICH2). Checked before importing
#: mpi4py.MPI, because that import initialises MPI.
MPI_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")

#: Reduce-scatter dtypes: MPI adds them natively. bf16/fp16 have no MPI type that sums them.
_SUMMABLE = (torch.float32, torch.float64)
#: Bytes per element -> same-width integer view; a gather does no arithmetic, so any dtype moves as bits.
_BITS_VIEW = {
    1: (torch.uint8, "UINT8_T"),
    2: (torch.int16, "INT16_T"),
    4: (torch.int32, "INT32_T"),
    8: (torch.int64, "INT64_T"),
}
#: Poll with sched_yield only for this long, then sleep between polls (MPICH progresses only in Test).
_SPIN_S = 1.0
_SLEEP_S = 50e-6


class MpiCollectives:
    """Bucket collectives over an MPI communicator that spans the same ranks as the torch shard group.

    Build it with `MpiCollectives.create()`. The first collective duplicates the communicator
    (Idup, under the same timeout), so these calls never interleave with other users of
    MPI_COMM_WORLD. After a timeout the communicator is unusable: abort the job.

    Args:
        comm: an mpi4py intracommunicator whose rank i is rank i of the shard group.
        timeout_s: how long one collective may take before it raises, in seconds.
    """

    def __init__(self, comm: Any, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0; pass the process group timeout in seconds")
        from mpi4py import MPI  # already imported by create(); cheap

        self._mpi: Any = MPI
        self._parent: Any = comm
        self._comm: Any = None
        self.rank = int(comm.Get_rank())
        self.world_size = int(comm.Get_size())
        self.timeout_s = float(timeout_s)
        self.prefix = f"[rank {self.rank}/{self.world_size}] "
        # Requests that timed out; their buffers must stay alive while MPI may still write to them.
        self._abandoned: list[Any] = []

    @classmethod
    def create(
        cls,
        rank: int,
        *,
        world_size: int,
        global_ranks: Sequence[int],
        timeout_s: float,
        environ: Mapping[str, str] | None = None,
    ) -> MpiCollectives | None:
        """Return MPI collectives for the shard group, or None when MPI cannot serve it.

        Not collective: deterministic from the environment and MPI_COMM_WORLD, calls no MPI
        collective. None when no MPI launcher variable is set (`MPI_LAUNCHER_VARS`, checked before
        importing mpi4py), mpi4py cannot be imported, MPI is not initialised or already finalised,
        or the group is not exactly MPI_COMM_WORLD in rank order (a subgroup uses gloo).

        Args:
            rank: this process's rank in the shard group.
            world_size: number of ranks of the shard group.
            global_ranks: torch global rank of each group rank, in group-rank order.
            timeout_s: limit for each collective, in seconds.
            environ: variables to read instead of `os.environ`.
        """
        env = os.environ if environ is None else environ
        if not any(name in env for name in MPI_LAUNCHER_VARS):
            return None
        try:
            from mpi4py import MPI
        except Exception:  # ImportError, or RuntimeError/OSError when libmpi cannot be loaded
            return None
        if not MPI.Is_initialized() or MPI.Is_finalized():
            return None
        world: Any = MPI.COMM_WORLD
        ranks = [int(r) for r in global_ranks]
        if (
            len(ranks) != world_size
            or not 0 <= rank < world_size
            or ranks != list(range(int(world.Get_size())))
            or int(world.Get_rank()) != ranks[rank]
        ):
            return None
        return cls(world, timeout_s=timeout_s)

    def all_gather_bucket_(self, bucket: torch.Tensor, bounds: Sequence[int]) -> None:
        """Fill every rank's range of `bucket` with that rank's values, in place.

        Collective: call on every rank of the group, in the same order.

        Rank r's fresh values are in bucket[bounds[r]:bounds[r + 1]] (flat element offsets,
        world_size + 1 of them, non-decreasing, the same on every rank; ranges may be empty or
        uneven); afterwards every rank's bucket holds every range. Elements outside
        [bounds[0], bounds[-1]) are untouched. Any dtype: values move as bits.

        Raises:
            ValueError: bucket not on CPU, not contiguous, or bounds do not fit it.
            TypeError: an element size with no matching integer type (e.g. complex128).
            RuntimeError: MPI failed or did not finish within `timeout_s`.
        """
        self._check_tensor(bucket, "bucket")
        self._check_bounds(bounds, bucket.numel())
        view = _BITS_VIEW.get(bucket.element_size())
        if view is None:
            raise TypeError(
                f"{self.prefix}MPI all_gather_bucket_ cannot move {bucket.dtype} "
                f"({bucket.element_size()} bytes per element); use the torch.distributed path"
            )
        flat = bucket.detach().reshape(-1)[bounds[0] : bounds[-1]].view(view[0]).numpy()
        counts = [bounds[r + 1] - bounds[r] for r in range(self.world_size)]
        displs = [bounds[r] - bounds[0] for r in range(self.world_size)]
        buf = [flat, counts, displs, getattr(self._mpi, view[1])]
        comm = self._communicator()
        self._wait(lambda: comm.Iallgatherv(self._mpi.IN_PLACE, buf), "all_gather_bucket_")

    def reduce_scatter_bucket_(self, bucket: torch.Tensor, bounds: Sequence[int], out: torch.Tensor) -> None:
        """Write into `out` the sum over ranks of this rank's range of `bucket`.

        Collective: call on every rank of the group, in the same order.

        `bounds` as in `all_gather_bucket_`; out.numel() must be bounds[rank + 1] - bounds[rank]
        (may be 0) and out must not overlap bucket. `bucket` is only read. float32 and float64 only;
        MPI picks the summation order, so results may differ from a torch sum in the last bits.

        Raises:
            TypeError: a dtype other than float32/float64 (bf16/fp16: MPI has no type that adds them),
                or out's dtype differs from bucket's.
            ValueError: a tensor not on CPU, not contiguous, bounds that do not fit, the wrong
                out.numel(), or out overlapping bucket.
            RuntimeError: MPI failed or did not finish within `timeout_s`.
        """
        self._check_tensor(bucket, "bucket")
        self._check_tensor(out, "out")
        if bucket.dtype not in _SUMMABLE:
            why = (
                "MPI has no native type for bfloat16/float16 and cannot add them correctly"
                if bucket.dtype in (torch.bfloat16, torch.float16)
                else "only float32 and float64 are summed on the MPI path"
            )
            raise TypeError(
                f"{self.prefix}MPI reduce_scatter_bucket_ got a {bucket.dtype} bucket: {why}; "
                "use the torch.distributed path for it"
            )
        if out.dtype != bucket.dtype:
            raise TypeError(
                f"{self.prefix}out is {out.dtype} but bucket is {bucket.dtype}; pass the same dtype"
            )
        self._check_bounds(bounds, bucket.numel())
        mine = bounds[self.rank + 1] - bounds[self.rank]
        if out.numel() != mine:
            raise ValueError(
                f"{self.prefix}out has {out.numel()} elements but this rank's range "
                f"[{bounds[self.rank]}, {bounds[self.rank + 1]}) has {mine}; size out to the range"
            )
        lo, hi = bucket.data_ptr(), bucket.data_ptr() + bucket.numel() * bucket.element_size()
        if out.numel() > 0 and out.data_ptr() < hi and lo < out.data_ptr() + out.numel() * out.element_size():
            raise ValueError(
                f"{self.prefix}out overlaps bucket; MPI reduce-scatter cannot write into its own input, "
                "pass a separate out tensor"
            )
        send = bucket.detach().reshape(-1)[bounds[0] : bounds[-1]].numpy()
        recv = out.detach().reshape(-1).numpy()
        counts = [bounds[r + 1] - bounds[r] for r in range(self.world_size)]
        mpi_type = self._mpi.FLOAT if bucket.dtype == torch.float32 else self._mpi.DOUBLE
        comm = self._communicator()
        self._wait(
            lambda: comm.Ireduce_scatter([send, mpi_type], [recv, mpi_type], counts, op=self._mpi.SUM),
            "reduce_scatter_bucket_",
        )

    def _communicator(self) -> Any:
        if self._comm is None:
            dup, request = self._parent.Idup()
            self._wait(lambda: request, "Idup of the communicator")
            self._comm = dup
        return self._comm

    def _wait(self, start: Callable[[], Any], what: str) -> None:
        """Start a nonblocking MPI call and poll it until it completes or the deadline passes."""
        if self._abandoned:
            raise RuntimeError(
                f"{self.prefix}an earlier MPI collective timed out, so the communicator is in an unknown "
                f"state and MPI {what} cannot run; abort the job and restart it"
            )
        try:
            request = start()
            start_s = time.monotonic()
            spin_until, deadline = start_s + _SPIN_S, start_s + self.timeout_s
            while not request.Test():
                now = time.monotonic()
                if now > deadline:
                    self._abandoned.append(request)
                    raise RuntimeError(
                        f"{self.prefix}MPI {what} did not finish within {self.timeout_s} s; a peer rank may "
                        "have died or skipped this call (every rank must make the same collective calls in "
                        "the same order); abort the job and check the other ranks' logs"
                    )
                # NOTE: MPICH moves shared-memory data only inside Test(), so spin (yielding the core)
                # through any normal transfer, and sleep only once a peer is clearly late.
                time.sleep(0 if now < spin_until else _SLEEP_S)
        except self._mpi.Exception as exc:
            raise RuntimeError(
                f"{self.prefix}MPI {what} failed: {exc}; check that every rank passes the same bounds"
            ) from exc

    def _check_tensor(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(
                f"{self.prefix}{name} must be a contiguous CPU tensor for the MPI path, got device "
                f"{tensor.device}, contiguous={tensor.is_contiguous()}; use the torch.distributed path"
            )

    def _check_bounds(self, bounds: Sequence[int], numel: int) -> None:
        ok = len(bounds) == self.world_size + 1 and bounds[0] >= 0 and bounds[-1] <= numel
        if not ok or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(
                f"{self.prefix}bounds {list(bounds)} must be {self.world_size + 1} non-decreasing offsets "
                f"within [0, {numel}] (the bucket's numel); pass the shard layout of this bucket"
            )
