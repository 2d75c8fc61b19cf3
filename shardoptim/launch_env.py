"""Find out how this process was started, from environment variables only.

`LaunchEnv.from_environ()` turns the environment into a frozen description: torchrun / env://, an
MPI launcher (Open MPI, MVAPICH2, MPICH/Intel hydra, PMIx), a Slurm step, or a single process, with
a clear ValueError for a half-configured environment. `expand_hostlist` reads Slurm host lists.
Nothing here has side effects: it must not import torch, torch.distributed, mpi4py or the rest of
shardoptim, and it opens no sockets. shardoptim.launcher acts on the result.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["LaunchEnv", "Launcher", "expand_hostlist", "is_slurm_step", "mpi_family"]

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
                if not is_slurm_step(env):
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
        if mpi_family(env) is not None:
            return _parse_mpi(env)
        if is_slurm_step(env):
            return _parse_slurm(env)
        return _single()


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


def mpi_family(env: Mapping[str, str]) -> tuple[str, str | None, str | None] | None:
    """Return the (rank, size, local rank) variable names of the MPI launcher that set `env`, or None."""
    for family in _MPI_FAMILIES:
        if any(name is not None and name in env for name in family[:2]):
            return family
    return None


def _parse_mpi(env: Mapping[str, str]) -> LaunchEnv:
    hint = "start the script with one mpiexec/mpirun, or set SHARDOPTIM_LAUNCHER to the real launcher"
    family = mpi_family(env)
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


def is_slurm_step(env: Mapping[str, str]) -> bool:
    """Return whether `env` is a real Slurm job step (srun), not the batch, extern or interactive shell.

    Raises:
        ValueError: `SLURM_STEP_ID` is neither a number nor one of Slurm's placeholders.
    """
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
