"""Third-party optimizers that break naive sharding, each exact against its unsharded self at 2 ranks.

One class per cause seen in benchmarks/catalog_sweep.py (the full sweep over the public catalogs):

- values written into param_groups during step() (D-Adaptation's and Prodigy's d): they must flow
  back into opt.param_groups, the same on every rank;
- train()/eval() (schedule-free AdamW), with a checkpoint round trip in the middle;
- a statistic over all tensors (pytorch_optimizer's Adai: a mean over every parameter);
- random numbers in the update (pytorch_optimizer's Gravity): drawn from rank 0's generator on
  every rank, which then stands where the unsharded run leaves it;
- a closure the class requires (pytorch_optimizer's AliG);
- a Hessian from backward(create_graph=True) read through requires_grad (AdaHessian): exact or
  refused with a message naming the class;
- an elementwise third-party class (lion_pytorch.Lion), flat by the allowlist (shardoptim.allowlist).

Every rank computes the same full-batch gradients (what DDP's averaged gradients are), so the
reference is the plain class on one process, seeded the same, computed inside each rank. "Exact"
means a relative difference of at most 1e-6, as in the sweep.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardoptim import ShardedOptimizer
from tests._dist import all_equal_across_ranks

STEPS = 5
RTOL = 1e-6

# name -> (class as "module:attr", options, training mode: "plain", "closure" or "create_graph")
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "DAdaptAdam": ("dadaptation:DAdaptAdam", {}, "plain"),
    "Prodigy": ("prodigyopt:Prodigy", {}, "plain"),
    "AdamWScheduleFree": ("schedulefree:AdamWScheduleFree", {"lr": 1e-2}, "plain"),
    "Adai": ("pytorch_optimizer:Adai", {}, "plain"),
    "Gravity": ("pytorch_optimizer:Gravity", {}, "plain"),
    "AliG": ("pytorch_optimizer:AliG", {}, "closure"),
    "AdaHessian": ("pytorch_optimizer:AdaHessian", {}, "create_graph"),
    "Lion": ("lion_pytorch:Lion", {}, "plain"),
}
#: Keys the class writes into its param_groups during step(); they must reach opt.param_groups.
GROUP_KEYS: dict[str, tuple[str, ...]] = {"DAdaptAdam": ("d",), "Prodigy": ("d", "d_max")}


def _class(path: str) -> type[torch.optim.Optimizer]:
    module, attr = path.split(":")
    cls: type[torch.optim.Optimizer] = getattr(importlib.import_module(module), attr)
    return cls


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )


def _train(model: torch.nn.Module, opt: Any, *, mode: str, scale: float, steps: int) -> None:
    """`steps` steps on one fixed full batch (the same on every rank)."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)

    def closure() -> torch.Tensor:
        with torch.enable_grad():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean() * scale
            loss.backward(create_graph=mode == "create_graph")
        return loss

    for _ in range(steps):
        if mode == "closure":
            opt.step(closure)
        else:
            closure()
            opt.step()


def _max_rel_diff(model: torch.nn.Module, ref: torch.nn.Module) -> float:
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        scale = max(float(q.detach().abs().max()), 1e-12)
        worst = max(worst, float((p.detach() - q.detach()).abs().max()) / scale)
    return worst


def _params_equal_across_ranks(model: torch.nn.Module) -> bool:
    return all_equal_across_ranks(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))


def _check_matches_plain(rank: int, world_size: int, *, name: str, scale: float) -> dict[str, Any]:
    path, options, mode = CASES[name]
    cls = _class(path)
    ref = _model()
    torch.manual_seed(1)
    ref_opt = cls(ref.parameters(), **options)
    _train(ref, ref_opt, mode=mode, scale=scale, steps=STEPS)
    ref_rng = torch.get_rng_state()

    model = _model()
    torch.manual_seed(1)
    try:
        opt = ShardedOptimizer(model.parameters(), cls, **options)
    except (ValueError, TypeError, NotImplementedError) as err:
        return {"refused": str(err), "layout": None}
    built_rng = torch.get_rng_state()
    _train(model, opt, mode=mode, scale=scale, steps=STEPS)
    groups = {
        key: (float(opt.param_groups[0][key]), float(ref_opt.param_groups[0][key]))
        for key in GROUP_KEYS.get(name, ())
    }
    return {
        "refused": None,
        "layout": opt.sharding,
        "diff": _max_rel_diff(model, ref),
        "replicas_equal": _params_equal_across_ranks(model),
        "groups": groups,
        "rng_as_unsharded": bool(torch.equal(torch.get_rng_state(), ref_rng)),
        "rng_untouched": bool(torch.equal(torch.get_rng_state(), built_rng)),
    }


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("name", ["DAdaptAdam", "Prodigy", "Adai", "Gravity", "AliG", "Lion"])
def test_exact_at_two_ranks(ranks2: Any, name: str, scale: float) -> None:
    results = ranks2.run(_check_matches_plain, name=name, scale=scale)
    first = results[0]
    assert first["refused"] is None, f"{name} was refused: {first['refused']}"
    assert first["replicas_equal"], f"{name}: ranks hold different weights"
    assert first["diff"] <= RTOL, (
        f"{name} ({first['layout']}) differs from the unsharded class by {first['diff']:.3g}"
    )
    for key, (got, want) in first["groups"].items():
        assert got == want, f"{name}: opt.param_groups[0][{key!r}] is {got}, the unsharded class has {want}"
    assert all(r["groups"] == first["groups"] for r in results), "group values differ across ranks"
    # NOTE: the update draws with rank 0's generator on every rank; afterwards rank 0's generator
    # is where the unsharded run leaves it, and the others' streams (dropout, ...) are untouched.
    assert first["rng_as_unsharded"], f"{name}: rank 0's generator is not where the unsharded run leaves it"
    assert all(r["rng_untouched"] or r["rng_as_unsharded"] for r in results[1:]), (
        f"{name}: the optimizer moved another rank's generator"
    )


def test_elementwise_third_party_class_is_sharded_flat(ranks2: Any) -> None:
    results = ranks2.run(_check_matches_plain, name="Lion", scale=1.0)
    assert results[0]["layout"] == "flat", "lion_pytorch.Lion is on the allowlist (shardoptim.allowlist)"


def test_rng_class_is_not_sharded_flat(ranks2: Any) -> None:
    results = ranks2.run(_check_matches_plain, name="Gravity", scale=1.0)
    assert results[0]["refused"] is None
    assert results[0]["layout"] != "flat"


def test_hessian_class_exact_or_refused(ranks2: Any) -> None:
    results = ranks2.run(_check_matches_plain, name="AdaHessian", scale=1.0)
    first = results[0]
    if first["refused"] is not None:
        assert "AdaHessian" in first["refused"], f"the refusal does not name the class: {first['refused']}"
        return
    assert first["replicas_equal"]
    assert first["diff"] <= RTOL, f"AdaHessian ({first['layout']}) differs by {first['diff']:.3g}"


def _check_schedule_free_round_trip(rank: int, world_size: int) -> dict[str, Any]:
    """train(), 3 steps, eval(); checkpoint; train(), 2 steps, eval() - sharded and plain alike.

    The consolidated checkpoint is also loaded into a fresh ShardedOptimizer and, on rank 0, into
    the plain class; both continue exactly as the uninterrupted unsharded run.
    """
    path, options, mode = CASES["AdamWScheduleFree"]
    cls = _class(path)

    def phase(model: torch.nn.Module, opt: Any, steps: int) -> None:
        opt.train()
        _train(model, opt, mode=mode, scale=1.0, steps=steps)
        opt.eval()

    ref = _model()
    ref_opt = cls(ref.parameters(), **options)
    phase(ref, ref_opt, 3)
    ref_mid = [p.detach().clone() for p in ref.parameters()]
    phase(ref, ref_opt, 2)

    model = _model()
    opt = ShardedOptimizer(model.parameters(), cls, **options)
    phase(model, opt, 3)
    out: dict[str, Any] = {"layout": opt.sharding}
    out["mid_diff"] = max(
        float((p.detach() - q).abs().max()) / max(float(q.abs().max()), 1e-12)
        for p, q in zip(model.parameters(), ref_mid)
    )
    opt.consolidate_state_dict(to=0)
    box = [opt.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    saved = box[0]
    assert saved is not None

    resumed = _model()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = ShardedOptimizer(resumed.parameters(), cls, **options)
    resumed_opt.load_state_dict(saved)
    phase(resumed, resumed_opt, 2)
    out["resumed_diff"] = _max_rel_diff(resumed, ref)
    out["replicas_equal"] = _params_equal_across_ranks(resumed)

    if rank == 0:
        plain = _model()
        plain.load_state_dict(model.state_dict())
        plain_opt = cls(plain.parameters(), **options)
        plain_opt.load_state_dict(saved)
        phase(plain, plain_opt, 2)
        out["plain_diff"] = _max_rel_diff(plain, ref)
    return out


def test_schedule_free_train_eval_and_checkpoint(ranks2: Any) -> None:
    results = ranks2.run(_check_schedule_free_round_trip)
    first = results[0]
    assert first["mid_diff"] <= RTOL, f"after 3 steps and eval(): differs by {first['mid_diff']:.3g}"
    assert first["replicas_equal"], "ranks hold different weights after resuming"
    assert first["resumed_diff"] <= RTOL, f"resumed ShardedOptimizer differs by {first['resumed_diff']:.3g}"
    assert first["plain_diff"] <= RTOL, (
        f"plain class resumed from the checkpoint differs by {first['plain_diff']:.3g}"
    )
    assert first["layout"] == "flat", "AdamWScheduleFree is on the allowlist (shardoptim.allowlist)"
