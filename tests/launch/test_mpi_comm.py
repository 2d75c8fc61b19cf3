"""Check shardoptim.mpi_comm: the launcher check in-process, the collectives under `mpiexec -n 2` and `-n 3`.

The collectives run tests/launch/_mpi_comm_script.py through launch/mpirun.sh (the MPICH from pip:
`pip install --only-binary=:all: mpi4py mpich`), like tests/launch/test_launchers.py; each run takes
about 4-6 s and is killed with its process group after TIMEOUT_S.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shardoptim.mpi_comm import MPI_LAUNCHER_VARS, MpiCollectives
from tests._subproc import child_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_mpi_comm_script.py")
OPTIM_SCRIPT = Path(__file__).with_name("_mpi_optim_script.py")
LAUNCH = REPO / "launch"
TIMEOUT_S = 60.0
_OK = re.compile(r"MPI_COMM_OK rank=(\d+) world_size=(\d+)")


def _env() -> dict[str, str]:
    # mpirun.sh must find the mpiexec and python of the interpreter running the tests.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    return child_env(PATH=path, PYTHON=sys.executable)


def test_create_is_none_without_an_mpi_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in MPI_LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    imported_before = "mpi4py.MPI" in sys.modules
    assert MpiCollectives.create(0, world_size=2, global_ranks=[0, 1], timeout_s=5.0) is None
    assert MpiCollectives.create(0, world_size=1, global_ranks=[0], timeout_s=5.0, environ={}) is None
    # Importing mpi4py.MPI would initialise MPI in this process: create() must decide before that.
    assert ("mpi4py.MPI" in sys.modules) == imported_before


def test_create_is_none_without_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` raise ImportError
    environ = {"PMI_SIZE": "2", "PMI_RANK": "0"}
    assert MpiCollectives.create(0, world_size=2, global_ranks=[0, 1], timeout_s=5.0, environ=environ) is None


def _run_under_mpiexec(script: Path, num_ranks: int, log: Path, *args: str) -> str:
    """Run `script` on `num_ranks` MPI ranks; return its output (fails the test on error or timeout)."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.fail("mpi4py is not installed: pip install --only-binary=:all: mpi4py mpich")
    env = _env()
    if shutil.which("mpirun", path=env["PATH"]) is None and shutil.which("mpiexec", path=env["PATH"]) is None:
        pytest.fail("no mpirun/mpiexec on PATH: pip install --only-binary=:all: mpi4py mpich")
    cmd = [str(LAUNCH / "mpirun.sh"), str(num_ranks), str(script), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank it started
            proc.wait()
            pytest.fail(f"{cmd} did not finish within {TIMEOUT_S:.0f} s:\n{log.read_text(errors='replace')}")
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{cmd} exited with {proc.returncode}:\n{output}"
    return output


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_collectives_under_mpiexec(num_ranks: int, tmp_path: Path) -> None:
    output = _run_under_mpiexec(SCRIPT, num_ranks, tmp_path / f"mpi_comm_{num_ranks}.log")
    found = sorted((int(r), int(w)) for r, w in _OK.findall(output))
    assert found == [(r, num_ranks) for r in range(num_ranks)], output


@pytest.mark.mpi
@pytest.mark.parametrize("comm_backend", ["mpi", "auto", "torch"])
def test_optimizer_under_mpiexec(comm_backend: str, tmp_path: Path) -> None:
    """Stage 2 fp32 and bf16+master training under mpiexec matches the reference on every rank."""
    output = _run_under_mpiexec(OPTIM_SCRIPT, 2, tmp_path / f"optim_{comm_backend}.log", comm_backend)
    found = re.findall(r"MPI_OPTIM_OK rank=(\d) gather=(True|False|None) reduce=(True|False|None)", output)
    assert sorted(r for r, _, _ in found) == ["0", "1"], output
    for _, gather, reduce in found:
        if comm_backend == "mpi":
            assert (gather, reduce) == ("True", "True"), output
        if comm_backend == "torch":
            assert (gather, reduce) == ("None", "None"), output  # never opened
