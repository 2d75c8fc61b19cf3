"""A CPU process group beside an accelerator-only one, for the step's small host-side metadata.

The per-step agreement (hyperparameters, "a gradient arrived" flags, a third-party step's success)
is a handful of numbers that the host must read to decide what to do next. On a group with a CPU
backend (gloo, "cpu:gloo,cuda:nccl") they travel on the CPU and reading them costs nothing. On an
NCCL-only group (`init_process_group("nccl")`, the usual torchrun recipe) they would travel on the
GPU, and reading the result back makes the host wait for every kernel queued before it, the
backward included: one device sync per step. A gloo group over the same ranks carries them
instead, so `step()` never waits for the GPU unless the user asked for something that must read
a device value (`skip_nonfinite`, clipping with `error_if_nonfinite`).

Must not import shardoptim.optimizer or anything above shardoptim.comm (Comm itself only for type checking).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from shardoptim.teardown import hold_until_exit

if TYPE_CHECKING:
    from shardoptim.comm import Comm

#: The backend of the side group (tests on torch's fake process group substitute "fake").
HOST_BACKEND = "gloo"
#: The side group of each accelerator-only process group, made once and kept until exit.
_SIDE_GROUPS: dict[dist.ProcessGroup, dist.ProcessGroup] = {}


def metadata_comm(comm: Comm) -> Comm:
    """Return the Comm for the step's small metadata that the host reads (agreements, flags).

    `comm` itself when its group has a CPU backend (or there is no group); else a Comm over a
    `HOST_BACKEND` group of the same ranks, made once per process group and kept, so reading the
    agreed values never waits for the accelerator. It shares `comm`'s count of host reads.

    Collective the first time for a group without a CPU backend: call on every rank of the group,
    in the same order.
    """
    if not comm.is_distributed or comm.world_size == 1 or "cpu" in comm.device_types:
        return comm
    group = comm.group if comm.group is not None else dist.group.WORLD
    assert group is not None
    side = _SIDE_GROUPS.get(group)
    if side is None:
        side = host_side_group(comm.group, timeout_s=comm.timeout_s())
        hold_until_exit(side)
        _SIDE_GROUPS[group] = side
    meta = type(comm)(side, timeout=comm.timeout, backend_choice="torch")
    meta.host_reads = comm.host_reads
    if meta.rank != comm.rank:
        raise RuntimeError(
            f"{comm.prefix}the CPU side group numbers this rank {meta.rank}, not {comm.rank}: the process "
            "group's ranks are not in ascending global order; build it from sorted ranks"
        )
    return meta


def host_side_group(group: dist.ProcessGroup | None, *, timeout_s: float) -> dist.ProcessGroup:
    """Return a new `HOST_BACKEND` group over the ranks of `group` (None: the default group).

    Collective over `group` only: every rank of `group` calls it, in the same order (other ranks
    of the default group need not: the group is created with local synchronization).
    """
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    side: dist.ProcessGroup = dist.new_group(
        ranks=sorted(ranks),
        backend=HOST_BACKEND,
        timeout=timedelta(seconds=timeout_s),
        use_local_synchronization=True,
    )
    return side
