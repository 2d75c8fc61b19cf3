"""Every class of shardoptim.allowlist: flat and exact against the plain class on adversarial data.

Adversarial: the issue's model (a weight before a LayerNorm, so its gradient is orthogonal to it),
more steps than a warm-up (schedule-free classes get warmup_steps=3), a gradient spike of 1e4 mid-run,
gradients x1 and x10, at 2 and 3 ranks; schedule-free classes go through train() and eval(). The
sharded run must be flat (the allowlist's point) and within 1e-6 of the plain class on one process.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer
from shardoptim.allowlist import ALLOWLIST, allowlisted
from tests import _coupled
from tests._dist import RankPool, all_equal_across_ranks

RTOL = 1e-6
_INSTALLED = []
for _entry in ALLOWLIST:
    try:
        importlib.import_module(_entry.module)
        _INSTALLED.append(f"{_entry.module}:{_entry.name}")
    except ImportError:
        pass


def _options(cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    if not cls.__module__.startswith("schedulefree"):
        return {"lr": 1e-3, "weight_decay": 0.1}
    takes_warmup = "warmup_steps" in inspect.signature(cls.__init__).parameters  # not RAdamScheduleFree
    return {"lr": 1e-2, "weight_decay": 0.1, **({"warmup_steps": 3} if takes_warmup else {})}


def _modes(opt: Any) -> Any:
    return opt if callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None)) else None


def _train(net: torch.nn.Module, opt: Any, scale: float) -> None:
    target = _modes(opt)
    if target is not None:
        target.train()
    _coupled.train(net, opt, scale=scale)
    if target is not None:
        target.eval()


def _check_allowlisted(rank: int, world_size: int, *, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        module, attr = name.split(":")
        cls = getattr(importlib.import_module(module), attr)
        for scale in (1.0, 10.0):
            ref = _coupled.model()
            _train(ref, cls(ref.parameters(), **_options(cls)), scale)
            net = _coupled.model()
            opt = ShardedOptimizer(net.parameters(), cls, **_options(cls))
            _train(net, opt, scale)
            flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
            out[f"{attr} x{scale:g}"] = {
                "allowlisted": allowlisted(cls) is not None,
                "layout": opt.sharding,
                "diff": _coupled.max_rel_diff(net, ref),
                "replicas_equal": all_equal_across_ranks(flat),
            }
    return out


@pytest.mark.skipif(not _INSTALLED, reason="no allowlisted package installed")
@pytest.mark.parametrize("world_size", [2, 3])
def test_allowlisted_classes_flat_and_exact(pool_for: Callable[[int], RankPool], world_size: int) -> None:
    results = pool_for(world_size).run(_check_allowlisted, names=_INSTALLED)
    for rank, per_case in enumerate(results):
        for case, r in per_case.items():
            assert r["allowlisted"], f"{case}: installed version outside the allowlist's range"
            assert r["layout"] == "flat", f"{case}: {r}"
            assert r["replicas_equal"], f"rank {rank} {case}: ranks hold different weights"
            assert r["diff"] <= RTOL, f"rank {rank} {case}: differs from the plain class by {r['diff']:.3g}"
