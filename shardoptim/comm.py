"""Every collective the library issues, on one process group, with timeouts and rank-prefixed errors.

The rest of the package never calls torch.distributed directly: it holds a `Comm` and asks it to
gather buckets, broadcast or reduce small tensors. A `Comm` over no process group (torch.distributed
not initialised, world size 1) turns every collective into a local no-op, so a single process can
use ShardedOptimizer without any setup.

`Comm` is the one entry point; the work behind it lives in two places: buckets move through the
transport chosen per device (shardoptim.transport_choice, transports), small tensors and objects
through shardoptim.small_collectives.

Must not import shardoptim.optimizer or anything above it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from shardoptim import small_collectives
from shardoptim.groupinfo import (
    DEFAULT_TIMEOUT_S,
    averages_natively,
    group_device_types,
    group_timeout_s,
    small_tensor_device,
    warn_if_launched_unsharded,
)
from shardoptim.sidegroup import metadata_comm
from shardoptim.teardown import hold_until_exit
from shardoptim.transport_choice import TransportChoice
from shardoptim.transports import (
    Bucketlike,
    PendingGather,
    PendingReduce,
)

logger = logging.getLogger(__name__)

ReduceOp = Literal["sum", "mean", "max", "min"]



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
            warn_if_launched_unsharded()
        self.timeout = timeout
        #: How buckets move, per device type: chosen on first use and then fixed.
        self.transports = TransportChoice(self)
        #: Host reads of collective results off the CPU so far (see `to_host`); shared with the
        #: metadata Comm (`for_metadata`), so one count covers the whole step.
        self.host_reads = [0]

    def for_metadata(self) -> Comm:
        """Return the Comm for the step's small metadata that the host reads (see sidegroup.metadata_comm).

        Collective the first time for a group without a CPU backend: call on every rank of the
        group, in the same order (ShardedOptimizer calls it at construction).
        """
        return metadata_comm(self)

    def timeout_s(self) -> float:
        """Seconds a wait outside torch.distributed (MPI, the shared-memory barrier) may last.

        The timeout given to this Comm, else the process group's own (`init_process_group(timeout=)`,
        `new_group(timeout=)`), else torch's default of 30 minutes.
        """
        if self.timeout is not None:
            return self.timeout.total_seconds()
        if not self.is_distributed:
            return DEFAULT_TIMEOUT_S
        return group_timeout_s(self.group if self.group is not None else dist.group.WORLD, self.device)

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
        return group_device_types(self.group if self.group is not None else dist.group.WORLD, self.backend)

    @property
    def device(self) -> torch.device:
        """The device small collective tensors live on (see groupinfo.small_tensor_device)."""
        return small_tensor_device(self.device_types)

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
        return self.transports.get(bucket.device).gather_async(bucket, bounds, what=what)

    def gathers_synchronously(self, device: torch.device) -> bool:
        """Whether bucket gathers on `device` complete inside the call (shared memory or MPI).

        Such gathers cannot overlap the next bucket's update, so the optimizer batches them with
        `gather_buckets_`. Collective on first use (it chooses the transport).
        """
        return self.world_size > 1 and self.transports.get(device).synchronous

    def gathers_in_place(self, device: torch.device) -> bool:
        """Whether bucket gathers on `device` take `Segments` (shared memory: the parameters' own storage).

        Collective on first use (it chooses the transport).
        """
        return self.world_size > 1 and self.transports.get(device).in_place

    def gather_buckets_(self, buckets: Sequence[tuple[Bucketlike, Sequence[int]]], *, what: str) -> None:
        """Gather several buckets now (on shared memory in rounds of one staging half, one barrier each).

        A bucket may be given as `Segments` only where `gathers_in_place` holds. Collective: call
        on every rank of the group, in the same order, with the same buckets.
        """
        if self.world_size == 1:
            return
        by_type: dict[str, list[tuple[Bucketlike, Sequence[int]]]] = {}
        for given, bounds in buckets:
            if bounds[-1] > 0:
                by_type.setdefault(given.device.type, []).append((given, bounds))
        for kind in sorted(by_type):  # the same order on every rank
            self.transports.get(torch.device(kind)).gather_many_(by_type[kind], what=what)

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
        if self.world_size == 1 or bounds[-1] == 0:
            start, end = bounds[self.rank], bounds[self.rank + 1]
            return PendingReduce(self, [], total=bucket[start:end], out=out, accumulate=accumulate, what=what)
        return self.transports.get(bucket.device).reduce_scatter_async(bucket, bounds, out, accumulate=accumulate, what=what)

    def mean_op_(self, tensor: torch.Tensor) -> tuple[dist.ReduceOp.RedOpType, float | None]:
        """Return (the reduce op, the scale of its result) for a mean of `tensor` over the ranks.

        fp32/fp64: a SUM, divided afterwards (scale None: 1 / world_size). fp16/bf16, whose sum over
        many ranks of loss-scaled gradients can overflow (false infs, skipped steps): NCCL's AVG
        where the backend has it, else `tensor` is divided by the world size first, as DDP does
        (mutates `tensor`); either way the result is the mean already (scale 1).
        """
        if tensor.dtype not in (torch.float16, torch.bfloat16):
            return dist.ReduceOp.SUM, None
        if self.is_distributed and averages_natively(
            self.group if self.group is not None else dist.group.WORLD, tensor.device
        ):
            return dist.ReduceOp.AVG, 1.0
        tensor.div_(self.world_size)
        return dist.ReduceOp.SUM, 1.0

    def broadcast_(self, tensor: torch.Tensor, *, src: int = 0, what: str) -> None:
        """Overwrite `tensor` with rank `src`'s copy (src is a rank in the shard group).

        Collective: call on every rank of the group, in the same order.
        """
        small_collectives.broadcast_(self, tensor, src=src, what=what)

    def all_reduce_(self, tensor: torch.Tensor, *, op: ReduceOp = "sum", what: str) -> None:
        """Reduce `tensor` in place over the group ("mean" divides the sum by the world size).

        Small CPU max/min reductions go through the shared staging when every rank is on one host.

        Collective: call on every rank of the group, in the same order.
        """
        small_collectives.all_reduce_(self, tensor, op=op, what=what)

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> torch.Tensor:
        """Return a (world_size, *tensor.shape) tensor of every rank's `tensor`.

        Collective: call on every rank of the group, in the same order. Same result on every rank.
        """
        return small_collectives.all_gather(self, tensor, what=what)

    def barrier(self, *, what: str) -> None:
        """Wait until every rank got here, hearing from each rank directly.

        One one-element broadcast per rank: a rank that died is noticed by every survivor at
        once (a ring all-reduce would leave some survivors waiting on a live peer until timeout).
        It blocks the host on every backend: on NCCL each wait passes a timeout (which makes it a
        host wait, not a stream wait) and the flags are then read on the host, so no rank returns
        before every rank got here (checkpoint files are published and read behind it).

        Collective: call on every rank of the group, in the same order.
        """
        small_collectives.barrier(self, what=what)

    def raise_if_any_failed(self, failure: Exception | None, *, what: str) -> None:
        """Raise on every rank when the local step `what` failed on any rank (else return).

        The failing rank re-raises its own exception unchanged; the others raise a ValueError that
        names that rank and its message, so no rank is left waiting in a later collective.

        Collective: call on every rank of the group, in the same order.
        """
        small_collectives.raise_if_any_failed(self, failure, what=what)

    def all_gather_object(self, obj: object, *, what: str) -> list[object]:
        """Return every rank's small picklable `obj` (metadata only, never tensors of state).

        Collective: call on every rank of the group, in the same order. Same result on every rank.
        """
        return small_collectives.all_gather_object(self, obj, what=what)

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
