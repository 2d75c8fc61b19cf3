"""Consolidated state_dict: base optimizer's format, plain torch.optim loads it, resharding N -> M."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer

OPTIONS: dict[str, dict[str, Any]] = {
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "Adafactor": dict(lr=1e-2),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
}


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 37), (37,), (5, 37), (3,), (300,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads_(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}]


def _flags(opt: ShardedOptimizer) -> dict[str, Any]:
    return {k: opt.param_groups[0][k] for k in ("fused", "foreach") if opt.param_groups[0].get(k) is not None}


def _check_save(rank: int, world_size: int, *, name: str, steps: int) -> dict[str, Any] | None:
    """Run `steps` sharded steps, consolidate on the last rank, check the format there."""
    params = _params()
    cls = getattr(torch.optim, name)
    opt = ShardedOptimizer(_groups(params), cls, **OPTIONS[name])
    for step in range(steps):
        _grads_(params, step)
        opt.step()
    if world_size > 1:
        with pytest.raises(RuntimeError, match="consolidate_state_dict"):
            opt.state_dict()
    to = world_size - 1
    opt.consolidate_state_dict(to=to)
    if rank != to:
        assert opt.state_dict() == {}  # what Lightning expects of a non-target rank; loads as a no-op
    sd = opt.state_dict() if rank == to else None
    _grads_(params, steps)
    opt.step()  # collective: every rank takes the step the reference below replays
    if sd is None:
        return None
    # A plain torch.optim optimizer built over the same parameters loads it and continues identically.
    ref_params = [p.detach().clone().requires_grad_() for p in _params()]
    ref = cls(_groups(ref_params), **OPTIONS[name], **_flags(opt))
    for step in range(steps):
        _grads_(ref_params, step)
        ref.step()
    if name != "Adafactor":
        assert {k: sorted(v) for k, v in sd["state"].items()} == {
            k: sorted(v) for k, v in ref.state_dict()["state"].items()
        }
    assert sorted(sd["state"]) == list(range(len(params)))
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1, 2], [3, 4]]
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and name != "Adafactor":
                assert value.shape == params[index].shape, (key, value.shape)
    fresh_params = [p.detach().clone().requires_grad_() for p in ref_params]
    fresh = cls(_groups(fresh_params), **OPTIONS[name], **_flags(opt))
    fresh.load_state_dict(copy.deepcopy(sd))
    assert all(g.get("fused") is None for g in sd["param_groups"]), "the wrapper's own kernel choice was saved"
    for group in fresh.param_groups:
        group.update(_flags(opt))  # the same kernel as the sharded run, for a bitwise comparison
    _grads_(fresh_params, steps)
    fresh.step()
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)
    return sd


def _check_resume(rank: int, world_size: int, *, name: str, sd: dict[str, Any], done: int, more: int) -> None:
    """Load a state_dict saved at another world size and match an uninterrupted unsharded run."""
    cls = getattr(torch.optim, name)
    params = _params()
    opt = ShardedOptimizer(_groups(params), cls, **OPTIONS[name])
    ref_params = _params()
    ref = cls(_groups(ref_params), **OPTIONS[name], **_flags(opt))
    for step in range(done):
        _grads_(ref_params, step)
        ref.step()
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            p.copy_(q)
    before = {k: {kk: vv.clone() if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()} for k, v in sd["state"].items()}
    opt.load_state_dict(sd)
    for step in range(done, done + more):
        _grads_(params, step)
        _grads_(ref_params, step)
        opt.step()
        ref.step()
        for p, q in zip(params, ref_params):
            assert torch.equal(p, q), f"{name} differs after resume at step {step}"
    for k, v in sd["state"].items():
        for kk, vv in v.items():
            if isinstance(vv, torch.Tensor):
                assert torch.equal(vv, before[k][kk]), "load_state_dict mutated the caller's dict"


@pytest.mark.parametrize(("save_at", "load_at"), [(3, 2), (2, 3), (4, 1), (1, 4)])
@pytest.mark.parametrize("name", ["AdamW", "SGD", "Adafactor"])
def test_reshard_round_trip(pool_for: Any, name: str, save_at: int, load_at: int) -> None:
    results = pool_for(save_at).run(_check_save, name=name, steps=3)
    sd = results[save_at - 1]
    pool_for(load_at).run(_check_resume, name=name, sd=sd, done=3, more=3)


def test_adagrad_consolidates(ranks2: Any) -> None:
    ranks2.run(_check_save, name="Adagrad", steps=2)


def _check_load_plain_single_gpu_run(rank: int, world_size: int) -> None:
    """Resume a plain torch.optim run (one process) on N ranks."""
    ref_params = _params()
    ref = torch.optim.AdamW(_groups(ref_params), lr=1e-2, fused=True)
    for step in range(2):
        _grads_(ref_params, step)
        ref.step()
    params = [p.detach().clone().requires_grad_() for p in ref_params]
    opt = ShardedOptimizer(_groups(params), torch.optim.AdamW, lr=1e-2)
    opt.load_state_dict(ref.state_dict())
    for step in range(2, 5):
        _grads_(params, step)
        _grads_(ref_params, step)
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params))


def test_load_plain_torch_state_dict(ranks3: Any) -> None:
    ranks3.run(_check_load_plain_single_gpu_run)


def _check_load_errors(rank: int, world_size: int) -> None:
    params = _params()
    opt = ShardedOptimizer(_groups(params), torch.optim.AdamW, lr=1e-2)
    _grads_(params, 0)
    opt.step()
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict() if rank == 0 else None
    sd = _broadcast_obj(sd)
    with pytest.raises(ValueError, match="2 param groups but this optimizer has 1"):
        ShardedOptimizer(_params(), torch.optim.AdamW, lr=1e-2).load_state_dict(sd)
    other = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(5)]
    with pytest.raises(ValueError, match="from another model"):
        ShardedOptimizer(_groups(other), torch.optim.AdamW, lr=1e-2).load_state_dict(sd)
    copies = [p.detach().clone().requires_grad_() for p in params]
    with pytest.raises(ValueError, match="param group 0: state_dict has 3 parameters, this optimizer 2"):
        ShardedOptimizer([{"params": copies[:2]}, {"params": copies[3:]}], torch.optim.AdamW).load_state_dict(sd)
    sgd = torch.optim.SGD(_groups([p.detach().clone().requires_grad_() for p in params]), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="different optimizer class"):
        opt.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"params": []})
    # Still usable after the rejected loads.
    _grads_(params, 1)
    opt.step()


def _broadcast_obj(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def test_load_errors(ranks2: Any) -> None:
    ranks2.run(_check_load_errors)
