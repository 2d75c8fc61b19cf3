"""Soak: 2 ranks, 2,000 AdamW steps with CosineAnnealingLR and a sharded checkpoint every 200 steps.

Data parallel as in training: each rank takes its half of every batch, the gradients are averaged with
one all_reduce, and the ShardedOptimizer steps. Each rank also runs the unsharded reference, a plain
torch.optim.AdamW fed the same averaged gradient (the sum of the two halves' gradients, halved: with 2
ranks gloo's sum is a single, commutative addition, so the reference is bitwise exact). Checks: current
RSS flat after warm-up (sampled after each checkpoint; growth from step 200 < 20 MiB), identical replicas
(verify_replicas and a byte comparison), parameters bitwise equal to the reference, and the last
checkpoint (the same path overwritten 10 times) loads back. `pytest -s` prints a summary.
"""

from __future__ import annotations

import copy
import gc
import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardoptim import ShardedOptimizer, checkpoint
from tests._dist import RankPool, all_equal_across_ranks

STEPS = 2000
SAVE_EVERY = 200
BATCH = 16
RSS_GROWTH_LIMIT_MIB = 20.0
OPTIONS: dict[str, Any] = {"lr": 3e-3, "weight_decay": 0.01}


def _mlp() -> torch.nn.Sequential:
    """20,480 parameters in 6 tensors."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128),
        torch.nn.Tanh(),
        torch.nn.Linear(128, 112),
        torch.nn.Tanh(),
        torch.nn.Linear(112, 16),
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(BATCH, 32, generator=gen)
    return x, torch.sin(x[:, :16]) + 0.1 * torch.randn(BATCH, 16, generator=gen)


def _half_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
    """Return the flat gradient of the loss on rank `rank`'s half of the batch."""
    half = BATCH // 2
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(
        model(x[rank * half : (rank + 1) * half]), y[rank * half : (rank + 1) * half]
    ).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _set_grads_(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _rss_mib() -> float:
    """Current resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _check_soak(rank: int, world_size: int, *, path: str) -> dict[str, Any]:
    assert world_size == 2, "the reference's gradient average is bitwise exact for 2 ranks only"
    model, ref_model = _mlp(), _mlp()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, **OPTIONS)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    flags = {k: v for k in ("fused", "foreach") if (v := opt.param_groups[0].get(k)) is not None}
    ref = torch.optim.AdamW(ref_model.parameters(), **OPTIONS, **flags)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=STEPS)
    step_to_rss: dict[int, float] = {}
    start = time.monotonic()
    for step in range(STEPS):
        x, y = _batch(step)
        grad = _half_grads(model, x, y, rank)
        dist.all_reduce(grad)
        _set_grads_(model, grad.div_(world_size))
        opt.step()
        sched.step()
        halves = [_half_grads(ref_model, x, y, r) for r in range(world_size)]
        _set_grads_(ref_model, (halves[0] + halves[1]).div_(world_size))
        ref.step()
        ref_sched.step()
        if (step + 1) % SAVE_EVERY == 0:
            checkpoint.save(path, opt, model=model, extra={"sched": sched, "step": step + 1})
            gc.collect()
            step_to_rss[step + 1] = _rss_mib()
    seconds = time.monotonic() - start
    opt.verify_replicas()
    assert all(all_equal_across_ranks(p) for p in model.parameters()), "replicas differ across ranks"
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), f"{name} differs from the unsharded reference after {STEPS} steps"
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh_opt = ShardedOptimizer(fresh.parameters(), torch.optim.AdamW, **OPTIONS)
    fresh_sched = torch.optim.lr_scheduler.CosineAnnealingLR(fresh_opt, T_max=STEPS)
    extras = checkpoint.load(path, fresh_opt, model=fresh, extra={"sched": fresh_sched})
    assert extras["step"] == STEPS and fresh_sched.last_epoch == STEPS
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))
    return {"step_to_rss": step_to_rss, "seconds": seconds}


@pytest.mark.slow
def test_soak_2000_steps(ranks2: RankPool, tmp_path: Any) -> None:
    results = ranks2.run(_check_soak, path=str(tmp_path / "ckpt"))
    for rank, result in enumerate(results):
        rss = result["step_to_rss"]
        assert sorted(rss) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
        growth = max(rss.values()) - rss[SAVE_EVERY]
        print(
            f"\n[soak] rank {rank}: {STEPS} steps in {result['seconds']:.1f} s; RSS (MiB) at steps "
            + ", ".join(f"{s}: {m:.1f}" for s, m in rss.items())
            + f"; peak growth after step {SAVE_EVERY}: {growth:.2f} MiB"
        )
        assert rss[STEPS] - rss[SAVE_EVERY] < RSS_GROWTH_LIMIT_MIB, f"rank {rank}: RSS grew: {rss}"
        assert growth < RSS_GROWTH_LIMIT_MIB, f"rank {rank}: RSS peak grew: {rss}"
