"""Hand-written DDP loops under torchrun: the rank-0 save done wrong fails fast, done right resumes bitwise.

- `_rank0_consolidate_script.py` consolidates inside `if rank == 0:`: rank 0 must raise
  shardoptim.EntryError after entry_timeout_s and the job must end on every rank, far below the
  group's 30-minute timeout.
- `examples/ddp_loop.py` (a nanoGPT-style loop, the optimizer gathered on every rank before rank 0
  saves): a run split by --stop-after and --resume logs the same losses, bit for bit, as one
  uninterrupted run; and with `fused=None` ("sharded-plain") the sharded script logs the losses of
  the plain torch.optim.AdamW script, bit for bit.
"""

from __future__ import annotations

import re
import shlex
import sys
import time
from pathlib import Path

import torch

from tests._subproc import run_logged

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TIMEOUT_S = 150.0
_LOSS = re.compile(r"^iter (\d+) loss \S+ exact (\S+)$", re.MULTILINE)


def _run(cmd: list[str], cwd: Path) -> tuple[int, str, float]:
    """Run `cmd`; return (exit code, output, seconds), failing the test if it outlives TIMEOUT_S."""
    start = time.monotonic()
    code, output = run_logged(cmd, log=cwd / f"output-{time.monotonic_ns()}.log", timeout_s=TIMEOUT_S, cwd=cwd)
    return code, output, time.monotonic() - start


def _losses(output: str) -> dict[int, str]:
    return {int(it): exact for it, exact in _LOSS.findall(output)}


def _example(tmp_path: Path, *args: str) -> str:
    cmd = [*TORCHRUN, str(REPO / "examples" / "ddp_loop.py"), "--iters", "10", "--save-every", "5", *args]
    code, output, _ = _run(cmd, tmp_path)
    assert code == 0, f"{shlex.join(cmd)} exited with {code}:\n{output}"
    return output


def test_rank0_only_consolidation_fails_fast_on_every_rank(tmp_path: Path) -> None:
    entry_timeout_s = 3.0
    script = REPO / "tests" / "launch" / "_rank0_consolidate_script.py"
    code, output, elapsed = _run([*TORCHRUN, str(script), str(entry_timeout_s)], tmp_path)
    assert code != 0, f"the wrong pattern exited 0:\n{output}"
    assert "EntryError" in output and "Called on rank 0 only?" in output, output
    assert "outside `if rank == 0:`" in output and "ranks [1] did not call it within 3 s" in output, output
    assert "rank 0 finished step 1" not in output, output
    assert not (tmp_path / "never-written.pt").exists()
    # Startup of two ranks takes 5-20 s here; the group's own timeout would be 1,800 s.
    assert elapsed < 90.0, f"took {elapsed:.0f} s:\n{output}"


def test_split_run_resumes_bitwise(tmp_path: Path) -> None:
    whole = _losses(_example(tmp_path, "--out", str(tmp_path / "whole"), "--optimizer", "sharded-plain"))
    first = _losses(_example(tmp_path, "--out", str(tmp_path / "split"), "--optimizer", "sharded-plain", "--stop-after", "5"))
    second = _losses(_example(tmp_path, "--out", str(tmp_path / "split"), "--optimizer", "sharded-plain", "--resume"))
    assert sorted(whole) == list(range(1, 11)) and sorted(first) == list(range(1, 6)), (whole, first)
    assert sorted(second) == list(range(6, 11)), second
    assert {**first, **second} == whole
    a = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)


def test_switched_script_reproduces_plain_losses_with_fused_none(tmp_path: Path) -> None:
    plain = _losses(_example(tmp_path, "--out", str(tmp_path / "plain"), "--optimizer", "plain"))
    sharded = _losses(_example(tmp_path, "--out", str(tmp_path / "sharded"), "--optimizer", "sharded-plain"))
    assert len(plain) == 10 and sharded == plain
    # A plain torch.optim.AdamW loads the sharded run's checkpoint (its own format).
    ckpt = torch.load(tmp_path / "sharded" / "ckpt.pt", weights_only=True)
    ref = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    params = [torch.nn.Parameter(t.clone()) for t in ckpt["model"].values()]
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    torch.optim.AdamW(groups).load_state_dict(ckpt["optimizer"])
    for index, state in ref["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, ckpt["optimizer"]["state"][index][key]), (index, key)
    readme = (REPO / "README.md").read_text()
    assert "fused=None" in readme, "the README must say which option reproduces a plain run"
