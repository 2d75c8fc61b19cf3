"""Drop-in behaviours that frameworks and ZeroRedundancyOptimizer users rely on (2 gloo ranks).

state_dict()/load_state_dict() in the call patterns of Accelerate, Trainer and Lightning; storage
re-binding after model.to(cpu:0); ZeroRedundancyOptimizer's constructor and step(**kwargs);
param-group values written by the base step; one base step per step; forwarded train()/eval().
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardoptim
from shardoptim import ShardedOptimizer
from tests._dist import RankPool


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(40, 37), (37,), (5, 37), (3,), (301,)]]


def _grads_(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


class _Counting(torch.optim.Optimizer):
    """Elementwise momentum SGD that counts its step calls in its groups and takes a keyword option.

    `k` (a per-call counter) and `d` (a value computed during the step) are written into the
    param groups, as D-Adaptation and Prodigy do.
    """

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr, k=0))

    @torch.no_grad()
    def step(self, closure: Any = None, *, scale: float = 1.0) -> Any:
        for group in self.param_groups:
            group["k"] += 1
            group["d"] = 0.5 * group["k"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"] * scale / group["d"])
        return None


shardoptim.register_elementwise(_Counting)


class _TwoSequences(torch.optim.Optimizer):
    """A schedule-free-like toy: train() and eval() rewrite the parameters from per-element state."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr, train_mode=True))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p].setdefault("z", p.clone()).add_(p.grad, alpha=-group["lr"])
                    p.copy_(self.state[p]["z"])
        return None

    @torch.no_grad()
    def eval(self) -> None:
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.mul_(0.5).add_(self.state[p]["z"], alpha=0.5)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.mul_(2.0).add_(self.state[p]["z"], alpha=-1.0)
                group["train_mode"] = True


shardoptim.register_elementwise(_TwoSequences)


def _check_state_dict_patterns(rank: int, world_size: int) -> None:
    params = _params()
    opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-2)
    # Accelerate's prepare(): state_dict() then load_state_dict() on every rank, before any step.
    fresh = opt.state_dict()
    assert fresh["state"] == {} and fresh["param_groups"][0]["params"] == [0, 1, 2, 3, 4]
    assert fresh["param_groups"][0]["fused"] is None, "the wrapper's own fused choice leaked into the checkpoint"
    opt.load_state_dict(copy.deepcopy(fresh))
    _grads_(params, 0)
    opt.step()
    with pytest.raises(RuntimeError, match=r"consolidate_state_dict\(to=0\) on every rank first"):
        opt.state_dict()
    opt.consolidate_state_dict(to=0)
    # Trainer: state_dict() on rank 0 only; it must not communicate (rank 1 never calls it).
    full = opt.state_dict() if rank == 0 else None
    if rank == 1:
        assert opt.state_dict() == {}
        opt.load_state_dict({})  # Lightning loads what the rank was given: a no-op
    objs: list[Any] = [None] * world_size
    dist.all_gather_object(objs, full)
    full = objs[0]
    assert full is not None and set(full["state"]) == {0, 1, 2, 3, 4}
    # Resume on every rank from rank 0's dict; a plain AdamW on one process takes it too.
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = ShardedOptimizer(twin_params, torch.optim.AdamW, lr=1e-2)
    twin.load_state_dict(full)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(plain_params, lr=1e-2)
    plain.load_state_dict(full)
    for step in (1, 2):
        for ps, o in ((params, opt), (twin_params, twin), (plain_params, plain)):
            _grads_(ps, step)
            o.step()
    for p, q, r in zip(params, twin_params, plain_params):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)  # plain AdamW: foreach, not fused
    # A half checkpoint stays a clear error.
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"state": full["state"]})


def test_state_dict_in_framework_call_patterns(ranks2: RankPool) -> None:
    ranks2.run(_check_state_dict_patterns)


def _check_moved_and_constructor(rank: int, world_size: int, *, as_view: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    ref = copy.deepcopy(model)
    group = dist.group.WORLD
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, group, as_view, lr=1e-2)  # ZeRO's positions
    assert opt.world_size == world_size and opt.config.parameters_as_bucket_view is as_view
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    model.to(torch.device("cpu", 0))  # what Trainer and Accelerate do after the optimizer was built
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
        if step == 1:
            with torch.no_grad():  # written in place from outside: reaches the buckets at the next step
                model[0].bias.fill_(0.25)
                ref[0].bias.fill_(0.25)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    opt.verify_replicas()
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == (len(opt.placement.buckets) if as_view else 4)  # views: one storage per bucket
    if not as_view:  # no bucket copy and no scratch kept: shared-memory gathers write the parameters in place
        assert all(b.buffer is None for b in opt.placement.buckets) and opt.placement.comm.transports.cpu_name() == "shm"
        assert opt.memory_nbytes()["params"] == sum(p.numel() * p.element_size() for p in model.parameters())
    with pytest.raises(ValueError, match="overlap_with_ddp=True is not supported.*stage=2"):
        ShardedOptimizer(model.parameters(), torch.optim.AdamW, group, False, True, lr=1e-2)


@pytest.mark.parametrize("as_view", [False, True], ids=["own_storage", "bucket_view"])
def test_moved_model_rebound_and_zero_constructor(ranks2: RankPool, as_view: bool) -> None:
    ranks2.run(_check_moved_and_constructor, as_view=as_view)


def _check_group_values_and_kwargs(rank: int, world_size: int) -> None:
    params = _params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ShardedOptimizer(params, _Counting, bucket_numel=500, lr=0.1)  # several buckets
    assert len(opt.placement.buckets) > 2
    ref = _Counting(ref_params, lr=0.1)
    for step in range(4):
        for ps, o in ((params, opt), (ref_params, ref)):
            _grads_(ps, step)
            o.step(scale=0.5)  # forwarded to the base step, as ZeroRedundancyOptimizer does
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    group = opt.param_groups[0]
    assert group["k"] == 4, f"the base step ran {group['k']} times in 4 steps (once per bucket?)"
    assert group["d"] == 2.0
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, (group["k"], group["d"]))
    assert values == [(4, 2.0)] * world_size


def test_group_values_flow_back_and_step_kwargs(ranks2: RankPool) -> None:
    ranks2.run(_check_group_values_and_kwargs)


def _check_train_eval(rank: int, world_size: int) -> None:
    params = _params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ShardedOptimizer(params, _TwoSequences, lr=0.1)
    ref = _TwoSequences(ref_params, lr=0.1)
    assert not hasattr(ShardedOptimizer(_params(1), torch.optim.SGD, lr=0.1), "train")
    for step in range(3):
        for ps, o in ((params, opt), (ref_params, ref)):
            o.train()
            _grads_(ps, step)
            o.step()
            o.eval()
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), "eval() weights differ from the unsharded optimizer's"
        assert opt.param_groups[0]["train_mode"] is False
    opt.verify_replicas()


def test_train_eval_forwarded_and_gathered(ranks2: RankPool) -> None:
    ranks2.run(_check_train_eval)


def _check_stage2_warns_on_full_grads(rank: int, world_size: int) -> None:
    params = _params()
    opt = ShardedOptimizer(params, torch.optim.AdamW, stage=2, lr=1e-2)
    _grads_(params, 0)  # gradients written into .grad by someone else (e.g. DDP), not by backward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.zero_grad()
        _grads_(params, 1)
        opt.step()
    messages = [str(w.message) for w in caught if "full .grad" in str(w.message)]
    assert len(messages) == 1 and "DistributedDataParallel" in messages[0]


def test_stage2_warns_once_on_full_grads(ranks2: RankPool) -> None:
    ranks2.run(_check_stage2_warns_on_full_grads)
