"""The environment of a child process that a test starts as a user would (torchrun, mpirun, python).

The test runner itself may run under a launcher (CI in a Slurm step, pytest under torchrun): its
variables are dropped so that the child detects only the launcher the test starts.
"""

from __future__ import annotations

import os
from pathlib import Path

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
