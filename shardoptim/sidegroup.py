"""A CPU process group beside an accelerator-only one, for the step's small host-side metadata.

The per-step agreement (hyperparameters, "a gradient arrived" flags, a third-party step's success)
is a handful of numbers that the host must read to decide what to do next. On a group with a CPU
backend (gloo, "cpu:gloo,cuda:nccl") they travel on the CPU and reading them costs nothing. On an
NCCL-only group (`init_process_group("nccl")`, the usual torchrun recipe) they would travel on the
GPU, and reading the result back makes the host wait for every kernel queued before it, the
backward included: one device sync per step. A gloo group over the same ranks carries them
instead, so `step()` never waits for the GPU unless the user asked for something that must read
a device value (`skip_nonfinite`, clipping with `error_if_nonfinite`).

Must not import shardoptim.optimizer or anything above shardoptim.comm.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

#: The backend of the side group (tests on torch's fake process group substitute "fake").
HOST_BACKEND = "gloo"


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
