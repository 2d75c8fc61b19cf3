"""Find out how this process was started and create the default process group.

`LaunchEnv.from_environ()` turns environment variables into a frozen description (torchrun / env://,
an MPI launcher, a Slurm step, or a single process) and does nothing else: no imports of mpi4py, no
sockets, no process groups. `init_distributed()` is the only function here (and in shardoptim) that
creates a process group. Under MPI, rank 0 opens a TCPStore on port 0 and broadcasts its address with
mpi4py, so there is no port race. mpi4py is imported lazily and only on the MPI path.

This module must not import the rest of shardoptim.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]  # public, not re-exported in the stubs
from torch.distributed.distributed_c10d import Store

__all__ = ["DistInfo", "LaunchEnv", "Launcher", "expand_hostlist", "init_distributed"]

logger = logging.getLogger(__name__)

#: How the process was started. "env" is a plain env:// setup without torch elastic.
Launcher = Literal["torchrun", "env", "mpi", "slurm", "single"]

_OVERRIDE_VAR = "SHARDOPTIM_LAUNCHER"
_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: (rank, size, local rank) variables per MPI launcher, most specific first. None: the launcher has none.
_MPI_FAMILIES: tuple[tuple[str, str | None, str | None], ...] = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),  # MVAPICH2
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI hydra, Slurm pmi2
    ("PMIX_RANK", None, None),  # PMIx (Open MPI 5 / PRRTE, Slurm --mpi=pmix): no size variable
)
_MPI_LOCAL_FALLBACK = "MPI_LOCALRANKID"
_SLURM_STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
_SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
#: Step ids above this are Slurm's reserved placeholders (batch script, extern, interactive, pending).
_SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
_SLURM_PLACEHOLDER_STEPS = frozenset({"batch", "extern", "interactive", "pending", "tbd"})
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 10000


@dataclass(frozen=True, kw_only=True, slots=True)
class LaunchEnv:
    """What the environment says about this process; built by `LaunchEnv.from_environ()`."""

    launcher: Launcher
    """How the process was started."""
    rank: int
    """Global rank; -1 when unknown until init_distributed() asks MPI (MPI launcher only)."""
    world_size: int
    """Number of processes; -1 when unknown until init_distributed() asks MPI (MPI launcher only)."""
    local_rank: int
    """Index of this process on its node (the CUDA device index); -1 when the launcher does not say."""
    master_addr: str | None
    """Host of the rendezvous store (MASTER_ADDR or the first Slurm host); None where not needed."""
    master_port: int | None
    """Port of the rendezvous store; None where not needed (MPI and single pick port 0)."""

    @staticmethod
    def from_environ(environ: Mapping[str, str] | None = None) -> LaunchEnv:
        """Describe how this process was started, from environment variables only.

        Pure: reads `environ` (default `os.environ`), imports nothing, opens nothing. Detection order,
        first match wins; `SHARDOPTIM_LAUNCHER=torchrun|env|mpi|slurm|single` skips detection:

        1. torchrun (`TORCHELASTIC_RUN_ID`) or env (`RANK` or `WORLD_SIZE` set; then `RANK`,
           `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` are all required);
        2. an MPI launcher (Open MPI, MVAPICH2, MPICH/Intel hydra `PMI_*`, `PMIX_RANK`);
        3. a real Slurm step (`SLURM_STEP_ID` a real step id, not the batch/extern/interactive shell);
        4. else a single process.

        Raises:
            ValueError: a half-configured or contradictory environment (missing partner variables,
                non-integer values, rank >= world size, unknown `SHARDOPTIM_LAUNCHER`, or a Slurm
                override outside an srun step). The message names the variables and what to do.
        """
        env = os.environ if environ is None else environ
        override = env.get(_OVERRIDE_VAR)
        if override is not None:
            choice = override.strip().lower()
            if choice not in get_args(Launcher):
                raise ValueError(
                    f"{_OVERRIDE_VAR}={override!r} is not a known launcher; use one of "
                    f"{', '.join(get_args(Launcher))} or unset it to detect the launcher"
                )
            if choice in ("torchrun", "env"):
                return _parse_env(
                    env, "torchrun" if choice == "torchrun" else "env", f"{_OVERRIDE_VAR}={choice}"
                )
            if choice == "mpi":
                return _parse_mpi(env)
            if choice == "slurm":
                if not _is_slurm_step(env):
                    step = next(
                        (f"{v}={env[v]!r}" for v in _SLURM_STEP_VARS if v in env), "SLURM_STEP_ID unset"
                    )
                    raise ValueError(
                        f"{_OVERRIDE_VAR}=slurm but this is not an srun step ({step}; the batch or salloc "
                        "shell is not a step); start the script with srun, or unset the override"
                    )
                return _parse_slurm(env)
            return _single()
        if "TORCHELASTIC_RUN_ID" in env:
            return _parse_env(env, "torchrun", "TORCHELASTIC_RUN_ID is set (torchrun)")
        if "RANK" in env or "WORLD_SIZE" in env:
            return _parse_env(env, "env", f"{'RANK' if 'RANK' in env else 'WORLD_SIZE'} is set")
        if _mpi_family(env) is not None:
            return _parse_mpi(env)
        if _is_slurm_step(env):
            return _parse_slurm(env)
        return _single()


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
        store = _open_store("127.0.0.1", 0, 1, is_master=True, timeout=timeout, rank=0)
        info = _create_group(launch, chosen, timeout, rank=0, world_size=1, local_rank=0, store=store)
    _INFO = info
    if info.rank == 0:
        logger.info("created the default process group: %s", info)
    return info


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist such as "node[003-005,010],gpu7" into host names, in order.

    Ranges keep the zero padding of their lower bound ("[08-10]" -> 08, 09, 10); several bracket groups
    in one name expand as a product ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2).

    Raises:
        ValueError: empty list, unbalanced or nested brackets, or a range that is not "lo-hi" with lo <= hi.
    """
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise ValueError(f"hostlist {hostlist!r} has nested or unbalanced brackets at index {i}")
    items.append(hostlist[start:])
    if depth != 0 or not hostlist.strip():
        raise ValueError(f"hostlist {hostlist!r} is empty or has an unclosed '['; pass e.g. 'node[01-04]'")
    hosts: list[str] = []
    for item in items:
        if not item.strip():
            raise ValueError(f"hostlist {hostlist!r} has an empty entry; remove the extra comma")
        hosts.extend(_expand_item(item.strip(), hostlist))
    return hosts


def _expand_item(item: str, hostlist: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if match is None:
        return [item]
    suffixes = _expand_item(item[match.end() :], hostlist)
    prefix = item[: match.start()]
    hosts: list[str] = []
    for token in match.group(1).split(","):
        lo, sep, hi = token.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ValueError(
                f"hostlist {hostlist!r} has a bad range {token!r}; use numbers 'lo' or 'lo-hi' with lo <= hi"
            )
        for number in range(int(lo), int(hi if sep else lo) + 1):
            hosts.extend(f"{prefix}{str(number).zfill(len(lo))}{suffix}" for suffix in suffixes)
    return hosts


def _single() -> LaunchEnv:
    return LaunchEnv(
        launcher="single", rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None
    )


def _int_var(env: Mapping[str, str], name: str, *, minimum: int, hint: str) -> int:
    raw = env[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; {hint}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}; {hint}")
    return value


def _check_rank(rank: int, world_size: int, rank_var: str, size_var: str, hint: str) -> None:
    if world_size >= 0 and rank >= world_size:
        raise ValueError(f"{rank_var}={rank} is not below {size_var}={world_size}; {hint}")


def _parse_env(env: Mapping[str, str], launcher: Launcher, reason: str) -> LaunchEnv:
    hint = "set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together, or start the script with torchrun"
    missing = [name for name in _ENV_VARS if name not in env]
    if missing:
        seen = ", ".join(f"{name}={env[name]!r}" for name in _ENV_VARS if name in env) or "none of them"
        raise ValueError(
            f"{reason}, so env:// is used, but it needs {', '.join(missing)} (missing; seen: {seen}); {hint}"
        )
    rank = _int_var(env, "RANK", minimum=0, hint=hint)
    world_size = _int_var(env, "WORLD_SIZE", minimum=1, hint=hint)
    _check_rank(rank, world_size, "RANK", "WORLD_SIZE", hint)
    port = _int_var(env, "MASTER_PORT", minimum=1, hint=hint)
    if not env["MASTER_ADDR"].strip():
        raise ValueError(f"MASTER_ADDR is empty; {hint}")
    local_rank = _int_var(env, "LOCAL_RANK", minimum=0, hint=hint) if "LOCAL_RANK" in env else -1
    if world_size == 1 and local_rank < 0:
        local_rank = 0
    return LaunchEnv(
        launcher=launcher,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=env["MASTER_ADDR"].strip(),
        master_port=port,
    )


def _mpi_family(env: Mapping[str, str]) -> tuple[str, str | None, str | None] | None:
    for family in _MPI_FAMILIES:
        if any(name is not None and name in env for name in family[:2]):
            return family
    return None


def _parse_mpi(env: Mapping[str, str]) -> LaunchEnv:
    hint = "start the script with one mpiexec/mpirun, or set SHARDOPTIM_LAUNCHER to the real launcher"
    family = _mpi_family(env)
    rank = world_size = local_rank = -1
    if family is not None:
        rank_var, size_var, local_var = family
        if rank_var in env:
            rank = _int_var(env, rank_var, minimum=0, hint=hint)
        if size_var is not None and size_var in env:
            world_size = _int_var(env, size_var, minimum=1, hint=hint)
            _check_rank(rank, world_size, rank_var, size_var, hint)
        for name in (local_var, _MPI_LOCAL_FALLBACK):
            if name is not None and name in env:
                local_rank = _int_var(env, name, minimum=0, hint=hint)
                break
    addr = env.get("MASTER_ADDR", "").strip() or None
    return LaunchEnv(
        launcher="mpi",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=addr,
        master_port=None,
    )


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    name = next((v for v in _SLURM_STEP_VARS if v in env), None)
    if name is None:
        return False
    raw = env[name].strip().lower()
    if raw in _SLURM_PLACEHOLDER_STEPS:
        return False
    try:
        step = int(raw, 16) if raw.startswith("0x") else int(raw)
    except ValueError:
        raise ValueError(
            f"{name}={env[name]!r} is neither a step number nor a Slurm placeholder (batch, extern, ...); "
            f"unset it or set {_OVERRIDE_VAR}"
        ) from None
    return 0 <= step <= _SLURM_MAX_NORMAL_STEP_ID


def _parse_slurm(env: Mapping[str, str]) -> LaunchEnv:
    hint = "start the script with srun inside the allocation, or set SHARDOPTIM_LAUNCHER=single"
    nodelist_var = next((v for v in _SLURM_NODELIST_VARS if v in env), None)
    required = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]
    missing = [
        v for v in required if v not in env and not (v == "SLURM_NTASKS" and "SLURM_STEP_NUM_TASKS" in env)
    ]
    if nodelist_var is None and "MASTER_ADDR" not in env:
        missing.append("SLURM_STEP_NODELIST (or SLURM_NODELIST, or MASTER_ADDR)")
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" not in env and "SLURM_JOBID" not in env:
        missing.append("SLURM_JOB_ID (or MASTER_PORT)")
    if missing:
        raise ValueError(f"this looks like a Slurm step but these are missing: {', '.join(missing)}; {hint}")
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    rank = _int_var(env, "SLURM_PROCID", minimum=0, hint=hint)
    world_size = _int_var(env, size_var, minimum=1, hint=hint)
    _check_rank(rank, world_size, "SLURM_PROCID", size_var, hint)
    local_rank = _int_var(env, "SLURM_LOCALID", minimum=0, hint=hint)
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        assert nodelist_var is not None
        addr = expand_hostlist(env[nodelist_var])[0]
    if "MASTER_PORT" in env:
        port = _int_var(env, "MASTER_PORT", minimum=1, hint="set MASTER_PORT to a free TCP port")
    else:
        # NOTE: every task derives the same port without talking; the step id keeps concurrent steps of
        # one job apart. zlib.crc32 is stable across processes, unlike hash().
        job_var = "SLURM_JOB_ID" if "SLURM_JOB_ID" in env else "SLURM_JOBID"
        job = _int_var(env, job_var, minimum=0, hint="set MASTER_PORT to a free TCP port")
        step = next(env[v].strip() for v in _SLURM_STEP_VARS if v in env)
        port = _SLURM_PORT_BASE + zlib.crc32(f"{job}.{step}".encode()) % _SLURM_PORT_SPAN
    return LaunchEnv(
        launcher="slurm",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        master_addr=addr,
        master_port=port,
    )


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
    try:
        from mpi4py import MPI
    except ImportError as exc:
        also = " (or set SHARDOPTIM_LAUNCHER=slurm inside an srun step)" if _is_slurm_step(env) else ""
        raise ImportError(
            "an MPI launcher was detected but mpi4py cannot be imported; install it with "
            "`pip install --only-binary=:all: mpi4py mpich` or `pip install shardoptim[mpi]`, "
            f"or set SHARDOPTIM_LAUNCHER to the real launcher{also}"
        ) from exc
    comm: Any = MPI.COMM_WORLD
    rank, world_size = int(comm.Get_rank()), int(comm.Get_size())
    family = _mpi_family(env)
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
            store = _open_store(host, 0, world_size, is_master=True, timeout=timeout, rank=rank)
            payload = (host, int(store.port))
        except Exception as exc:
            comm.bcast(("error", repr(exc)), root=0)  # release the other ranks before failing
            raise
    host, port = comm.bcast(payload, root=0)
    if host == "error":
        raise RuntimeError(f"[rank {rank}/{world_size}] rank 0 could not open the rendezvous store: {port}")
    if store is None:
        store = _open_store(host, int(port), world_size, is_master=False, timeout=timeout, rank=rank)
    return _create_group(
        launch, backend, timeout, rank=rank, world_size=world_size, local_rank=local_rank, store=store
    )


def _init_slurm(launch: LaunchEnv, backend: str, timeout: timedelta) -> DistInfo:
    assert launch.master_addr is not None and launch.master_port is not None
    # NOTE: a 1-task step needs no shared port; port 0 avoids clashing with other jobs on the node.
    host, port = (launch.master_addr, launch.master_port) if launch.world_size > 1 else ("127.0.0.1", 0)
    store = _open_store(
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


def _reachable_host(*, multi_node: bool) -> str:
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


def _open_store(
    host: str, port: int, world_size: int, *, is_master: bool, timeout: timedelta, rank: int
) -> TCPStore:
    try:
        # NOTE: wait_for_workers=False, or the master would block here before it can share its port.
        return TCPStore(host, port, world_size, is_master=is_master, timeout=timeout, wait_for_workers=False)
    except Exception as exc:
        action = "open" if is_master else "connect to"
        raise RuntimeError(
            f"[rank {rank}/{world_size}] could not {action} the rendezvous TCPStore at {host}:{port} "
            f"({exc}); check that rank 0 runs on that host and the port is free (set MASTER_ADDR/MASTER_PORT)"
        ) from exc


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
