"""The offline consolidation tool as users run it: `shardoptim-consolidate DIR OUT.pt` in a subprocess.

The checkpoint is written in this process at world size 1 (no process group); each case starts a
fresh interpreter (a few seconds: it imports torch) under a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer, checkpoint

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120.0
SCRIPT = Path(sys.executable).with_name("shardoptim-consolidate")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO, check=False
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A sharded AdamW checkpoint after 2 steps, and its optimizer's own state_dict for comparison."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 7)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    checkpoint.save(path, opt, model=model)
    opt.consolidate_state_dict(to=0)
    return path, opt.state_dict()


def _check_output(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = torch.load(out, weights_only=True)
    assert sorted(got["state"]) == sorted(expected["state"]) == [0, 1, 2, 3]
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(got["state"][index][key], value), (index, key)
    assert [g["params"] for g in got["param_groups"]] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("how", ["console_script", "python_m_cli"])
def test_consolidates_without_warnings(saved: tuple[Path, Any], tmp_path: Path, how: str) -> None:
    if how == "console_script" and not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed; run `pip install -e .` to create the console script")
    cmd = [str(SCRIPT)] if how == "console_script" else [sys.executable, "-m", "shardoptim.cli"]
    path, expected = saved
    out = tmp_path / "full.pt"
    proc = _run(*cmd, str(path), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    assert f"wrote {out}: 4 parameters with state, 1 param groups" in proc.stdout
    assert not out.with_name("full.pt.partial").exists()
    _check_output(out, expected)


def test_old_module_command_still_works(saved: tuple[Path, Any], tmp_path: Path) -> None:
    path, expected = saved
    out = tmp_path / "full.pt"
    proc = _run(sys.executable, "-m", "shardoptim.checkpoint", "consolidate", str(path), str(out))
    assert proc.returncode == 0, proc.stderr
    _check_output(out, expected)


def test_help_and_errors() -> None:
    from shardoptim.cli import main

    proc = _run(sys.executable, "-m", "shardoptim.cli", "--help")
    assert proc.returncode == 0 and "usage: shardoptim-consolidate [-h] DIR OUT.pt" in proc.stdout
    assert main(["--help"]) == 0
    assert main([]) == 2  # argparse: missing arguments
    assert main(["/nonexistent/ckpt", "/tmp/never-written.pt"]) == 1
    assert not Path("/tmp/never-written.pt").exists()
