"""`torch.compile(opt.step)` (PyTorch's "compile the optimizer" recipe) runs and matches the eager step.

The sharded step talks to other ranks, which dynamo cannot trace: it is a graph break that runs the
step as written (issue 25 tracks compiling the local update itself).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer


def _run(compiled: bool, *, name: str, stage: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    opt = ShardedOptimizer(model.parameters(), getattr(torch.optim, name), lr=1e-2, stage=stage)
    step = torch.compile(opt.step) if compiled else opt.step
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        step()
        opt.zero_grad()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def _check_compiled_step(rank: int, world_size: int, *, name: str, stage: int) -> bool:
    import torch._dynamo

    torch._dynamo.reset()
    eager = _run(False, name=name, stage=stage)
    compiled = _run(True, name=name, stage=stage)
    return all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.parametrize(("name", "stage"), [("AdamW", 1), ("Adafactor", 1), ("AdamW", 2)])
def test_compiled_step_matches_eager(ranks2: Any, name: str, stage: int) -> None:
    assert ranks2.run(_check_compiled_step, name=name, stage=stage) == [True, True]
