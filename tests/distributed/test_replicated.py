"""Kind "replicated": classes that couple tensors or draw random numbers run unsharded on every rank.

Toy classes defined here: the probe must pick the replicated kind for them, the result must equal
the plain class on one process, checkpoints and clipping must work, and a failure inside a base
step must raise on every rank.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardoptim
from shardoptim import ShardedOptimizer
from tests._dist import RankPool


class _GlobalNorm(torch.optim.Optimizer):
    """Momentum SGD on the gradient divided by the norm over all tensors: couples every tensor."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                    buf.mul_(0.9).add_(p.grad / norm)
                    p.add_(buf, alpha=-group["lr"])
        return None


class _Noisy(torch.optim.Optimizer):
    """SGD plus Gaussian noise from torch's global generator (Langevin-like)."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + 0.01 * torch.randn_like(p), alpha=-group["lr"])
        return None


class _FailsOnRank1(torch.optim.SGD):
    """SGD whose step fails on rank 1 only, after the probe (which runs it on one process)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if dist.is_initialized() and dist.get_rank() == 1 and len(self.param_groups[0]["params"]) > 3:
            raise FloatingPointError("rank-local trouble")
        return super().step(closure)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))


def _grads_(model: torch.nn.Module, step: int) -> None:
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(step))
    model.zero_grad()
    (model(x) ** 2).mean().backward()


def _check_global(rank: int, world_size: int, *, tmp: str) -> None:
    model, ref = _model(), _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ShardedOptimizer(model.parameters(), _GlobalNorm, lr=0.1)
    assert opt.sharding == "replicated" and opt.probe_verdict is not None
    assert opt.probe_verdict.update == "global", opt.probe_verdict.reason
    warned = [str(w.message) for w in caught if "is not sharded" in str(w.message)]
    assert len(warned) == (1 if rank == 0 else 0), warned
    ref_opt = _GlobalNorm(ref.parameters(), lr=0.1)
    for step in range(3):
        _grads_(model, step)
        _grads_(ref, step)
        if step == 2:  # the global norm of the full gradients, counted once (not once per rank)
            assert torch.equal(opt.clip_grad_norm_(0.1), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    opt.verify_replicas()
    # Consolidated: the plain class's own state_dict; loadable at any world size.
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict()
    if rank == 0:
        plain = ref_opt.state_dict()
        assert sd["param_groups"] == plain["param_groups"]
        for index, entry in plain["state"].items():
            assert torch.equal(sd["state"][index]["buf"], entry["buf"])
    objs: list[Any] = [None] * world_size
    dist.all_gather_object(objs, sd)
    twin_model = copy.deepcopy(model)
    twin = ShardedOptimizer(twin_model.parameters(), _GlobalNorm, lr=0.1)
    twin.load_state_dict(objs[0])
    shardoptim.checkpoint.save(Path(tmp) / "ckpt", opt, model=model)
    again_model = _model()
    again = ShardedOptimizer(again_model.parameters(), _GlobalNorm, lr=0.1)
    shardoptim.checkpoint.load(Path(tmp) / "ckpt", again, model=again_model)
    for m, o in ((model, opt), (twin_model, twin), (again_model, again), (ref, ref_opt)):
        _grads_(m, 3)
        o.step()
    for m in (twin_model, again_model, ref):
        for p, q in zip(model.parameters(), m.parameters()):
            assert torch.equal(p, q)
    with pytest.raises(ValueError, match="runs replicated .* supports stage=1"):
        ShardedOptimizer(_model().parameters(), _GlobalNorm, stage=2, lr=0.1)


def test_global_statistic_class_runs_replicated(ranks2: RankPool, tmp_path: Path) -> None:
    ranks2.run(_check_global, tmp=str(tmp_path))


def _check_rng(rank: int, world_size: int) -> None:
    model = _model()
    opt = ShardedOptimizer(model.parameters(), _Noisy, lr=0.1)
    assert opt.sharding == "replicated" and opt.probe_verdict is not None and opt.probe_verdict.uses_rng
    ref = _model()
    ref_opt = _Noisy(ref.parameters(), lr=0.1)
    torch.manual_seed(1000 + rank)  # each rank's own stream (dropout, data order)
    for step in range(3):
        _grads_(model, step)
        mine = torch.get_rng_state()
        opt.step()
        if rank != 0:
            assert torch.equal(torch.get_rng_state(), mine), "rank 1's own random stream was consumed"
    opt.verify_replicas()  # every rank drew rank 0's numbers
    torch.manual_seed(1000)  # rank 0's stream: the unsharded class with the same seed
    for step in range(3):
        _grads_(ref, step)
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_random_class_draws_rank0_numbers_on_every_rank(ranks2: RankPool) -> None:
    ranks2.run(_check_rng)


def _check_failure(rank: int, world_size: int) -> str:
    model = _model()
    opt = ShardedOptimizer(model.parameters(), _FailsOnRank1, sharding="tensor", lr=0.1)
    _grads_(model, 0)
    try:
        opt.step()
    except Exception as err:  # every rank must raise, none may wait in the gather
        return f"{type(err).__name__}: {err}"
    return "no error"


def test_base_step_failure_raises_on_every_rank(ranks2: RankPool) -> None:
    results = ranks2.run(_check_failure)
    assert results[1].startswith("RuntimeError: [rank 1/2] _FailsOnRank1.step() failed"), results[1]
    assert "FloatingPointError: rank-local trouble" in results[1]
    assert results[0].startswith("ValueError: [rank 0/2] _FailsOnRank1.step() on rank 1"), results[0]
