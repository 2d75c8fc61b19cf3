"""The environment of a child process that a test starts as a user would (torchrun, mpirun, python).

The test runner itself may run under a launcher (CI in a Slurm step, pytest under torchrun): its
variables are dropped so that the child detects only the launcher the test starts.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Variables that would make a child believe it was started by some launcher.
LAUNCH_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MV2_", "MPI_LOCAL", "HYDRA_", "SLURM_", "TORCHELASTIC_")
LAUNCH_NAMES = frozenset(
    {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SHARDOPTIM_LAUNCHER",
        "NNODES",
        "NODE_RANK",
    }
)


def child_env(**extra: str) -> dict[str, str]:
    """Return this process's environment without launcher variables, with the checkout importable.

    One OpenMP thread per process (the ranks share 2 cores); `extra` is added last.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_NAMES and not k.startswith(LAUNCH_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_logged(
    cmd: list[str],
    *,
    log: Path,
    timeout_s: float,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    on_timeout: Callable[[int], str] | None = None,
) -> tuple[int, str]:
    """Run `cmd` (in a session of its own) with its output in `log`; return (exit code, output).

    On a timeout the whole process group (torchrun's ranks too) is killed and the test fails with
    the output so far, plus `on_timeout(pid)` (e.g. stacks) taken before the kill.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=child_env() if env is None else env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            extra = on_timeout(proc.pid) if on_timeout is not None else ""
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(
                f"{shlex.join(cmd)} did not finish within {timeout_s:.0f} s:\n"
                f"{log.read_text(errors='replace')[-20000:]}" + (f"\n--- stacks ---\n{extra}" if extra else "")
            )
    return proc.returncode, log.read_text(errors="replace")
