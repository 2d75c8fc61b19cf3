"""Create the default process group for however this process was started, and bind its device.

`init_distributed()` is the only function here (and in shardoptim) that creates a process group. It
reads the launcher from shardoptim.launch_env (`LaunchEnv.from_environ()`), opens the rendezvous
store through shardoptim.rendezvous (MPI: rank 0 on port 0, address broadcast with mpi4py; Slurm:
the first host of the step; one process: 127.0.0.1), picks the backend, sets the CUDA device from the
local rank (`cuda_device_index`) and creates the group.

This module must not import the rest of shardoptim beyond launch_env and rendezvous.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Store

from shardoptim.launch_env import LaunchEnv, Launcher
from shardoptim.rendezvous import mpi_rendezvous, open_store

__all__ = ["DistInfo", "cuda_device_index", "init_distributed"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DistInfo:
    """The default process group as created (or found) by `init_distributed()`."""

    rank: int
    """Global rank of this process in the default group."""
    world_size: int
    """Number of processes in the default group."""
    local_rank: int
    """Index of this process on its node (the CUDA device index); -1 when unknown."""
    backend: str
    """Backend of the default group, e.g. "gloo" or "nccl"."""
    launcher: Launcher
    """How the process was started."""


_INFO: DistInfo | None = None

#: The default backend with CUDA: NCCL for CUDA tensors and gloo beside it for CPU ones (see init_distributed).
_CUDA_DEFAULT_BACKEND = "cpu:gloo,cuda:nccl"


def init_distributed(
    *,
    backend: str | None = None,
    timeout: timedelta = timedelta(minutes=10),
    environ: Mapping[str, str] | None = None,
) -> DistInfo:
    """Create the default process group for however this process was started.

    Collective: call on every rank, once at start-up. Idempotent: if a default group already exists,
    its description is returned and nothing is created. The launcher comes from
    `LaunchEnv.from_environ(environ)` (see there). torchrun/env use `env://`; MPI asks mpi4py for rank,
    size and local rank (shared-memory split) and rank 0 broadcasts a TCPStore opened on port 0; Slurm
    opens the store on the first host of the step; single creates a 1-rank group on 127.0.0.1 so
    collectives work. With CUDA available the current device is set from the local rank.

    Args:
        backend: process group backend; default "cpu:gloo,cuda:nccl" if CUDA is available (CUDA
            tensors over NCCL, the optimizer's small per-step flags and hyperparameters over gloo
            on the CPU, so `step()` makes no host-device sync), else "gloo".
        timeout: limit for the rendezvous and for every collective of the group.
        environ: variables to read instead of `os.environ` (env:// still reads `MASTER_ADDR` and
            `MASTER_PORT` from `os.environ`, so they must agree).

    Returns:
        The rank, world size, local rank, backend and launcher of this process (rank-dependent).

    Raises:
        ValueError: a half-configured environment (see `LaunchEnv.from_environ`).
        ImportError: the MPI launcher was detected but mpi4py is not installed.
        RuntimeError: MPI's world disagrees with the launcher's variables, or the store cannot be opened.
    """
    global _INFO
    if dist.is_initialized():
        return _describe_existing(backend, environ)
    env = os.environ if environ is None else environ
    launch = LaunchEnv.from_environ(env)
    chosen = backend if backend is not None else (_CUDA_DEFAULT_BACKEND if torch.cuda.is_available() else "gloo")
    if launch.launcher in ("torchrun", "env"):
        info = _init_env(launch, env, chosen, timeout)
    elif launch.launcher == "mpi":
        info = _init_mpi(launch, env, chosen, timeout)
    elif launch.launcher == "slurm":
        info = _init_slurm(launch, chosen, timeout)
    else:
        _warn_if_batch_shell(env)
        store = open_store("127.0.0.1", 0, 1, is_master=True, timeout=timeout, rank=0)
        info = _create_group(launch, chosen, timeout, rank=0, world_size=1, local_rank=0, store=store)
    _INFO = info
    if info.rank == 0:
        logger.info("created the default process group: %s", info)
    return info


def _describe_existing(backend: str | None, environ: Mapping[str, str] | None) -> DistInfo:
    rank, world_size, found = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    if _INFO is not None and (_INFO.rank, _INFO.world_size, _INFO.backend) == (rank, world_size, found):
        info = _INFO
    else:
        # The group was created elsewhere; describe it as well as the environment allows.
        try:
            launch = LaunchEnv.from_environ(environ)
            launcher, local_rank = launch.launcher, (launch.local_rank if launch.rank == rank else -1)
        except ValueError:
            launcher, local_rank = ("single" if world_size == 1 else "env"), -1
        info = DistInfo(
            rank=rank, world_size=world_size, local_rank=local_rank, backend=found, launcher=launcher
        )
    if backend is not None and backend != info.backend:
        warnings.warn(
            f"init_distributed(backend={backend!r}) has no effect: the default process group already exists "
            f"with backend {info.backend!r}; call it before any other init_process_group()",
            stacklevel=3,
        )
    return info


def _init_env(launch: LaunchEnv, env: Mapping[str, str], backend: str, timeout: timedelta) -> DistInfo:
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if env is not os.environ and os.environ.get(name) != env.get(name):
            raise ValueError(
                f"environ[{name!r}]={env.get(name)!r} but os.environ has {os.environ.get(name)!r}; "
                "env:// reads MASTER_ADDR and MASTER_PORT from os.environ, so export the same values "
                "or pass environ=None"
            )
    local_rank = launch.local_rank
    if local_rank < 0 and torch.cuda.is_available():
        local_rank = launch.rank % torch.cuda.device_count()
        logger.warning("LOCAL_RANK is not set; using rank %% num_devices = %d as the CUDA device", local_rank)
    return _create_group(
        launch,
        backend,
        timeout,
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=local_rank,
        init_method="env://",
    )


def _init_mpi(launch: LaunchEnv, env: Mapping[str, str], backend: str, timeout: timedelta) -> DistInfo:
    world = mpi_rendezvous(launch, env, timeout)
    return _create_group(
        launch,
        backend,
        timeout,
        rank=world.rank,
        world_size=world.world_size,
        local_rank=world.local_rank,
        store=world.store,
    )


def _init_slurm(launch: LaunchEnv, backend: str, timeout: timedelta) -> DistInfo:
    assert launch.master_addr is not None and launch.master_port is not None
    # NOTE: a 1-task step needs no shared port; port 0 avoids clashing with other jobs on the node.
    host, port = (launch.master_addr, launch.master_port) if launch.world_size > 1 else ("127.0.0.1", 0)
    store = open_store(
        host, port, launch.world_size, is_master=launch.rank == 0, timeout=timeout, rank=launch.rank
    )
    return _create_group(
        launch,
        backend,
        timeout,
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        store=store,
    )


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """Return the CUDA device a process of node-local rank `local_rank` uses among `device_count` visible ones.

    The rule: `local_rank` when that many devices are visible (torchrun, or mpirun/srun with every
    GPU visible to every process); else `local_rank % device_count`, which is device 0 when each
    process sees only its own GPU (Slurm `--gpus-per-task=1`, MPI wrappers that set
    CUDA_VISIBLE_DEVICES per rank) and one of its own GPUs when it sees a few. Two processes that
    end on the same physical GPU make NCCL fail at its first collective ("Duplicate GPU detected").

    Raises:
        ValueError: no CUDA device is visible.
    """
    if device_count < 1:
        raise ValueError(
            f"local rank {local_rank}: no CUDA device is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); give each process a GPU or use backend='gloo'"
        )
    return local_rank if local_rank < device_count else local_rank % device_count


def _create_group(
    launch: LaunchEnv,
    backend: str,
    timeout: timedelta,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    store: Store | None = None,
    init_method: str | None = None,
) -> DistInfo:
    extra: dict[str, Any] = {}
    if torch.cuda.is_available() and local_rank >= 0 and "nccl" in backend:
        index = cuda_device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            # NOTE: binds the NCCL communicator to this GPU at once (no guess at the first collective).
            extra["device_id"] = torch.device("cuda", index)
    dist.init_process_group(
        backend, init_method=init_method, store=store, rank=rank, world_size=world_size, timeout=timeout, **extra
    )
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=str(dist.get_backend()),
        launcher=launch.launcher,
    )


def _warn_if_batch_shell(env: Mapping[str, str]) -> None:
    ntasks = env.get("SLURM_NTASKS", "1").strip()
    if "SLURM_JOB_ID" in env and ntasks.isdigit() and int(ntasks) > 1:
        logger.warning(
            "running as a single process although SLURM_NTASKS=%s: this is the batch shell, not an srun "
            "step; start the script with `srun python ...` to use all tasks",
            ntasks,
        )
