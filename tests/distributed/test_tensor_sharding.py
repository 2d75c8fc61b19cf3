"""Whole-tensor sharding: bitwise parity with the unsharded optimizer for classes that read whole tensors.

Adafactor (1-D, 2-D, 3-D), Muon (2-D), SparseAdam (sparse embedding grads, dense rest under AdamW) and a
LAMB-style class defined here, at world sizes 1-4; the "auto" choice and the registry; the balance of
whole-tensor ownership; and per-rank state memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardoptim
from shardoptim import ShardedOptimizer
from tests._dist import all_equal_across_ranks

WORLD_SIZES = [1, 2, 3, 4]
STEPS = 6


class _Lamb(torch.optim.Optimizer):
    """LAMB-style test optimizer: Adam direction scaled per tensor by the trust ratio ||w|| / ||update||.

    Elementwise except for the two norms, which is exactly what flat slicing gets wrong.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * trust))
        return loss


# name -> (class, parameter shapes, options of the two param groups). Shapes are uneven, and there are
# more tensors than ranks but some of them are tiny.
DENSE_CASES: dict[
    str, tuple[type[torch.optim.Optimizer], list[tuple[int, ...]], tuple[dict[str, Any], ...]]
] = {
    "Adafactor": (
        torch.optim.Adafactor,
        [(7,), (13, 9), (3, 5, 4), (40, 37), (1, 6), (2, 3, 2)],
        (dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, beta2_decay=-0.5, maximize=True)),
    ),
    "Muon": (
        torch.optim.Muon,
        [(32, 16), (16, 48), (24, 24), (7, 13), (64, 8), (5, 40)],
        (
            dict(lr=2e-2, momentum=0.9),
            dict(lr=1e-2, nesterov=False, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
        ),
    ),
    "Lamb": (
        _Lamb,
        [(40, 37), (37,), (13, 9), (3, 5, 4), (2,), (37, 5)],
        (dict(lr=1e-2, weight_decay=0.01), dict(lr=5e-3, betas=(0.8, 0.99))),
    ),
}


def _two_groups(params: list[torch.Tensor], opts: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [dict(params=params[0::2], **opts[0]), dict(params=params[1::2], **opts[1])]


def _average_(grad: torch.Tensor, world_size: int) -> None:
    """Average a dense or sparse gradient over ranks in place (gloo all-reduces sparse tensors too)."""
    if world_size > 1:
        dist.all_reduce(grad)
        grad.div_(world_size)


def _state_nbytes(optim: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    return sum(
        v.numel() * v.element_size()
        for p in params
        for v in optim.state.get(p, {}).values()
        if isinstance(v, torch.Tensor)
    )


def _impl_flags(opt: ShardedOptimizer) -> dict[str, Any]:
    return {k: opt.param_groups[0][k] for k in ("fused", "foreach") if opt.param_groups[0].get(k) is not None}


def _ownership(opt: ShardedOptimizer, params: list[torch.Tensor]) -> list[int]:
    """Return the indices of the parameters this rank owns, checking that it owns them whole, in shape."""
    owned = []
    for piece in opt.placement.pieces:
        param = params[piece.index]
        assert piece.in_param.start == 0 and piece.in_param.numel == param.numel(), "a tensor was cut"
        assert piece.local.shape == param.shape, "the local optimizer must see the full shape"
        owned.append(piece.index)
    return owned


def _check_dense(
    rank: int, world_size: int, *, name: str, steps: int, sharding: str = "auto"
) -> dict[str, Any]:
    """Run the sharded and the unsharded optimizer on the same averaged gradients; report the differences."""
    torch.manual_seed(0)
    cls, shapes, opts = DENSE_CASES[name]
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    refs = [p.detach().clone().requires_grad_() for p in params]
    opt = ShardedOptimizer(_two_groups(params, opts), cls, sharding=sharding)
    flags = _impl_flags(opt)
    ref_opt = cls(_two_groups(refs, opts), **flags)
    order = [p for g in opt.param_groups for p in g["params"]]  # the optimizer's parameter indices
    ref_order = [r for g in ref_opt.param_groups for r in g["params"]]
    diffs = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        for p, r in zip(params, refs):
            p.grad = torch.randn(p.shape, generator=gen)
            _average_(p.grad, world_size)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        diffs.append(max((p - r).abs().max().item() for p, r in zip(params, refs)))
        assert all_equal_across_ranks(torch.cat([p.detach().reshape(-1) for p in params])), (
            f"{name} step {step}: replicas differ across ranks"
        )
    owned = _ownership(opt, order) if opt.sharding == "tensor" else []
    return {
        "sharding": opt.sharding,
        "flags": flags,
        "diffs": diffs,
        "owned": owned,
        "nbytes": opt.local_state_nbytes(),
        "ref_owned_nbytes": _state_nbytes(ref_opt, [ref_order[i] for i in owned]),
        "ref_nbytes": _state_nbytes(ref_opt, ref_order),
    }


def _assert_sharded_state(results: list[dict[str, Any]], num_params: int) -> None:
    """Each rank holds state for exactly its own tensors; together they hold all of it, once."""
    owned = sorted(i for r in results for i in r["owned"])
    assert owned == list(range(num_params)), f"every tensor must be owned by exactly one rank, got {owned}"
    for r in results:
        assert r["nbytes"] == r["ref_owned_nbytes"], r
    assert sum(r["nbytes"] for r in results) == results[0]["ref_nbytes"] > 0


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", sorted(DENSE_CASES))
def test_dense_parity(pool_for: Any, name: str, world_size: int) -> None:
    results = pool_for(world_size).run(_check_dense, name=name, steps=STEPS)
    for r in results:
        assert r["sharding"] == "tensor", "auto must shard per-tensor optimizers whole-tensor"
        assert r["diffs"] == [0.0] * STEPS, f"{name} differs from the unsharded optimizer: {r['diffs']}"
    expected_flags = {"foreach": True} if name == "Adafactor" else {}
    assert results[0]["flags"] == expected_flags
    _assert_sharded_state(results, len(DENSE_CASES[name][1]))
    if world_size > 1:
        assert sum(1 for r in results if r["owned"]) > 1, "the tensors should spread over several ranks"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_flat_slicing_breaks_lamb(pool_for: Any, world_size: int) -> None:
    """The same LAMB run with sharding='flat' (allowed for an unknown class) computes trust ratios on slices."""
    results = pool_for(world_size).run(_check_dense, name="Lamb", steps=STEPS, sharding="flat")
    assert results[0]["sharding"] == "flat"
    assert results[0]["diffs"][-1] > 0.0, "flat slicing should change a per-tensor optimizer's result"


class _SparseNet(torch.nn.Module):
    """Two sparse embeddings (for SparseAdam) and a dense head (for AdamW)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(50, 8, sparse=True)
        self.pos = torch.nn.Embedding(12, 8, sparse=True)
        self.hidden = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.out(torch.tanh(self.hidden(h))).squeeze(-1).mean(-1)

    def sparse_params(self) -> list[torch.nn.Parameter]:
        return [self.tok.weight, self.pos.weight]

    def dense_params(self) -> list[torch.nn.Parameter]:
        return [*self.hidden.parameters(), *self.out.parameters()]


def _check_sparse_adam(rank: int, world_size: int, *, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, ref = _SparseNet(), _SparseNet()
    ref.load_state_dict(model.state_dict())
    sparse_opt = ShardedOptimizer(model.sparse_params(), torch.optim.SparseAdam, lr=1e-2, betas=(0.8, 0.99))
    dense_opt = ShardedOptimizer(model.dense_params(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    assert (sparse_opt.sharding, dense_opt.sharding) == ("tensor", "flat")
    ref_sparse = torch.optim.SparseAdam(
        ref.sparse_params(), lr=1e-2, betas=(0.8, 0.99), **_impl_flags(sparse_opt)
    )
    ref_dense = torch.optim.AdamW(ref.dense_params(), lr=1e-2, weight_decay=0.1, **_impl_flags(dense_opt))
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * step + rank)
        idx = torch.randint(0, 20 + 10 * rank, (4, 12), generator=gen)  # rows differ between ranks
        y = torch.randn(4, generator=gen)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(idx), y).backward()
        assert model.tok.weight.grad is not None and model.tok.weight.grad.is_sparse
        dense_mean = model.tok.weight.grad.to_dense()
        _average_(dense_mean, world_size)
        for p, q in zip(model.parameters(), ref.parameters()):
            _average_(p.grad, world_size)
            q.grad = p.grad.clone()
        # the sparse all-reduce sums rows in another order than the dense one: equal up to rounding
        torch.testing.assert_close(model.tok.weight.grad.to_dense(), dense_mean)
        for o in (sparse_opt, dense_opt, ref_sparse, ref_dense):
            o.step()
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), (
                f"SparseAdam step {step}: {pname} differs by {(p - q).abs().max().item()}"
            )
        assert all_equal_across_ranks(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    owned = _ownership(sparse_opt, model.sparse_params())
    return {
        "owned": owned,
        "nbytes": sparse_opt.local_state_nbytes(),
        "ref_owned_nbytes": _state_nbytes(ref_sparse, [ref.sparse_params()[i] for i in owned]),
        "ref_nbytes": _state_nbytes(ref_sparse, ref.sparse_params()),
        "dense_nbytes": dense_opt.local_state_nbytes(),
    }


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sparse_adam_parity(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(_check_sparse_adam, steps=STEPS)
    _assert_sharded_state(results, 2)
    if world_size > 1:
        assert sorted(len(r["owned"]) for r in results)[-2:] == [1, 1], "the two embeddings go to two ranks"


# --------------------------------------------------------------------------------- auto choice and registry


class _SignDescent(torch.optim.Optimizer):
    """A user's elementwise optimizer (p -= lr * sign(grad)); safe to slice anywhere."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad.sign(), alpha=group["lr"])


def _kind_log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "register_elementwise" in r.getMessage()]


def test_registered_elementwise_goes_flat(caplog: pytest.LogCaptureFixture) -> None:
    # NOTE: a fresh subclass per call keeps the process-wide registry free of leftovers between tests.
    cls = type("RegisteredSign", (_SignDescent,), {})
    assert shardoptim.register_elementwise(cls) is cls
    caplog.set_level(logging.INFO, logger="shardoptim")
    opt = ShardedOptimizer([torch.nn.Parameter(torch.randn(5, 3))], cls, lr=0.1)
    assert opt.sharding == "flat"
    assert _kind_log_lines(caplog) == []


def test_unregistered_class_is_probed_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    cls = type("UnknownSign", (_SignDescent,), {})
    caplog.set_level(logging.INFO, logger="shardoptim")
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    opt = ShardedOptimizer(params, cls, lr=0.1)
    # NOTE: the probe sees an elementwise update, but a probe cannot prove it: whole tensors until registered
    assert opt.sharding == "tensor"
    assert opt.probe_verdict is not None and opt.probe_verdict.update == "elementwise"
    assert opt.probe_verdicts == (opt.probe_verdict,)
    lines = _kind_log_lines(caplog)
    assert len(lines) == 1 and "probed UnknownSign" in lines[0], lines
    assert ShardedOptimizer([torch.nn.Parameter(torch.randn(3))], cls, sharding="flat").sharding == "flat"


def test_registered_per_tensor_refuses_flat(caplog: pytest.LogCaptureFixture) -> None:
    cls = type("PerTensorSign", (_SignDescent,), {})
    shardoptim.register_per_tensor(cls, cost=lambda shape: float(shape.numel()) ** 2)
    caplog.set_level(logging.INFO, logger="shardoptim")
    assert ShardedOptimizer([torch.nn.Parameter(torch.randn(3))], cls).sharding == "tensor"
    assert _kind_log_lines(caplog) == [], "a registered class needs no hint"
    with pytest.raises(ValueError, match="sharding='flat'"):
        ShardedOptimizer([torch.nn.Parameter(torch.randn(3))], cls, sharding="flat")


# --------------------------------------------------------------------------------- balance

_HUGE = (20_000, 64)
_SMALL = [(64, 64)] * 20 + [(128, 32)] * 6 + [(48, 48)] * 5


def _longest_first(numels: list[int], num_shards: int) -> list[int]:
    """Reference longest-processing-time-first loads, written independently of shardoptim.tensor_owners."""
    loads = [0] * num_shards
    for numel in sorted(numels, reverse=True):
        rank = min(range(num_shards), key=lambda r: (loads[r], r))
        loads[rank] += numel
    return loads


def _check_balance(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [_HUGE, *_SMALL]]
    opt = ShardedOptimizer(params, torch.optim.Adafactor, lr=1e-2)
    return {
        "rank": rank,
        "imbalance": opt.placement.layouts[-1].imbalance(),
        "rank_to_numel": opt.placement.layouts[-1].rank_to_numel(),
        "owns_huge": 0 in _ownership(opt, params),
    }


def test_balance_with_one_huge_embedding(ranks4: Any) -> None:
    # NOTE: the honest limit of whole-tensor sharding: a tensor larger than total / N cannot be split,
    # so its owner holds at least that tensor and the imbalance is at least numel(huge) * N / total
    # (here about 3.5x). Flat sharding balances it perfectly but is only right for elementwise classes.
    results = ranks4.run(_check_balance)
    numels = [_HUGE[0] * _HUGE[1]] + [a * b for a, b in _SMALL]
    total = sum(numels)
    loads = _longest_first(numels, 4)
    assert results[0]["rank_to_numel"] == loads, "not the longest-first assignment"
    assert all(r["rank_to_numel"] == loads and r["imbalance"] == results[0]["imbalance"] for r in results)
    assert results[0]["imbalance"] == pytest.approx(max(loads) * 4 / total, rel=1e-12)
    owners = [r["rank"] for r in results if r["owns_huge"]]
    assert len(owners) == 1 and loads[owners[0]] >= numels[0]
    assert max(loads) == numels[0], "the small tensors all fit beside the huge one"
    assert results[0]["imbalance"] > 3.0


def _check_add_param_group_balances(rank: int, world_size: int) -> list[int]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=gen)) for _ in range(4)]
    opt = ShardedOptimizer([params[0]], torch.optim.Adafactor)
    for p in params[1:]:
        opt.add_param_group({"params": [p]})
    return opt.rank_to_numel()


def test_add_param_group_keeps_whole_tensor_balance(ranks2: Any) -> None:
    """Groups added one by one are balanced against what each rank already owns."""
    results = ranks2.run(_check_add_param_group_balances)
    assert results[0] == results[1] == [2 * 4096, 2 * 4096]
