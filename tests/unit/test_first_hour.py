"""Silent misuse in the first hour gets a clear message (issue 15): one process, no process group."""

from __future__ import annotations

import warnings

import pytest
import torch

import shardoptim.groupinfo
from shardoptim import ShardedOptimizer


def _params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(5, 3).parameters())


def test_world_size_without_process_group_warns_once_at_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(shardoptim.groupinfo, "_warned_unsharded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ShardedOptimizer(_params(), torch.optim.AdamW, lr=1e-3)
        ShardedOptimizer(_params(), torch.optim.AdamW, lr=1e-3)  # once per process, not per optimizer
    mine = [w for w in caught if "WORLD_SIZE" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    message = str(mine[0].message)
    assert "WORLD_SIZE=4 is set but torch.distributed is not initialised" in message
    assert "not sharded" in message and "shardoptim.init_distributed()" in message
    assert mine[0].filename == __file__  # points at the user's ShardedOptimizer(...) line
    assert opt.placement.comm.world_size == 1  # and it did run unsharded


@pytest.mark.parametrize("value", [None, "1", "", "x"])
def test_no_warning_without_a_multi_process_launch(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", value)
    monkeypatch.setattr(shardoptim.groupinfo, "_warned_unsharded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ShardedOptimizer(_params(), torch.optim.SGD, lr=0.1)
    assert not [w for w in caught if "WORLD_SIZE" in str(w.message)]


def test_optimizer_instance_is_named_without_its_repr() -> None:
    params = _params()
    instance = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.1)
    with pytest.raises(TypeError) as info:
        ShardedOptimizer(params, instance, lr=3e-4)  # type: ignore[arg-type]
    message = str(info.value)
    assert "got an instance of AdamW" in message
    assert "pass the class itself: ShardedOptimizer(params, torch.optim.AdamW, lr=...)" in message
    assert "weight_decay" not in message and "Parameter Group" not in message  # no repr dump
    assert len(message) < 250


def test_non_optimizer_class_is_named() -> None:
    with pytest.raises(
        TypeError, match=r"got the class Linear; pass an optimizer class, e\.g\. ShardedOptimizer"
    ):
        ShardedOptimizer(_params(), torch.nn.Linear, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got the string 'AdamW'"):
        ShardedOptimizer(_params(), "AdamW", lr=0.1)  # type: ignore[arg-type]
