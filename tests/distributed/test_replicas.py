"""verify_replicas: detects a diverged parameter or option, names it, raises on every rank."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer
from shardoptim.replicas import checksum


def test_checksum_sees_every_bit() -> None:
    t = torch.randn(3000)
    base = checksum(t)
    assert checksum(t.clone()) == base
    u = t.clone()
    u[1234] = torch.nextafter(u[1234], torch.tensor(1e9))
    assert checksum(u) != base
    swapped = t.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checksum(swapped) != base or torch.equal(t[0], t[1])
    assert checksum(torch.zeros(0)) == 0
    assert checksum(torch.ones(5, dtype=torch.bfloat16)) == checksum(torch.ones(5, dtype=torch.bfloat16))


def _check_diverged(rank: int, world_size: int, *, what: str) -> str:
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Linear(30, 4))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    opt = ShardedOptimizer(model.named_parameters(), torch.optim.SGD, lr=0.1, hparam_sync="off")
    opt.verify_replicas()  # identical so far
    if rank == world_size - 1:
        with torch.no_grad():
            if what == "param":
                model[1].weight[2, 3] += 1e-6
            else:
                opt.param_groups[0]["lr"] = 0.2
    with pytest.raises(RuntimeError) as info:
        opt.verify_replicas()
    return str(info.value)


@pytest.mark.parametrize("what", ["param", "option"])
def test_verify_replicas_names_the_difference(ranks3: Any, what: str) -> None:
    messages = ranks3.run(_check_diverged, what=what)
    for message in messages:
        if what == "param":
            assert "parameter 2 (1.weight), shape (4, 30), differs between rank 0 and ranks [2]" in message
        else:
            assert "options differ across ranks" in message


def _check_every_n(rank: int, world_size: int, *, name: str) -> int:
    params = [torch.nn.Parameter(torch.ones(100))]
    cls = getattr(torch.optim, name)
    opt = ShardedOptimizer(params, cls, lr=0.1, verify_every=2)
    calls = 0
    real = opt.verify_replicas

    def counting() -> None:
        nonlocal calls
        calls += 1
        real()

    opt.verify_replicas = counting  # type: ignore[method-assign]
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (params[0] - 3.0).square().sum()
        loss.backward()
        return loss

    for _ in range(5):
        if name == "LBFGS":
            opt.step(closure)
        else:
            params[0].grad = torch.ones(100)
            opt.step()
    return calls


@pytest.mark.parametrize("name", ["SGD", "LBFGS"])
def test_verify_every(ranks2: Any, name: str) -> None:
    assert ranks2.run(_check_every_n, name=name) == [2, 2]
