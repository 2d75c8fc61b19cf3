"""LR schedulers, SWA and hand-edited param_groups on ShardedOptimizer at 2 and 3 gloo ranks (issue #5).

Every torch.optim.lr_scheduler (and SWALR with AveragedModel) drives the sharded optimizer exactly as it
drives the unsharded one: after every step the options of every group (lr, momentum, betas, initial_lr,
max_lr, ...) equal (==) those of a single-process reference fed the same averaged gradients, the
parameters are bitwise equal, and every rank holds the same replica. Rank-local hyperparameter changes
(a per-rank plateau metric, a manual lr change on one rank) are overwritten by rank 0's values with
hparam_sync="broadcast", raise on every rank with "check", and are the user's own choice with "off".
"""

from __future__ import annotations

import copy
import math
import pickle
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.optim import Optimizer, lr_scheduler
from torch.optim.swa_utils import SWALR, AveragedModel

import shardoptim
from shardoptim import ShardedOptimizer
from shardoptim.hparams import HparamSync, HparamSyncer
from tests._dist import all_equal_across_ranks

WORLD_SIZES = [2, 3]
STEPS = 8
ROUNDTRIP_AT = 3
"""After this many scheduler steps the scheduler is saved, rebuilt on the same optimizer and reloaded."""
SWA_START = 3
_ORDER_WARNINGS = ("lr_scheduler.step()` before `optimizer.step()", "`optimizer.step()` has been overridden")

# ----------------------------------------------------------------------------------- model and data


class _Net(torch.nn.Module):
    """Small model: a.weight is cut across ranks (at 2 and 3 ranks, 64-element alignment), sizes not
    divisible by the world size, and a tensor smaller than it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(29, 23)  # 667 + 23
        self.b = torch.nn.Linear(23, 3)  # 69 + 3
        self.tiny = torch.nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).sum(-1) * self.tiny.sum()


def _groups(model: _Net, opts: tuple[dict[str, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        dict(params=[model.a.weight, model.b.bias], **opts[0]),
        dict(params=[model.a.bias, model.b.weight, model.tiny], **opts[1]),
    ]


_OPTIMS: dict[str, tuple[type[Optimizer], tuple[dict[str, Any], dict[str, Any]]]] = {
    "SGD": (torch.optim.SGD, (dict(lr=0.1, momentum=0.9, weight_decay=0.01), dict(lr=0.05, momentum=0.8))),
    "Adam": (torch.optim.Adam, (dict(lr=0.01, betas=(0.9, 0.99)), dict(lr=0.005, weight_decay=0.1))),
}


def _models_and_optimizers(
    optim: str, *, rank: int, hparam_sync: str = "broadcast"
) -> tuple[_Net, _Net, ShardedOptimizer, Optimizer]:
    """The sharded model and optimizer, and a single-process copy of both with the same impl flag."""
    torch.manual_seed(0)
    cls, opts = _OPTIMS[optim]
    model, ref = _Net(), _Net()
    ref.load_state_dict(model.state_dict())
    opt = ShardedOptimizer(_groups(model, opts), cls, hparam_sync=hparam_sync)
    flags = {
        k: opt.param_groups[0][k] for k in ("fused", "foreach") if opt.param_groups[0].get(k) is not None
    }
    assert flags, "ShardedOptimizer resolved neither fused nor foreach"
    ref_opt = cls(_groups(ref, opts), **flags)
    return model, ref, opt, ref_opt


def _averaged_grads_(model: _Net, ref: _Net, step: int, rank: int, world_size: int) -> None:
    """Backward on this rank's batch, average over ranks (what DDP does), copy the result to `ref`."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(5, 29, generator=gen)
    y = torch.randn(5, generator=gen)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)
        q.grad = p.grad.clone()


def _hparams(opt: Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups]


def _assert_hparams_equal(got: list[dict[str, Any]], want: list[dict[str, Any]], where: str) -> None:
    """Every option of the reference is present with an equal (==) value and the same type."""
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
        for key, value in w.items():
            assert key in g, f"{where}: param_groups[{i}] lost {key!r} (has {sorted(g)})"
            if isinstance(value, torch.Tensor):
                assert torch.equal(g[key], value), f"{where}: param_groups[{i}][{key!r}] {g[key]} != {value}"
            else:
                assert g[key] == value, (
                    f"{where}: param_groups[{i}][{key!r}] = {g[key]!r}, reference {value!r}"
                )
                assert type(g[key]) is type(value), (
                    f"{where}: {key!r} is {type(g[key])}, reference {type(value)}"
                )


def _assert_params_equal(model: _Net, ref: _Net, where: str) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{where}: {name} differs by {(p - q).abs().max().item()}"


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _order_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if any(s in str(w.message) for s in _ORDER_WARNINGS)]


# ----------------------------------------------------------------------------------- schedulers


def _lambda_a(epoch: int) -> float:
    return 0.9**epoch


def _lambda_b(epoch: int) -> float:
    return 1.0 / (1.0 + epoch)


def _shrinking_factor(epoch: int) -> float:
    return 1.0 - 0.02 * epoch


def _plateau_metric(step: int) -> float:
    """Improves for 3 steps, then flat: with patience=1 the lr is cut at step 5 (cooldown 1)."""
    return 1.0 - 0.125 * min(step, 3)


Build = Callable[[Optimizer], list[Any]]

_SCHEDULERS: dict[str, tuple[str, Build]] = {
    "LambdaLR": ("SGD", lambda o: [lr_scheduler.LambdaLR(o, [_lambda_a, _lambda_b])]),
    "MultiplicativeLR": ("SGD", lambda o: [lr_scheduler.MultiplicativeLR(o, _shrinking_factor)]),
    "StepLR": ("SGD", lambda o: [lr_scheduler.StepLR(o, step_size=3, gamma=0.5)]),
    "MultiStepLR": ("Adam", lambda o: [lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3)]),
    "ConstantLR": ("SGD", lambda o: [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3)]),
    "LinearLR": ("Adam", lambda o: [lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=5)]),
    "ExponentialLR": ("SGD", lambda o: [lr_scheduler.ExponentialLR(o, gamma=0.8)]),
    "PolynomialLR": ("SGD", lambda o: [lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0)]),
    "CosineAnnealingLR": ("Adam", lambda o: [lr_scheduler.CosineAnnealingLR(o, T_max=5, eta_min=1e-4)]),
    "CosineAnnealingWarmRestarts": (
        "SGD",
        lambda o: [lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=1e-4)],
    ),
    "CyclicLR-SGD": (
        "SGD",
        lambda o: [
            lr_scheduler.CyclicLR(
                o,
                base_lr=[0.01, 0.005],
                max_lr=[0.1, 0.05],
                step_size_up=2,
                mode="triangular2",
                cycle_momentum=True,
                base_momentum=0.8,
                max_momentum=0.9,
            )
        ],
    ),
    "CyclicLR-Adam": (
        "Adam",
        lambda o: [
            lr_scheduler.CyclicLR(
                o,
                base_lr=0.001,
                max_lr=0.01,
                step_size_up=3,
                mode="exp_range",
                gamma=0.9,
                cycle_momentum=True,
                base_momentum=0.85,
                max_momentum=0.95,
            )
        ],
    ),
    "OneCycleLR-SGD": (
        "SGD",
        lambda o: [lr_scheduler.OneCycleLR(o, max_lr=[0.1, 0.05], total_steps=STEPS + 2, pct_start=0.3)],
    ),
    "OneCycleLR-Adam": (
        "Adam",
        lambda o: [
            lr_scheduler.OneCycleLR(
                o, max_lr=0.02, total_steps=STEPS + 2, three_phase=True, anneal_strategy="linear"
            )
        ],
    ),
    "ReduceLROnPlateau": (
        "SGD",
        lambda o: [lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1, cooldown=1)],
    ),
    "SequentialLR": (
        "Adam",
        lambda o: [
            lr_scheduler.SequentialLR(
                o,
                [
                    lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
                    lr_scheduler.ExponentialLR(o, 0.9),
                ],
                milestones=[3],
            )
        ],
    ),
    "ChainedScheduler": (
        "SGD",
        lambda o: [
            lr_scheduler.ChainedScheduler(
                [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4), lr_scheduler.ExponentialLR(o, 0.9)],
                optimizer=o,
            )
        ],
    ),
    # The torch docs' SWA recipe: a regular schedule first, then SWALR while the average is taken.
    "SWALR": (
        "SGD",
        lambda o: [
            lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
            SWALR(o, swa_lr=[0.05, 0.02], anneal_epochs=3, anneal_strategy="cos"),
        ],
    ),
}

# Keys a scheduler adds to every param_group; they must be present after every step.
_ADDED_KEYS: dict[str, tuple[str, ...]] = {
    "CyclicLR-SGD": ("initial_lr", "max_momentum", "base_momentum"),
    "CyclicLR-Adam": ("initial_lr", "max_momentum", "base_momentum"),
    "OneCycleLR-SGD": ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"),
    "OneCycleLR-Adam": ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"),
    "SWALR": ("initial_lr", "swa_lr"),
    "StepLR": ("initial_lr",),
}


def _step_schedulers(name: str, scheds: list[Any], step: int, metric: float) -> None:
    if name == "ReduceLROnPlateau":
        scheds[0].step(metric)
    elif name == "SWALR":
        (scheds[1] if step >= SWA_START else scheds[0]).step()
    else:
        for sched in scheds:
            sched.step()


def _reload(name: str, opt: Optimizer, scheds: list[Any]) -> list[Any]:
    """Save the schedulers, build fresh ones on the same optimizer and load the saved state.

    Building a scheduler writes the optimizer's lr (and momentum/betas), so the saved options are put
    back before loading, as `optimizer.load_state_dict` does when a run is resumed from a checkpoint.
    """
    saved_states = pickle.loads(pickle.dumps([s.state_dict() for s in scheds]))
    saved_hparams = copy.deepcopy(_hparams(opt))
    fresh = _SCHEDULERS[name][1](opt)
    for group, saved in zip(opt.param_groups, saved_hparams):
        group.update(saved)
    for sched, state in zip(fresh, saved_states):
        sched.load_state_dict(state)
    return fresh


def _check_scheduler_parity(
    rank: int, world_size: int, *, name: str, steps: int, roundtrip_at: int
) -> dict[str, Any]:
    optim, build = _SCHEDULERS[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, ref, opt, ref_opt = _models_and_optimizers(optim, rank=rank)
        scheds, ref_scheds = build(opt), build(ref_opt)
        swa = AveragedModel(model) if name == "SWALR" else None
        ref_swa = AveragedModel(ref) if name == "SWALR" else None
        _assert_hparams_equal(_hparams(opt), _hparams(ref_opt), "after building the scheduler")
        history: list[list[dict[str, Any]]] = []
        for step in range(steps):
            where = f"{name} step {step}"
            _averaged_grads_(model, ref, step, rank, world_size)
            opt.step()
            ref_opt.step()
            _assert_params_equal(model, ref, where)
            assert all_equal_across_ranks(_flat(model)), f"{where}: replicas differ across ranks"
            # the local optimizer ran with the wrapper's options of this step
            _assert_hparams_equal(_hparams(opt.optim), _hparams(opt), f"{where} (local optimizer)")
            if swa is not None and ref_swa is not None and step >= SWA_START:
                swa.update_parameters(model)
                ref_swa.update_parameters(ref)
                assert torch.equal(_flat(swa.module), _flat(ref_swa.module)), f"{where}: SWA average differs"
                assert torch.equal(swa.n_averaged, ref_swa.n_averaged)
            _step_schedulers(name, scheds, step, _plateau_metric(step))
            _step_schedulers(name, ref_scheds, step, _plateau_metric(step))
            _assert_hparams_equal(_hparams(opt), _hparams(ref_opt), where)
            for key in _ADDED_KEYS.get(name, ()):
                assert all(key in g for g in opt.param_groups), f"{where}: {key!r} missing"
            if step == roundtrip_at:
                scheds = _reload(name, opt, scheds)
                _assert_hparams_equal(_hparams(opt), _hparams(ref_opt), f"{where} after reload")
            history.append(copy.deepcopy(_hparams(opt)))
        # the last scheduler step must reach the parameters too
        _averaged_grads_(model, ref, steps, rank, world_size)
        opt.step()
        ref_opt.step()
        _assert_params_equal(model, ref, f"{name} final step")
        assert all_equal_across_ranks(_flat(model))
    cut = any(piece.in_param.numel < opt.placement.params[piece.index].numel() for piece in opt.placement.pieces)
    return {
        "cut": cut,
        "lrs": [[g["lr"] for g in groups] for groups in history],
        "momentum": [[g.get("momentum", g.get("betas")) for g in groups] for groups in history],
        "order_warnings": _order_warnings(caught),
    }


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("name", sorted(_SCHEDULERS))
def test_scheduler_parity(pool_for: Any, name: str, world_size: int) -> None:
    results = pool_for(world_size).run(
        _check_scheduler_parity, name=name, steps=STEPS, roundtrip_at=ROUNDTRIP_AT
    )
    assert any([r.pop("cut") for r in results]), "no parameter was cut across ranks"
    assert all(r == results[0] for r in results), "ranks saw different schedules"
    res = results[0]
    assert res["order_warnings"] == [], res["order_warnings"]
    for group in range(2):
        lrs = [step_lrs[group] for step_lrs in res["lrs"]]
        assert len(set(lrs)) > 1, (
            f"{name}: the lr of group {group} never changed ({lrs}); the test proves nothing"
        )
    if name.startswith(("CyclicLR", "OneCycleLR")):
        moms = [m[0] for m in res["momentum"]]
        assert len({str(m) for m in moms}) > 1, f"{name}: momentum/betas never cycled ({moms})"


# ----------------------------------------------------------------------------------- divergence


def _count_hparam_collectives(opt: ShardedOptimizer) -> dict[str, int]:
    """Count the hyperparameter collectives (Comm.broadcast_ / all_reduce_ / all_gather) of `opt` from now on.

    Every step agrees with one all-reduce; an all-gather follows only when the options differ.
    """
    counts = {"broadcast_": 0, "all_reduce_": 0, "all_gather": 0}
    comm = opt.placement.comm
    for method in counts:
        inner = getattr(comm, method)

        def counted(*args: Any, _inner: Any = inner, _method: str = method, **kwargs: Any) -> Any:
            counts[_method] += 1
            return _inner(*args, **kwargs)

        setattr(comm, method, counted)
    return counts


def _divergent_metric(step: int, rank: int) -> float:
    """Rank 0 improves for 3 steps and then plateaus; every other rank is flat from the start.

    With patience=1, ranks != 0 cut the lr after step 2, rank 0 after step 5, and the mean after step 5.
    """
    return _plateau_metric(step) if rank == 0 else 1.0


def _check_plateau_divergence(
    rank: int, world_size: int, *, mode: str, reduce_metric: bool, steps: int
) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, ref, opt, ref_opt = _models_and_optimizers("SGD", rank=rank, hparam_sync=mode)
        sched = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
        ref_sched = lr_scheduler.ReduceLROnPlateau(ref_opt, factor=0.5, patience=1)
        counts = _count_hparam_collectives(opt)
        lrs: list[list[float]] = []
        metrics: list[float] = []
        for step in range(steps):
            _averaged_grads_(model, ref, step, rank, world_size)
            try:
                opt.step()
            except RuntimeError as err:
                return {"error": str(err), "step": step, "lrs": lrs, "counts": counts}
            ref_opt.step()
            lrs.append([g["lr"] for g in opt.param_groups])
            if mode != "off":
                # rank 0's decisions (the reference follows rank 0's metric) reach every rank
                _assert_hparams_equal(_hparams(opt), _hparams(ref_opt), f"step {step}")
                _assert_params_equal(model, ref, f"step {step}")
            assert all_equal_across_ranks(_flat(model)), f"step {step}: replicas differ"
            metric = _divergent_metric(step, rank)
            ref_metric = _divergent_metric(step, 0)
            if reduce_metric:
                metric = ref_metric = shardoptim.all_reduce_metric(metric)
            metrics.append(metric)
            sched.step(metric)
            ref_sched.step(ref_metric)
    assert _order_warnings(caught) == []
    return {"error": None, "lrs": lrs, "metrics": metrics, "counts": counts, "best": sched.best}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_plateau_divergent_metric_broadcast(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(
        _check_plateau_divergence, mode="broadcast", reduce_metric=False, steps=STEPS
    )
    assert all(r["error"] is None for r in results)
    assert all(r["lrs"] == results[0]["lrs"] for r in results), "ranks ended with different lrs"
    assert results[0]["lrs"][-1] == [0.05, 0.025], "rank 0's own plateau decision (after step 5) must apply"
    assert results[0]["lrs"][3] == [0.1, 0.05], "the other ranks' earlier plateau must not"
    # NOTE: the schedulers' own state still differs per rank; only the optimizer's options are made equal.
    assert results[1]["best"] != results[0]["best"]
    # one all-reduce per step; an all-gather only in the 4 steps whose options differed across ranks
    expected = {"broadcast_": 0, "all_reduce_": STEPS, "all_gather": 4}
    assert all(r["counts"] == expected for r in results), results[0]["counts"]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_plateau_divergent_metric_check_raises_on_every_rank(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(
        _check_plateau_divergence, mode="check", reduce_metric=False, steps=STEPS
    )
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} did not raise"
        assert r["step"] == 3, "the step right after the other ranks' plateau decision must raise"
        msg = r["error"]
        assert f"[rank {rank}/{world_size}]" in msg, msg
        assert "param_groups[0]" in msg and "'lr'" in msg, msg
        assert "rank 0: 0.1" in msg, msg
        for other in range(1, world_size):
            assert f"rank {other}: 0.05" in msg, msg
        assert "all_reduce_metric" in msg, "the message should say how to fix it"
        assert r["counts"] == {"broadcast_": 0, "all_reduce_": 4, "all_gather": 1}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_plateau_all_reduce_metric_passes_check(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(
        _check_plateau_divergence, mode="check", reduce_metric=True, steps=STEPS
    )
    assert all(r["error"] is None for r in results), [r["error"] for r in results]
    assert all(r["metrics"] == results[0]["metrics"] for r in results), "all_reduce_metric differs per rank"
    assert all(r["lrs"] == results[0]["lrs"] and r["best"] == results[0]["best"] for r in results)
    assert results[0]["lrs"][-1] == [0.05, 0.025], "the reduced metric plateaus after step 5"
    expected_mean = (_plateau_metric(0) + (world_size - 1) * 1.0) / world_size
    assert math.isclose(results[0]["metrics"][0], expected_mean, rel_tol=1e-12)


def _check_manual_lr(rank: int, world_size: int, *, mode: str, steps: int) -> dict[str, Any]:
    model, ref, opt, ref_opt = _models_and_optimizers("Adam", rank=rank, hparam_sync=mode)
    counts = _count_hparam_collectives(opt)
    lrs: list[float] = []
    for step in range(steps):
        if step == 1 and rank == 1:
            opt.param_groups[0]["lr"] = 1e-5
        _averaged_grads_(model, ref, step, rank, world_size)
        try:
            opt.step()
        except RuntimeError as err:
            return {"error": str(err), "step": step, "counts": counts}
        ref_opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        assert all_equal_across_ranks(_flat(model)), f"step {step}: replicas differ"
        if mode != "off":
            _assert_hparams_equal(_hparams(opt), _hparams(ref_opt), f"step {step}")
            _assert_params_equal(model, ref, f"step {step}")
    same_as_ref = all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    return {
        "error": None,
        "lrs": lrs,
        "counts": counts,
        "same_as_ref": same_as_ref,
        "local_lr": opt.optim.param_groups[0]["lr"],
    }


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_manual_lr_on_one_rank_broadcast(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(_check_manual_lr, mode="broadcast", steps=3)
    for r in results:
        assert r["error"] is None
        assert r["lrs"] == [0.01, 0.01, 0.01], "rank 0's lr must win"
        assert r["local_lr"] == 0.01 and r["same_as_ref"]
        assert r["counts"] == {"broadcast_": 0, "all_reduce_": 3, "all_gather": 1}  # rank 1's lr: first step


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_manual_lr_on_one_rank_check_raises_on_every_rank(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(_check_manual_lr, mode="check", steps=3)
    for rank, r in enumerate(results):
        assert r["error"] is not None and r["step"] == 1, f"rank {rank}: {r}"
        msg = r["error"]
        assert "param_groups[0]['lr']" in msg and "rank 0: 0.01" in msg and "rank 1: 1e-05" in msg, msg
        if world_size > 2:
            assert "rank 2: 0.01" in msg, msg


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_manual_lr_on_one_rank_off_is_the_users_choice(pool_for: Any, world_size: int) -> None:
    """hparam_sync="off": no collective; each rank updates its own shard with its own lr.

    Replicas stay identical (every rank receives each shard from its owner) but no longer match an
    unsharded run: rank 1's shard moved with lr=1e-5. Users pick "off" only when they keep the
    options identical themselves.
    """
    results = pool_for(world_size).run(_check_manual_lr, mode="off", steps=3)
    assert all(r["error"] is None for r in results)
    assert all(r["counts"] == {"broadcast_": 0, "all_reduce_": 0, "all_gather": 0} for r in results), results
    assert results[0]["lrs"] == [0.01, 0.01, 0.01]
    assert results[1]["lrs"] == [0.01, 1e-5, 1e-5] and results[1]["local_lr"] == 1e-5
    assert not results[0]["same_as_ref"], "rank 1's shard should have moved with its own lr"


def _check_tensor_lr(rank: int, world_size: int, *, steps: int) -> dict[str, Any]:
    """A tensor lr is scheduled in place, broadcast in place, and stays the one tensor everywhere."""
    torch.manual_seed(0)
    model, ref = _Net(), _Net()
    ref.load_state_dict(model.state_dict())
    lr, ref_lr = torch.tensor(0.01), torch.tensor(0.01)
    opt = ShardedOptimizer(model.parameters(), torch.optim.Adam, lr=lr)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=ref_lr, fused=opt.param_groups[0]["fused"])
    sched = lr_scheduler.ExponentialLR(opt, gamma=0.5)
    ref_sched = lr_scheduler.ExponentialLR(ref_opt, gamma=0.5)
    for step in range(steps):
        if step == 2 and rank == 1:
            opt.param_groups[0]["lr"].fill_(1e-5)  # a rank-local in-place change, overwritten by rank 0's
        _averaged_grads_(model, ref, step, rank, world_size)
        opt.step()
        ref_opt.step()
        assert opt.param_groups[0]["lr"] is lr and opt.optim.param_groups[0]["lr"] is lr
        assert torch.equal(lr, ref_lr), f"step {step}: lr {lr} != {ref_lr}"
        _assert_params_equal(model, ref, f"step {step}")
        sched.step()
        ref_sched.step()
    return {"lr": lr.item(), "is_tensor": isinstance(opt.param_groups[0]["lr"], torch.Tensor)}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_tensor_lr(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(_check_tensor_lr, steps=4)
    expected = (torch.tensor(0.01) * 0.5**4).item()  # float32, like the tensor lr
    assert results == [{"lr": expected, "is_tensor": True}] * world_size


# ----------------------------------------------------------------------------------- extra keys


def _check_extra_keys(rank: int, world_size: int, *, steps: int) -> dict[str, Any]:
    model, ref, opt, _ = _models_and_optimizers("Adam", rank=rank)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 0.01], total_steps=steps + 1)
    swa_sched = SWALR(opt, swa_lr=0.005)
    for group in opt.param_groups:
        group["my_tag"] = "encoder"
        group["my_scale"] = 0.5
    keys = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr", "my_tag", "my_scale")
    for step in range(steps):
        _averaged_grads_(model, ref, step, rank, world_size)
        opt.step()
        sched.step()
        for where, groups in (("wrapper", opt.param_groups), ("local", opt.optim.param_groups)):
            for i, group in enumerate(groups):
                missing = [k for k in keys if k not in group]
                assert not missing, f"step {step}: {where} param_groups[{i}] lost {missing}"
    del swa_sched
    return {k: [g[k] for g in opt.param_groups] for k in keys}


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_scheduler_keys_survive_steps(pool_for: Any, world_size: int) -> None:
    results = pool_for(world_size).run(_check_extra_keys, steps=5)
    assert all(r == results[0] for r in results)
    assert results[0]["max_lr"] == [0.02, 0.01]
    assert results[0]["my_tag"] == ["encoder", "encoder"] and results[0]["swa_lr"] == [0.005, 0.005]


# ----------------------------------------------------------------------------------- cost


def _sync_once(groups: Any, comm: Any, *, mode: HparamSync) -> None:
    """Run one sync with a fresh HparamSyncer, as a caller that keeps no syncer would (every call agrees its size)."""
    HparamSyncer(comm, mode).sync_(groups)


def _check_broadcast_cost(rank: int, world_size: int, *, calls: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = _Net()
    opt = ShardedOptimizer(
        [{"params": model.a.parameters(), "weight_decay": 0.1}, {"params": model.b.parameters(), "lr": 1e-3}],
        torch.optim.AdamW,
        lr=1e-2,
    )
    lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=10)  # the extra keys a real run carries
    out: dict[str, float] = {"num_values": 0.0}
    for mode in ("broadcast", "check"):
        for _ in range(10):
            _sync_once(opt.param_groups, opt.placement.comm, mode=mode)  # type: ignore[arg-type]
        dist.barrier()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            _sync_once(opt.param_groups, opt.placement.comm, mode=mode)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t0)
        out[f"{mode}_median_ms"] = statistics.median(times) * 1e3
    from shardoptim.hparam_pack import pack_hparams

    packed, entries = pack_hparams(opt.param_groups)
    out["num_values"] = float(sum(n for *_, n in entries))
    out["packed_numel"] = float(packed.numel())
    return out


def test_broadcast_cost(ranks2: Any) -> None:
    results = ranks2.run(_check_broadcast_cost, calls=200)
    median_ms = max(r["broadcast_median_ms"] for r in results)
    check_ms = max(r["check_median_ms"] for r in results)
    print(
        f"\nhparam_sync cost, AdamW 2 groups ({results[0]['num_values']:.0f} values packed into "
        f"{results[0]['packed_numel']:.0f} float64), gloo, 2 ranks, median of 200 calls: "
        f"broadcast {median_ms:.3f} ms, check {check_ms:.3f} ms (per rank: "
        f"{[round(r['broadcast_median_ms'], 4) for r in results]})"
    )
    assert median_ms < 5.0, f"hyperparameter broadcast took {median_ms:.3f} ms (median)"


def _check_structure_differs(rank: int, world_size: int, *, mode: str, extra_groups: int) -> str:
    """One rank adds a key (or a scheduler adds many): every rank raises, none hangs or aborts."""
    params = [torch.nn.Parameter(torch.ones(70)) for _ in range(1 + extra_groups)]
    opt = ShardedOptimizer([{"params": [p]} for p in params], torch.optim.AdamW, lr=0.1, hparam_sync=mode)
    if rank == 1:
        if extra_groups:
            torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        else:
            opt.param_groups[0]["my_key"] = 1.0
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="differ in structure across ranks") as info:
        opt.step()
    return str(info.value)


@pytest.mark.parametrize("mode", ["broadcast", "check"])
@pytest.mark.parametrize("extra_groups", [0, 3])
def test_structure_mismatch_raises_everywhere(ranks2: Any, mode: str, extra_groups: int) -> None:
    messages = ranks2.run(_check_structure_differs, mode=mode, extra_groups=extra_groups)
    assert all("same param_group changes" in m for m in messages)


def _check_capacity_grows(rank: int, world_size: int) -> list[float]:
    params = [torch.nn.Parameter(torch.ones(70)) for _ in range(6)]
    opt = ShardedOptimizer([{"params": [p]} for p in params], torch.optim.AdamW, lr=0.1)
    start = opt._stepper.ctx.hparams.capacity
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)  # same on every rank
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert opt._stepper.ctx.hparams.capacity > start, "the packed vector should have outgrown its first size"
    return [g["lr"] for g in opt.param_groups]


def test_capacity_grows_consistently(ranks3: Any) -> None:
    results = ranks3.run(_check_capacity_grows)
    assert results[0] == results[1] == results[2]
