"""A plain script that builds ShardedOptimizers, steps and destroys the process group exits: 5 runs in a row.

The script (tests/launch/_teardown_script.py) never deletes its models or optimizers. Teardown used
to deadlock there (DDP's reducer destroying the gloo group with the GIL held while a gloo worker waits
for the GIL) or abort at interpreter exit; see shardoptim/teardown.py. Each run starves gloo's worker
threads (nice 19) so the race window stays open on a busy machine, and must exit with status 0 within
RUN_TIMEOUT_S, else its process group is killed (after a py-spy dump of the ranks when py-spy is
installed) and the test fails with the output.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._subproc import child_env, run_logged

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_teardown_script.py")
NUM_RUNS = 5
RUN_TIMEOUT_S = 60.0
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict[str, str]:
    return child_env()


def _descendants(pid: int) -> list[int]:
    """Return the processes below `pid` (Linux /proc; empty elsewhere)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def _stacks(pid: int) -> str:
    """Return py-spy's native + Python stacks of every process below `pid`, when py-spy is installed."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return "(py-spy not installed: no stacks)"
    dumps = []
    for child in _descendants(pid):
        try:
            done = subprocess.run(
                [py_spy, "dump", "--native", "--pid", str(child)], capture_output=True, text=True, timeout=30
            )
            dumps.append(done.stdout + done.stderr)
        except (OSError, subprocess.TimeoutExpired) as err:
            dumps.append(f"pid {child}: py-spy failed: {err}")
    return "\n".join(dumps)


def _run_once(run: int, tmp_path: Path) -> float:
    """Launch the script once; return its wall time, or fail with its output (and stacks on a hang)."""
    cmd = [*TORCHRUN, str(SCRIPT), "--starve-gloo-workers"]
    start = time.perf_counter()
    code, output = run_logged(
        cmd, log=tmp_path / f"run{run}.log", timeout_s=RUN_TIMEOUT_S, env=_env(), on_timeout=_stacks
    )
    if code != 0:
        pytest.fail(f"run {run + 1} of {NUM_RUNS}: {shlex.join(cmd)} exited with {code}:\n{output}")
    for rank in (0, 1):
        assert f"rank {rank}: destroyed the process group" in output, output
    assert "lbfgs: state bytes per rank" in output, output
    return time.perf_counter() - start


def test_plain_script_exits_after_destroy_process_group(tmp_path: Path) -> None:
    seconds = [_run_once(run, tmp_path) for run in range(NUM_RUNS)]
    print("teardown runs (s):", " ".join(f"{s:.1f}" for s in seconds))


_HOLD_SCRIPT = """
import os, sys, tempfile, time
import torch.distributed as dist
from shardoptim import teardown
from shardoptim.comm import Comm

def gloo_threads():
    if not os.path.isdir("/proc/self/task"):
        return -1
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sum(n.startswith(("pt_gloo", "gloo_")) for n in names)

tmp = tempfile.mkdtemp()
for generation in range(2):
    store = dist.FileStore(os.path.join(tmp, f"store{generation}"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    Comm()
    Comm()  # the same group is held once
    assert teardown.num_held() == 1, teardown.num_held()
    dist.destroy_process_group()
    assert teardown.num_held() == 1, "held until the next group or exit"
    # NOTE: a new thread carries its creator's name until gloo renames it: poll briefly (loaded machines)
    deadline = time.monotonic() + 5.0
    while gloo_threads() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gloo_threads() != 0, "the destroyed group's gloo threads are still there (held)"
teardown._release_all()
assert teardown.num_held() == 0
assert gloo_threads() in (0, -1), gloo_threads()
print("ok")
"""


def test_groups_held_until_next_group_or_exit(tmp_path: Path) -> None:
    """The group of a Comm is held past destroy_process_group, swept at the next Comm, freed at exit."""
    done = subprocess.run(
        [sys.executable, "-c", _HOLD_SCRIPT],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
