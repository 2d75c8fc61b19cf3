"""Train with Hugging Face Trainer, Accelerate and Lightning on 2 CPU ranks (torchrun, gloo).

For each framework, one torchrun start trains a tiny GPT-2 for 6 steps with ShardedOptimizer(AdamW)
(the framework's own default save call writes a checkpoint after step 3) and then the same run with
plain torch.optim.AdamW(fused=True); a second torchrun start (new processes) resumes the sharded run
from that checkpoint. The scripts (`_*_script.py`) write each run's final parameters per rank; the
tests compare them. Each start takes 15-60 s on 2 busy cores (mostly importing the framework);
every wait has a timeout, after which the launcher's whole process group is killed.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._subproc import child_env, run_logged

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT_S = 300.0
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
PARITY_ATOL = 1e-6
"""Allowed max abs difference between sharded and plain AdamW (the same fused kernel: bitwise so far)."""
#: framework -> (script, modules it needs)
FRAMEWORKS = {
    "trainer": ("_trainer_script.py", ("transformers", "accelerate", "safetensors")),
    "accelerate": ("_accelerate_script.py", ("transformers", "accelerate", "safetensors")),
    "lightning": ("_lightning_script.py", ("transformers", "lightning")),
}


def _env() -> dict[str, str]:
    # nothing is downloaded; fail fast if something tries
    return child_env(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _torchrun(script: str, out: Path, runs: str) -> str:
    """Start `script --out out --runs runs` under torchrun (2 ranks); return its output or fail the test."""
    cmd = [*TORCHRUN, str(HERE / script), "--out", str(out), "--runs", runs]
    log = out.parent / f"{out.name}_{runs.replace(',', '_')}.log"
    code, output = run_logged(cmd, log=log, timeout_s=TIMEOUT_S, env=_env())
    if code != 0:
        pytest.fail(f"{shlex.join(cmd)} exited with {code}:\n{output[-20000:]}")
    return output


class Runs:
    """The results of one framework's runs, read from the scripts' output dir."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def params(self, run: str, rank: int = 0) -> dict[str, torch.Tensor]:
        loaded: dict[str, torch.Tensor] = torch.load(self.out / f"{run}_rank{rank}.pt", weights_only=True)
        return loaded

    def info(self, run: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.out / f"{run}.json").read_text())
        return loaded


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(FRAMEWORKS))
def test_framework_trains_saves_and_resumes(framework: str, tmp_path: Path) -> None:
    # One test per framework (not one per check): its two torchrun starts must run once, also
    # when pytest-xdist spreads tests over workers.
    script, modules = FRAMEWORKS[framework]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{framework} needs {missing} (pip install -e '.[test]')")
    out = tmp_path / "out"
    out.mkdir()
    _torchrun(script, out, "sharded,adamw")
    _torchrun(script, out, "sharded_resume")  # new processes, from the checkpoint written after step 3
    runs = Runs(out)
    sharded, plain, resumed = runs.info("sharded"), runs.info("adamw"), runs.info("sharded_resume")

    # Really sharded over both ranks (not built before the process group existed), and trained.
    assert sharded["world_size"] == sharded["opt_world_size"] == resumed["opt_world_size"] == 2, sharded
    assert sharded["max_change_from_init"] > 1e-3, "training changed nothing"
    for run in ("sharded", "sharded_resume"):
        assert _max_abs_diff(runs.params(run, rank=0), runs.params(run, rank=1)) == 0.0, (
            f"{run}: replicas differ"
        )

    # (a) The same parameters as plain AdamW(fused=True) under the same framework.
    diff = _max_abs_diff(runs.params("sharded"), runs.params("adamw"))
    assert diff <= PARITY_ATOL, f"max abs diff to plain AdamW(fused=True): {diff:.3g}"

    # (b) A run resumed in new processes from the framework's own checkpoint ends where the
    # uninterrupted one did.
    diff = _max_abs_diff(runs.params("sharded_resume"), runs.params("sharded"))
    assert diff <= PARITY_ATOL, f"max abs diff between resumed and uninterrupted runs: {diff:.3g}"

    # (c) The model file holds every tensor of the model's state_dict; safetensors writers may drop
    # only a tied weight (GPT-2's lm_head.weight is wte.weight), exactly as with a plain optimizer.
    ckpt = sharded["checkpoint"]
    assert ckpt["model_keys"] == plain["checkpoint"]["model_keys"]
    lost = set(sharded["state_dict_keys"]) - set(ckpt["model_keys"])
    assert lost <= {"lm_head.weight"}, f"the checkpoint lacks {sorted(lost)}"
    # The optimizer file holds the full state: one entry per parameter (tied: one parameter, two
    # state_dict keys), in both groups.
    num_params = len(sharded["state_dict_keys"]) - 1
    assert plain["checkpoint"]["optimizer_state_entries"] == num_params
    assert (ckpt["optimizer_state_entries"], ckpt["optimizer_groups"]) == (num_params, 2)
