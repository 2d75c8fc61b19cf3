"""Start tests/launch/_init_script.py under every launcher (through launch/*) and check each rank's line.

Each case spawns real processes (2-10 s); every wait has a timeout, after which the whole process
group of the launcher is killed and the test fails with the output seen so far.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests._subproc import child_env

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_init_script.py")
LAUNCH = REPO / "launch"
TIMEOUT_S = 90.0
# Not anchored: ranks share one output file, so another rank's partial line may precede this one.
_OK = re.compile(r"SHARDOPTIM_OK rank=(\d+) world_size=(\d+) local_rank=(-?\d+) launcher=(\w+) backend=(\w+)")


def _env(**extra: str) -> dict[str, str]:
    # The launchers and `python` must be the ones of the interpreter running the tests.
    path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
    return child_env(PATH=path, PYTHON=sys.executable, **extra)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_all(commands: list[tuple[list[str], dict[str, str]]], tmp_path: Path) -> list[str]:
    """Start every command at once, wait for all (TIMEOUT_S in total), return their combined outputs.

    Fails the test if one exits non-zero or runs out of time; a timed-out launcher is killed with its
    whole process group (torchrun and mpiexec start children).
    """
    logs = [tmp_path / f"out{i}_{uuid.uuid4().hex[:6]}.log" for i in range(len(commands))]
    procs = []
    for (cmd, env), log in zip(commands, logs, strict=True):
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    deadline = time.monotonic() + TIMEOUT_S
    late = []
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            late.append(i)
    for i in late:
        os.killpg(procs[i].pid, signal.SIGKILL)
        procs[i].wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    report = "\n".join(
        f"--- {shlex.join(c)} (rc {p.returncode})\n{o}"
        for (c, _), p, o in zip(commands, procs, outputs, strict=True)
    )
    if late:
        pytest.fail(f"commands {late} did not finish within {TIMEOUT_S:.0f} s and were killed:\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a command failed:\n{report}")
    return outputs


def _assert_ranks(outputs: list[str], expected: list[tuple[int, int, int, str, str]]) -> None:
    """Check the (rank, world_size, local_rank, launcher, backend) lines printed by all ranks."""
    found = [
        (int(r), int(w), int(lr), launcher, backend)
        for out in outputs
        for r, w, lr, launcher, backend in _OK.findall(out)
    ]
    assert sorted(found) == expected, "output:\n" + "\n---\n".join(outputs)


def test_scripts_are_executable_and_print_usage(tmp_path: Path) -> None:
    for name in ("torchrun.sh", "mpirun.sh", "slurm.sbatch"):
        path = LAUNCH / name
        assert os.access(path, os.X_OK), f"{path} is not executable; chmod +x it"
        done = subprocess.run([str(path)], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 2 and "launch/" in done.stderr, (name, done.stderr)


def test_single_process_even_in_the_batch_shell(tmp_path: Path) -> None:
    # The Slurm batch shell has SLURM_PROCID/SLURM_NTASKS but is no step: run alone, never wait for peers.
    batch = _env(
        SLURM_JOB_ID="77", SLURM_STEP_ID="batch", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0"
    )
    outputs = _run_all([([sys.executable, str(SCRIPT)], batch)], tmp_path)
    _assert_ranks(outputs, [(0, 1, 0, "single", "gloo")])
    assert "batch shell" in outputs[0]  # the logged hint to use srun


@pytest.mark.slow
def test_torchrun_standalone(tmp_path: Path) -> None:
    outputs = _run_all([([str(LAUNCH / "torchrun.sh"), "2", str(SCRIPT)], _env())], tmp_path)
    _assert_ranks(outputs, [(0, 2, 0, "torchrun", "gloo"), (1, 2, 1, "torchrun", "gloo")])


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(tmp_path: Path) -> None:
    common = {
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RDZV_ID": uuid.uuid4().hex,
    }
    cmd = [str(LAUNCH / "torchrun.sh"), "1", str(SCRIPT)]
    outputs = _run_all([(cmd, _env(**common, NODE_RANK=str(node))) for node in (0, 1)], tmp_path)
    # One process per "node": both have local rank 0.
    _assert_ranks(outputs, [(0, 2, 0, "torchrun", "gloo"), (1, 2, 0, "torchrun", "gloo")])
    assert all(len(_OK.findall(out)) == 1 for out in outputs)


@pytest.mark.mpi
@pytest.mark.slow
def test_mpiexec(tmp_path: Path) -> None:
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed: pip install --only-binary=:all: mpi4py mpich")
    env = _env()
    if shutil.which("mpirun", path=env["PATH"]) is None and shutil.which("mpiexec", path=env["PATH"]) is None:
        pytest.skip("no mpirun/mpiexec on PATH: pip install --only-binary=:all: mpi4py mpich")
    outputs = _run_all([([str(LAUNCH / "mpirun.sh"), "2", str(SCRIPT)], env)], tmp_path)
    _assert_ranks(outputs, [(0, 2, 0, "mpi", "gloo"), (1, 2, 1, "mpi", "gloo")])


@pytest.mark.mpi
def test_mpi_size_mismatch_is_explained(tmp_path: Path) -> None:
    # PMI_* say 2 ranks, but without mpiexec MPI starts a singleton: the mismatched-mpiexec error.
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed: pip install --only-binary=:all: mpi4py mpich")
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=_env(PMI_RANK="1", PMI_SIZE="2"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode != 0
    assert (
        "RuntimeError: MPI_COMM_WORLD says rank 0 of 1 but PMI_RANK/PMI_SIZE say rank 1 of 2" in done.stderr
    )
    assert "mpiexec" in done.stderr


def _slurm_task(rank: int, port: int) -> dict[str, str]:
    return _env(
        SLURM_JOB_ID="4242",
        SLURM_STEP_ID="0",
        SLURM_PROCID=str(rank),
        SLURM_NTASKS="2",
        SLURM_LOCALID=str(rank),
        SLURM_STEP_NODELIST="127.0.0.[1-2]",  # first host of the expanded list: 127.0.0.1
        MASTER_PORT=str(port),
    )


def test_simulated_slurm_step(tmp_path: Path) -> None:
    port = _free_port()
    outputs = _run_all(
        [([sys.executable, str(SCRIPT)], _slurm_task(rank, port)) for rank in (0, 1)], tmp_path
    )
    _assert_ranks(outputs, [(0, 2, 0, "slurm", "gloo"), (1, 2, 1, "slurm", "gloo")])


def _batch_env(**extra: str) -> dict[str, str]:
    return _env(SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.[1-2]", **extra)


def test_sbatch_dry_run(tmp_path: Path) -> None:
    cmd = ["bash", str(LAUNCH / "slurm.sbatch"), str(SCRIPT), "--name", "two words"]
    done = subprocess.run(
        cmd, env=_batch_env(SHARDOPTIM_DRY_RUN="1"), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr
    assert shlex.split(done.stdout) == [
        "srun",
        "--kill-on-bad-exit=1",
        sys.executable,
        str(SCRIPT),
        "--name",
        "two words",
    ]
    assert "job 4242, 2 tasks on 127.0.0.[1-2]" in done.stderr


_FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: start SLURM_NTASKS tasks of one step on this host.
set -euo pipefail
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_STEP_ID=0 SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
"""


@pytest.mark.slow
def test_sbatch_with_a_fake_srun(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(_FAKE_SRUN)
    srun.chmod(0o755)
    env = _batch_env(MASTER_PORT=str(_free_port()))
    env["PATH"] = os.pathsep.join((str(bin_dir), env["PATH"]))
    outputs = _run_all([(["bash", str(LAUNCH / "slurm.sbatch"), str(SCRIPT)], env)], tmp_path)
    _assert_ranks(outputs, [(0, 2, 0, "slurm", "gloo"), (1, 2, 1, "slurm", "gloo")])
