"""Sharded checkpoints: save at N ranks, load at M, continue bitwise; atomic writes; clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardoptim import ShardedOptimizer, checkpoint, checkpoint_load, checkpoint_save
from tests._dist import RankPool, run_ranks

OPTIONS: dict[str, dict[str, Any]] = {
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "SGD": dict(lr=0.05, momentum=0.9),
    "Adafactor": dict(lr=1e-2),
}


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(50, 13, generator=gen))
        self.w = torch.nn.Parameter(torch.randn(13, 29, generator=gen))
        self.b = torch.nn.Parameter(torch.randn(29, generator=gen))
        self.register_buffer("count", torch.zeros(1))


def _groups(model: _Net) -> list[dict[str, Any]]:
    return [{"params": [model.emb, model.w]}, {"params": [model.b], "lr": 3e-3}]


def _grads_(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(500 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _flags(opt: ShardedOptimizer) -> dict[str, Any]:
    return {k: opt.param_groups[0][k] for k in ("fused", "foreach") if opt.param_groups[0].get(k) is not None}


def _check_save(rank: int, world_size: int, *, name: str, path: str, steps: int, sharding: str = "auto") -> None:
    model = _Net()
    opt = ShardedOptimizer(_groups(model), getattr(torch.optim, name), sharding=sharding, **OPTIONS[name])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(steps):
        _grads_(model, step)
        opt.step()
        sched.step()
    model.count += steps
    checkpoint.save(path, opt, model=model, extra={"sched": sched, "epoch": steps, "note": "hi"})


def _check_load(
    rank: int, world_size: int, *, name: str, path: str, done: int, more: int, sharding: str = "auto"
) -> None:
    model = _Net()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the checkpoint must restore the model too
    opt = ShardedOptimizer(_groups(model), getattr(torch.optim, name), sharding=sharding, **OPTIONS[name])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    extras = checkpoint.load(path, opt, model=model, extra={"sched": sched})
    assert extras["epoch"] == done and extras["note"] == "hi"
    assert sched.last_epoch == done and model.count.item() == done
    ref_model = _Net()
    ref = getattr(torch.optim, name)(_groups(ref_model), **OPTIONS[name], **_flags(opt))
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for step in range(done + more):
        _grads_(ref_model, step)
        ref.step()
        ref_sched.step()
        if step >= done:
            _grads_(model, step)
            opt.step()
            sched.step()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                assert torch.equal(p, q), f"{name}: differs from the uninterrupted run at step {step}"
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


@pytest.mark.parametrize(("save_at", "load_at"), [(3, 2), (2, 3), (4, 1), (1, 4)])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adafactor"])
def test_save_at_n_load_at_m(pool_for: Any, tmp_path: Path, name: str, save_at: int, load_at: int) -> None:
    path = str(tmp_path / "ckpt")
    pool_for(save_at).run(_check_save, name=name, path=path, steps=3)
    assert (Path(path) / "COMPLETE").exists() and not Path(path + ".partial").exists()
    pool_for(load_at).run(_check_load, name=name, path=path, done=3, more=3)


def test_layout_change_flat_to_tensor(ranks2: RankPool, ranks3: RankPool, tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    ranks2.run(_check_save, name="AdamW", path=path, steps=2, sharding="flat")
    ranks3.run(_check_load, name="AdamW", path=path, done=2, more=2, sharding="tensor")
    ranks3.run(_check_save, name="AdamW", path=path, steps=2, sharding="tensor")
    ranks2.run(_check_load, name="AdamW", path=path, done=2, more=2, sharding="flat")


def test_offline_consolidation_loads_into_plain_torch(ranks3: RankPool, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    ranks3.run(_check_save, name="AdamW", path=str(path), steps=3)
    out = tmp_path / "full.pt"
    assert checkpoint._main(["consolidate", str(path), str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    model = _Net()
    ref_model = _Net()
    plain = torch.optim.AdamW(_groups(model), **OPTIONS["AdamW"], fused=True)
    ref = torch.optim.AdamW(_groups(ref_model), **OPTIONS["AdamW"], fused=True)
    sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for step in range(3):
        _grads_(ref_model, step)
        ref.step()
        sched.step()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.copy_(q)
    plain.load_state_dict(sd)
    assert plain.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    _grads_(model, 3)
    _grads_(ref_model, 3)
    plain.step()
    ref.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def _check_crash_mid_save(rank: int, world_size: int, *, path: str) -> None:
    model = _Net()
    opt = ShardedOptimizer(_groups(model), torch.optim.AdamW, **OPTIONS["AdamW"])
    _grads_(model, 0)
    opt.step()
    real_save = checkpoint_save.dcp_save

    def dying_save(*args: Any, **kwargs: Any) -> Any:
        if rank == 1:
            os._exit(17)  # a writer dies in the middle of the save
        return real_save(*args, **kwargs)

    checkpoint_save.dcp_save = dying_save  # type: ignore[assignment]
    checkpoint.save(path, opt, model=model)


def test_crash_mid_save_keeps_previous(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    with RankPool(3, timeout_s=60) as pool:
        pool.run(_check_save, name="AdamW", path=path, steps=2)
        with pytest.raises((RuntimeError, AssertionError, TimeoutError)):
            pool.run(_check_crash_mid_save, path=path)
        pool.run(_check_load, name="AdamW", path=path, done=2, more=2)
    Path(path + "_x.partial").mkdir()
    with pytest.raises(FileNotFoundError, match="interrupted save"):
        checkpoint_load.resolve(path + "_x")
    Path(path + ".partial").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint_load.resolve(path + ".partial")


def _check_errors(rank: int, world_size: int, *, path: str, bad: str) -> None:
    model = _Net()
    if bad == "class":
        opt = ShardedOptimizer(_groups(model), torch.optim.SGD, lr=0.1)
        with pytest.raises(ValueError, match="holds AdamW state, but this optimizer is SGD"):
            checkpoint.load(path, opt, model=model)
    elif bad == "model":
        other = torch.nn.Linear(3, 4)
        opt = ShardedOptimizer(other.parameters(), torch.optim.AdamW, lr=0.1)
        with pytest.raises(ValueError, match="of another model"):
            checkpoint.load(path, opt, model=other)
    elif bad == "corrupt":
        opt = ShardedOptimizer(_groups(model), torch.optim.AdamW, lr=0.1)
        with pytest.raises(ValueError, match="corrupt or truncated"):
            checkpoint.load(path, opt, model=model)
    dist.barrier()


def test_load_errors(ranks2: RankPool, tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    ranks2.run(_check_save, name="AdamW", path=path, steps=1)
    ranks2.run(_check_errors, path=path, bad="class")
    ranks2.run(_check_errors, path=path, bad="model")
    for file in Path(path).glob("*.distcp"):
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
    ranks2.run(_check_errors, path=path, bad="corrupt")


def test_newer_format_rejected(tmp_path: Path) -> None:
    run_ranks(_check_save, 1, name="SGD", path=str(tmp_path / "c"), steps=1)
    old = checkpoint_load.FORMAT_VERSION
    try:
        checkpoint_load.FORMAT_VERSION = 0
        with pytest.raises(ValueError, match="newer than this shardoptim reads"):
            checkpoint.consolidate_dir(tmp_path / "c")
    finally:
        checkpoint_load.FORMAT_VERSION = old
