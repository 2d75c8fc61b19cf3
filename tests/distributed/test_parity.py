"""Bitwise parity of flat sharding with the unsharded torch.optim optimizer, at world sizes 1-4."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardoptim import ShardedOptimizer

# Two param groups with different, non-default options for each elementwise optimizer.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "SGD": (
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(lr=0.02, momentum=0.5, dampening=0.1, maximize=True),
    ),
    "Adam": (dict(lr=1e-2, amsgrad=True, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.9), maximize=True)),
    "AdamW": (dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=2e-3, weight_decay=0.0)),
    "Adamax": (dict(lr=1e-2, weight_decay=0.1), dict(lr=5e-3, maximize=True)),
    "Adagrad": (dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1), dict(lr=0.05, weight_decay=0.01)),
    "Adadelta": (dict(lr=1.0, rho=0.8, weight_decay=0.01), dict(lr=0.5, maximize=True)),
    "RMSprop": (dict(lr=1e-2, centered=True, momentum=0.5), dict(lr=5e-3, alpha=0.9, weight_decay=0.01)),
    "Rprop": (dict(lr=1e-2, etas=(0.4, 1.3)), dict(lr=5e-3, step_sizes=(1e-5, 10.0), maximize=True)),
    "ASGD": (dict(lr=1e-2, t0=2.0, lambd=1e-3, weight_decay=0.01), dict(lr=5e-3, alpha=0.5)),
    "NAdam": (
        dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1, momentum_decay=5e-3),
        dict(lr=5e-3),
    ),
    "RAdam": (dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1), dict(lr=5e-3, betas=(0.8, 0.95))),
}


class _Net(torch.nn.Module):
    """Small model: sizes not divisible by the world size, and tensors smaller than it."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = torch.nn.Linear(40, 37, dtype=dtype)  # 1480 + 37: cut across ranks
        self.b = torch.nn.Linear(37, 5, dtype=dtype)  # 185 + 5
        self.tiny = torch.nn.Parameter(torch.randn(2, dtype=dtype))  # smaller than world size 3 and 4
        self.one = torch.nn.Parameter(torch.randn(1, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x.to(self.a.weight.dtype)))
        return self.b(h).float().sum(-1) * self.tiny.float().sum() + self.one.float()


def _groups(model: torch.nn.Module, opts: tuple[dict[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    first = [model.a.weight, model.b.bias, model.tiny]
    second = [model.a.bias, model.b.weight, model.one]
    return [dict(params=first, **opts[0]), dict(params=second, **opts[1])]


def _averaged_grads_(model: torch.nn.Module, step: int, rank: int, world_size: int) -> None:
    """Backward on this rank's batch, then average the gradients over ranks (what DDP does)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(6, 40, generator=gen)
    y = torch.randn(6, generator=gen)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for p in model.parameters():
        if p.grad is not None and world_size > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)


def _replicas_equal(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return all(torch.equal(out[0], o) for o in out)


def _check_parity(
    rank: int, world_size: int, *, name: str, steps: int, none_grad_step: int = -1
) -> dict[str, Any]:
    torch.manual_seed(0)
    cls = getattr(torch.optim, name)
    model = _Net()
    ref = _Net()
    ref.load_state_dict(model.state_dict())
    opt = ShardedOptimizer(_groups(model, CASES[name]), cls)
    flags = {
        k: opt.param_groups[0][k] for k in ("fused", "foreach") if opt.param_groups[0].get(k) is not None
    }
    ref_opt = cls(_groups(ref, CASES[name]), **flags)
    for step in range(steps):
        _averaged_grads_(model, step, rank, world_size)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        if step == none_grad_step:
            model.a.weight.grad = None
            ref.a.weight.grad = None
        opt.step()
        ref_opt.step()
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), f"{name} step {step}: {pname} differs by {(p - q).abs().max().item()}"
        assert _replicas_equal(list(model.parameters())), f"{name} step {step}: replicas differ across ranks"
    return {"flags": flags, "pieces": len(opt.placement.pieces), "state_nbytes": opt.local_state_nbytes()}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bitwise_parity(pool_for: Any, name: str, world_size: int) -> None:
    results = pool_for(world_size).run(_check_parity, name=name, steps=5)
    if world_size > 1:
        assert sum(r["pieces"] for r in results) > len(results), "the model was not cut across ranks"
    impl = results[0]["flags"]
    expected = "fused" if name in {"SGD", "Adam", "AdamW"} else "foreach"  # Adagrad: see kinds._fused_supported
    assert impl == {expected: True}


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_none_grad_skips_param(ranks3: Any, name: str) -> None:
    ranks3.run(_check_parity, name=name, steps=4, none_grad_step=2)


def _check_frozen_and_empty_shard(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    frozen = torch.nn.Parameter(torch.randn(40), requires_grad=False)
    live = torch.nn.Parameter(torch.randn(10))
    before = frozen.detach().clone()
    opt = ShardedOptimizer([frozen, live], torch.optim.AdamW, lr=0.1)
    ref_live = live.detach().clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref_live], lr=0.1, fused=True)
    for _ in range(3):
        live.grad = torch.ones(10)
        ref_live.grad = torch.ones(10)
        opt.step()
        ref_opt.step()
    assert torch.equal(frozen, before), "a frozen parameter changed"
    assert torch.equal(live, ref_live)
    assert all(frozen is not p for p in opt.optim.state), "frozen parameter got state"
    state_for_frozen = [p for p in opt.optim.state if p.data_ptr() == frozen.data_ptr()]
    assert not state_for_frozen
    assert any(p is frozen for p in opt.param_groups[0]["params"])
    return {"pieces": len(opt.placement.pieces), "nbytes": opt.local_state_nbytes()}


def test_frozen_params_and_empty_shard(ranks4: Any) -> None:
    results = ranks4.run(_check_frozen_and_empty_shard)
    assert any(r["pieces"] == 0 for r in results), "expected a rank with an empty shard"
    assert sum(1 for r in results if r["nbytes"] > 0) == 1, "only the owner of `live` may hold state"


def _check_mixed_dtypes(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(300, dtype=torch.bfloat16)),
        torch.nn.Parameter(torch.randn(257)),
        torch.nn.Parameter(torch.randn(129, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(77, dtype=torch.bfloat16)),
    ]
    refs = [p.detach().clone().requires_grad_() for p in params]
    opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    assert len(opt.placement.buckets) == 3, "one bucket per dtype"
    ref_opt = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for p, r in zip(params, refs):
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, r.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        for p, r in zip(params, refs):
            assert torch.equal(p, r), f"{p.dtype} differs at step {step}"
    assert _replicas_equal(params)


def test_mixed_dtypes(ranks2: Any) -> None:
    ranks2.run(_check_mixed_dtypes)


def _check_closure(rank: int, world_size: int) -> int:
    torch.manual_seed(0)
    model = _Net()
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = 0

    def closure() -> float:
        nonlocal calls
        calls += 1
        _averaged_grads_(model, calls, rank, world_size)
        return 42.0 + calls

    loss = opt.step(closure)
    assert loss == 43.0
    assert _replicas_equal(list(model.parameters()))
    return calls


def test_closure_called_once_per_rank(ranks3: Any) -> None:
    assert ranks3.run(_check_closure) == [1, 1, 1]


def _check_add_param_group(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model, ref = _Net(), _Net()
    ref.load_state_dict(model.state_dict())
    opt = ShardedOptimizer([model.a.weight, model.a.bias], torch.optim.Adam, lr=1e-2)
    ref_opt = torch.optim.Adam([ref.a.weight, ref.a.bias], lr=1e-2, fused=True)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": [model.b.weight, model.b.bias, model.tiny, model.one], "lr": 5e-3})
            ref_opt.add_param_group({"params": [ref.b.weight, ref.b.bias, ref.tiny, ref.one], "lr": 5e-3})
        _averaged_grads_(model, step, rank, world_size)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 5e-3
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)


def test_add_param_group(ranks3: Any) -> None:
    ranks3.run(_check_add_param_group)


def _check_state_memory(rank: int, world_size: int) -> dict[str, int]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (100_000, 33_333, 7, 65_536)]
    opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return {"nbytes": opt.local_state_nbytes(), "steps": sum(1 for _ in opt.optim.state)}


def test_state_is_one_nth(ranks4: Any) -> None:
    results = ranks4.run(_check_state_memory)
    total_numel = 100_000 + 33_333 + 7 + 65_536
    ideal = total_numel * 8 / 4
    for r in results:
        moments = r["nbytes"] - 4 * r["steps"]  # fused AdamW keeps a 4-byte step per piece
        assert abs(moments - ideal) / ideal < 0.01, (moments, ideal)


def _check_gather_methods(rank: int, world_size: int, *, method: str) -> str:
    torch.manual_seed(0)
    model, ref = _Net(), _Net()
    ref.load_state_dict(model.state_dict())
    opt = ShardedOptimizer(_groups(model, CASES["AdamW"]), torch.optim.AdamW, bucket_numel=512)
    if method != "auto":
        opt.placement.comm.transports.use(method)  # type: ignore[arg-type]
    ref_opt = torch.optim.AdamW(_groups(ref, CASES["AdamW"]), fused=True)
    assert len(opt.placement.buckets) > 1
    for step in range(3):
        _averaged_grads_(model, step, rank, world_size)
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        ref_opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
        assert _replicas_equal(list(model.parameters()))
    return str(opt.placement.comm.transports.cpu_name())


@pytest.mark.parametrize("method", ["auto", "shm", "broadcast", "all_gather"])
def test_every_gather_method(ranks3: Any, method: str) -> None:
    """Each bucket gather path gives the same bitwise result; one host + gloo picks shared memory."""
    results = ranks3.run(_check_gather_methods, method=method)
    assert results == [("shm" if method == "auto" else method)] * 3


def _check_shm_full_falls_back(rank: int, world_size: int) -> str:
    import errno
    import os

    real = os.posix_fallocate

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    os.posix_fallocate = full  # a /dev/shm too small for the staging buffer
    try:
        return _check_gather_methods(rank, world_size, method="auto")
    finally:
        os.posix_fallocate = real


def test_full_dev_shm_falls_back_to_gloo(ranks2: Any) -> None:
    """No SIGBUS and no divergence: every rank agrees to gather through gloo broadcasts instead."""
    assert ranks2.run(_check_shm_full_falls_back) == ["broadcast", "broadcast"]
