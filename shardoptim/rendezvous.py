"""Open the rendezvous store the default process group is created from.

`open_store` opens or joins a TCPStore; `mpi_rendezvous` serves MPI launchers: rank 0 opens the
store on port 0 and broadcasts its address with mpi4py, so there is no port race. mpi4py is imported
lazily and only on the MPI path. This module creates no process group (only
shardoptim.launcher.init_distributed does) and must not import the rest of shardoptim beyond
shardoptim.launch_env.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from torch.distributed import TCPStore  # type: ignore[attr-defined]  # public, not re-exported in the stubs

from shardoptim.launch_env import LaunchEnv, is_slurm_step, mpi_family

__all__ = ["MpiWorld", "mpi_rendezvous", "open_store"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class MpiWorld:
    """This process's place in MPI_COMM_WORLD and the store every rank has joined."""

    rank: int
    """Rank in MPI_COMM_WORLD."""
    world_size: int
    """Size of MPI_COMM_WORLD."""
    local_rank: int
    """Rank among the processes of this node (MPI's shared-memory split)."""
    store: TCPStore
    """The rendezvous store: opened on port 0 by rank 0, connected to by the others."""


def mpi_rendezvous(launch: LaunchEnv, env: Mapping[str, str], timeout: timedelta) -> MpiWorld:
    """Ask mpi4py for rank, size and local rank, and join the rendezvous store rank 0 opens on port 0.

    Collective over MPI_COMM_WORLD: call on every rank. Rank 0 opens a TCPStore on port 0 and
    broadcasts its address with mpi4py (no port race); if that fails, it releases the other ranks
    with the error before raising. mpi4py is imported here, only on this path.

    Raises:
        ImportError: mpi4py is not installed.
        RuntimeError: MPI's world disagrees with the launcher's variables, or the store cannot be opened.
    """
    try:
        from mpi4py import MPI
    except ImportError as exc:
        also = " (or set SHARDOPTIM_LAUNCHER=slurm inside an srun step)" if is_slurm_step(env) else ""
        raise ImportError(
            "an MPI launcher was detected but mpi4py cannot be imported; install it with "
            "`pip install --only-binary=:all: mpi4py mpich` or `pip install shardoptim[mpi]`, "
            f"or set SHARDOPTIM_LAUNCHER to the real launcher{also}"
        ) from exc
    comm: Any = MPI.COMM_WORLD
    rank, world_size = int(comm.Get_rank()), int(comm.Get_size())
    family = mpi_family(env)
    names = f"{family[0]}/{family[1]}" if family else "the launcher's variables"
    if (launch.world_size >= 0 and launch.world_size != world_size) or (
        launch.rank >= 0 and launch.rank != rank
    ):
        raise RuntimeError(
            f"MPI_COMM_WORLD says rank {rank} of {world_size} but {names} say rank {launch.rank} of "
            f"{launch.world_size}: mpi4py is built against a different MPI than the mpiexec that "
            "started this process; compare `mpiexec --version` with "
            "`python -m mpi4py --mpi-lib-version` and use the "
            "mpiexec of the same MPI"
        )
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, num_local = int(node_comm.Get_rank()), int(node_comm.Get_size())
    node_comm.Free()
    payload: tuple[str, str | int] | None = None
    store: TCPStore | None = None
    if rank == 0:
        try:
            host = launch.master_addr or _reachable_host(multi_node=num_local < world_size)
            store = open_store(host, 0, world_size, is_master=True, timeout=timeout, rank=rank)
            payload = (host, int(store.port))
        except Exception as exc:
            comm.bcast(("error", repr(exc)), root=0)  # release the other ranks before failing
            raise
    host, port = comm.bcast(payload, root=0)
    if host == "error":
        raise RuntimeError(f"[rank {rank}/{world_size}] rank 0 could not open the rendezvous store: {port}")
    if store is None:
        store = open_store(host, int(port), world_size, is_master=False, timeout=timeout, rank=rank)
    return MpiWorld(rank=rank, world_size=world_size, local_rank=local_rank, store=store)


def _reachable_host(*, multi_node: bool) -> str:
    """Return an address of this host that other nodes can reach (its name if it resolves to loopback)."""
    hostname = socket.gethostname()
    try:
        addr = socket.gethostbyname(hostname)
    except OSError:
        addr = "127.0.0.1"
    if addr.startswith("127.") and multi_node:
        # Resolves to loopback here (e.g. Debian's 127.0.1.1); the other nodes may resolve the name.
        logger.warning(
            "%s resolves to %s; other nodes will use the name. Set MASTER_ADDR if they cannot", hostname, addr
        )
        return hostname
    return addr


def open_store(
    host: str, port: int, world_size: int, *, is_master: bool, timeout: timedelta, rank: int
) -> TCPStore:
    """Open (`is_master`) or connect to the TCPStore at host:port; port 0 picks a free port (master only).

    Raises:
        RuntimeError: the store cannot be opened or reached; the message names the rank and address.
    """
    try:
        # NOTE: wait_for_workers=False, or the master would block here before it can share its port.
        return TCPStore(host, port, world_size, is_master=is_master, timeout=timeout, wait_for_workers=False)
    except Exception as exc:
        action = "open" if is_master else "connect to"
        raise RuntimeError(
            f"[rank {rank}/{world_size}] could not {action} the rendezvous TCPStore at {host}:{port} "
            f"({exc}); check that rank 0 runs on that host and the port is free (set MASTER_ADDR/MASTER_PORT)"
        ) from exc
