"""The collectives on small tensors and objects, run straight on torch.distributed for a Comm.

Flags, norms, packed hyperparameters and metadata move here: broadcast, all-reduce, all-gather and
the object gather, and two protocols built on them, the barrier that hears from every rank and the
agreement that raises on every rank when a local step failed on one. Small CPU max/min reductions
take the shared staging when every rank is on one host. Buckets never come here: their gathers and
reduce-scatters go through the transport chosen per device (shardoptim.transport_choice), and
point-to-point transfers stay on Comm.

Each function is the body of the Comm method of the same name, which is what callers use.
Must not import shardoptim.optimizer or anything above shardoptim.comm (Comm itself only for
type checking).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from shardoptim.transports import all_gather_single

if TYPE_CHECKING:
    from shardoptim.comm import Comm, ReduceOp
    from shardoptim.shm import SharedStaging

#: Reductions (max/min) of CPU tensors up to this many bytes go through the shared staging when
#: every rank is on one host: the per-step hyperparameter and flag agreement, mostly.
_SMALL_SHM_NBYTES = 64 << 10


def broadcast_(comm: Comm, tensor: torch.Tensor, *, src: int, what: str) -> None:
    """Overwrite `tensor` with rank `src`'s copy (see Comm.broadcast_).

    Collective: call on every rank of the group, in the same order.
    """
    if comm.world_size == 1:
        return
    work = dist.broadcast(tensor, src=comm.global_rank(src), group=comm.group, async_op=True)
    assert work is not None
    comm.wait_work(work, what)


def all_reduce_(comm: Comm, tensor: torch.Tensor, *, op: ReduceOp, what: str) -> None:
    """Reduce `tensor` in place over the group (see Comm.all_reduce_).

    Collective: call on every rank of the group, in the same order.
    """
    if comm.world_size == 1:
        return
    staging = _small_through_shm(comm, tensor) if op in ("max", "min") else None
    if staging is not None:
        mapped = staging.all_reduce_max_(tensor, what=what, negate=op == "min")
        assert mapped, "the staging area is mapped before its transport is chosen"
        return
    red = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
    }
    scale: float | None = None
    red_op = red[op]
    if op == "mean":
        red_op, scale = comm.mean_op_(tensor)
    work = dist.all_reduce(tensor, op=red_op, group=comm.group, async_op=True)
    assert work is not None
    comm.wait_work(work, what)
    if op == "mean" and scale is None:
        tensor.div_(comm.world_size)


def _small_through_shm(comm: Comm, tensor: torch.Tensor) -> SharedStaging | None:
    """The staging area when a small CPU reduction goes through it (every rank on one host), else None.

    The same answer on every rank for the same tensor sizes. Collective on first use (it
    chooses the CPU transport).
    """
    if tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() > _SMALL_SHM_NBYTES:
        return None
    if not (dist.is_available() and comm.backend == "gloo"):
        return None
    return comm.transports.shared_staging()


def all_gather(comm: Comm, tensor: torch.Tensor, *, what: str) -> torch.Tensor:
    """Return a (world_size, *tensor.shape) tensor of every rank's `tensor` (see Comm.all_gather).

    Collective: call on every rank of the group, in the same order. Same result on every rank.
    """
    flat = tensor.contiguous().reshape(-1)
    out = torch.empty(comm.world_size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
    if comm.world_size == 1:
        out.copy_(flat)
    else:
        work = all_gather_single(out, flat, group=comm.group, async_op=True)
        assert work is not None
        comm.wait_work(work, what)
    return out.view(comm.world_size, *tensor.shape)


def barrier(comm: Comm, *, what: str) -> None:
    """Wait until every rank got here, one one-element broadcast per rank (see Comm.barrier).

    Collective: call on every rank of the group, in the same order.
    """
    if comm.world_size == 1:
        return
    flags = torch.ones(comm.world_size, device=comm.device)
    works = []
    for rank in range(comm.world_size):
        work = dist.broadcast(
            flags[rank : rank + 1], src=comm.global_rank(rank), group=comm.group, async_op=True
        )
        assert work is not None
        works.append(work)
    for work in works:
        comm.wait_work(work, what, host=True)
    comm.to_host(flags)  # NOTE: a device-to-host copy of the result: the host waits for it


def raise_if_any_failed(comm: Comm, failure: Exception | None, *, what: str) -> None:
    """Raise on every rank when the local step `what` failed on any rank (see Comm.raise_if_any_failed).

    Collective: call on every rank of the group, in the same order.
    """
    if comm.world_size == 1:
        if failure is not None:
            raise failure
        return
    # NOTE: a one-element flag first: the object gather (N unpickles) only runs after a failure.
    flag = torch.tensor([0.0 if failure is None else 1.0], device=comm.device)
    comm.all_reduce_(flag, op="max", what=what)
    if not bool(comm.to_host(flag).item()):
        if failure is not None:  # a flag without values (meta, see Comm.to_host): no one else knows
            raise failure
        return
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    messages = comm.all_gather_object(mine, what=what)
    if failure is not None:
        raise failure
    for rank, message in enumerate(messages):
        if message is not None:
            raise ValueError(f"{comm.prefix}{what} on rank {rank}: {message}")


def all_gather_object(comm: Comm, obj: object, *, what: str) -> list[object]:
    """Return every rank's small picklable `obj` (see Comm.all_gather_object).

    Collective: call on every rank of the group, in the same order. Same result on every rank.
    """
    if comm.world_size == 1:
        return [obj]
    out: list[object] = [None] * comm.world_size
    try:
        dist.all_gather_object(out, obj, group=comm.group)
    except RuntimeError as err:
        raise RuntimeError(f"{comm.prefix}{what} failed: {err}") from err
    return out
