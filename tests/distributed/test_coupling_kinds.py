"""Classes that couple only under some conditions: exact or refused under the default policy, never silently different.

tests/_coupled.py has one class per kind of issue 21 (per tensor by structure, after a warm-up, by
magnitude; across tensors by magnitude). Each runs on the issue's model (a weight before a
LayerNorm, so its gradient is orthogonal to it), with a gradient spike mid-run and more steps than
the warm-up, at gradients x1 and x10, against the plain class on one process with the same full-batch
gradients, at world sizes 1, 2 and 3. The forced layouts that ignore a coupling must differ at 2
ranks, which shows the data triggers every coupling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shardoptim import ShardedOptimizer
from tests import _coupled
from tests._dist import RankPool, all_equal_across_ranks

RTOL = 1e-6
#: Forced layouts that each class's coupling breaks at 2 ranks (the data must trigger them).
BROKEN_BY: dict[str, str] = {
    "SGDPLike": "flat",
    "DelayedTrustRatio": "flat",
    "ClipPerTensor": "flat",
    "GlobalClip": "tensor",
}


def _run(name: str, scale: float, sharding: str) -> dict[str, Any]:
    cls, options = _coupled.COUPLED[name]
    ref = _coupled.model()
    _coupled.train(ref, cls(ref.parameters(), **options), scale=scale)
    net = _coupled.model()
    try:
        opt = ShardedOptimizer(net.parameters(), cls, sharding=sharding, **options)
    except (ValueError, TypeError, NotImplementedError) as err:
        return {"refused": str(err), "layout": None, "diff": None, "replicas_equal": True}
    _coupled.train(net, opt, scale=scale)
    import torch

    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    return {
        "refused": None,
        "layout": opt.sharding,
        "diff": _coupled.max_rel_diff(net, ref),
        "replicas_equal": all_equal_across_ranks(flat),
    }


def _check_default_policy(rank: int, world_size: int, *, forced: bool) -> dict[str, dict[str, Any]]:
    out = {}
    for name in _coupled.COUPLED:
        for scale in (1.0, 10.0):
            out[f"{name} x{scale:g}"] = _run(name, scale, "auto")
            if forced:
                out[f"{name} x{scale:g} {BROKEN_BY[name]}"] = _run(name, scale, BROKEN_BY[name])
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exact_or_refused(pool_for: Callable[[int], RankPool], world_size: int) -> None:
    results = pool_for(world_size).run(_check_default_policy, forced=world_size == 2)
    for rank, per_case in enumerate(results):
        for case, r in per_case.items():
            if case.count(" ") == 2:  # a forced layout: must show the coupling
                assert r["diff"] is not None and r["diff"] > RTOL, f"rank {rank} {case}: {r}"
                continue
            assert r["replicas_equal"], f"rank {rank} {case}: ranks hold different weights"
            if r["refused"] is None:
                assert r["diff"] <= RTOL, (
                    f"rank {rank} {case} ({r['layout']}): silently different by {r['diff']:.3g}"
                )
    layouts = {case: r["layout"] for case, r in results[0].items() if case.count(" ") == 1}
    assert layouts["GlobalClip x1"] == "replicated", layouts
    assert {layouts[f"{n} x1"] for n in ("SGDPLike", "DelayedTrustRatio", "ClipPerTensor")} == {"tensor"}, (
        layouts
    )


def _check_replicated_choice(rank: int, world_size: int) -> dict[str, Any]:
    return {name: _run(name, 10.0, "replicated") for name in ("GlobalClip", "SGDPLike")}


def test_replicated_as_a_user_choice(pool_for: Callable[[int], RankPool]) -> None:
    """sharding="replicated": the user says the class couples tensors; exact at 2 ranks."""
    for rank, per_case in enumerate(pool_for(2).run(_check_replicated_choice)):
        for name, r in per_case.items():
            assert r["layout"] == "replicated" and r["replicas_equal"], f"rank {rank} {name}: {r}"
            assert r["diff"] == 0.0, f"rank {rank} {name}: differs by {r['diff']:.3g}"
