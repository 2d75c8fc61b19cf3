"""The rank side of shardoptim.verify: train the plain and the sharded copy side by side, compare, merge.

Runs in the processes shardoptim.verify spawns (one per rank, gloo). Rank 0 writes the merged
result as JSON into the run's folder; a failing rank writes its traceback there. Must not import
tests/.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch

__all__ = ["LAYOUT_ORDER", "LBFGS_RTOL", "Spec", "Verdict", "rank_main", "resolve"]

Verdict = Literal["exact", "within tolerance", "different", "refused"]
#: The sharded LBFGS sums its dot products in another order than torch's: up to about 1e-3
#: relative in float32 after 100 inner iterations (README, "Which optimizers, and how").
LBFGS_RTOL = 2e-3
#: Layouts from the least to the most restrictive.
LAYOUT_ORDER = ("flat", "tensor", "replicated")


def resolve(obj: Any) -> Any:
    """Return `obj`, or the attribute a "module:attribute" string names."""
    if not isinstance(obj, str):
        return obj
    module, sep, attr = obj.partition(":")
    if not sep or not module or not attr:
        raise ValueError(
            f"expected 'module:attribute', got {obj!r}; e.g. 'timm.optim:SGDP' or 'mymodels:build'"
        )
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


@dataclass(slots=True)
class Spec:
    """Everything a rank needs (picklable)."""

    optimizer_class: Any
    model_fn: Any
    loss_fn: Any
    steps: int
    sharding: str
    kwargs: dict[str, Any]
    rtol: float
    closure: bool
    seed: int
    timeout_s: float
    out_dir: str


def rank_main(rank: int, world_size: int, spec: Spec) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        store = dist.FileStore(  # type: ignore[attr-defined]  # public, not in the stubs
            os.path.join(spec.out_dir, "store"), world_size
        )
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=spec.timeout_s)
        )
        try:
            runs = _compare_layouts(spec, rank, world_size)
            if rank == 0:
                with open(os.path.join(spec.out_dir, "result.json"), "w", encoding="utf-8") as f:
                    json.dump({"runs": runs}, f)
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(spec.out_dir, f"rank{rank}.err"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        raise


def _compare_layouts(spec: Spec, rank: int, world_size: int) -> list[dict[str, Any]]:
    """Run the requested sharding, then more restrictive layouts until one matches. Collective."""
    import torch.distributed as dist

    runs: list[dict[str, Any]] = []
    sharding = spec.sharding
    while True:
        mine = _compare_one(spec, sharding)
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, mine)
        merged = _merge(everyone)
        runs.append(merged)
        layout = merged["layout"]
        if merged["verdict"] in ("exact", "within tolerance") or layout == "lbfgs":
            return runs
        start = LAYOUT_ORDER.index(layout) + 1 if layout in LAYOUT_ORDER else 1
        tried = {r["layout"] for r in runs}
        nxt = [k for k in LAYOUT_ORDER[start:] if k not in tried]
        if not nxt:
            return runs
        sharding = nxt[0]


def _merge(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst over the ranks, per parameter; the verdict from the merged numbers."""
    first = per_rank[0]
    if first["verdict"] == "refused":
        return first
    params = []
    for i, p in enumerate(first["params"]):
        diffs = [r["params"][i]["max_rel_diff"] for r in per_rank]
        steps = [r["params"][i]["first_step"] for r in per_rank if r["params"][i]["first_step"] is not None]
        worst = max(diffs)
        params.append(
            {
                **p,
                "max_rel_diff": worst,
                "first_step": min(steps) if steps else None,
                "verdict": _verdict(worst, bool(steps), first["tolerance"]),
            }
        )
    return _summarise(first["sharding"], first["layout"], params, first["tolerance"], first["note"])


def _verdict(diff: float, differed: bool, tol: float) -> Verdict:
    if not differed:
        return "exact"
    return "within tolerance" if diff <= tol else "different"


def _summarise(
    sharding: str, layout: str, params: list[dict[str, Any]], tol: float, note: str
) -> dict[str, Any]:
    differed = [p for p in params if p["first_step"] is not None]
    first = min(differed, key=lambda p: p["first_step"]) if differed else None
    worst = max((p["max_rel_diff"] for p in params), default=0.0)
    return {
        "sharding": sharding,
        "layout": layout,
        "verdict": _verdict(worst, bool(differed), tol),
        "max_rel_diff": worst,
        "first_step": first["first_step"] if first else None,
        "first_param": first["name"] if first else None,
        "params": params,
        "note": note,
        "tolerance": tol,
    }


def _modes(opt: Any) -> Any:
    return opt if callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None)) else None


def _compare_one(spec: Spec, sharding: str) -> dict[str, Any]:
    """Train the plain and the sharded copy side by side on this rank. Collective (the sharded copy)."""
    from shardoptim.optimizer import ShardedOptimizer

    cls, model_fn, loss_fn = (resolve(x) for x in (spec.optimizer_class, spec.model_fn, spec.loss_fn))
    torch.manual_seed(spec.seed)
    ref = model_fn()
    torch.manual_seed(spec.seed)
    net = model_fn()
    names = [name for name, _ in ref.named_parameters()]
    try:
        opt = ShardedOptimizer(net.parameters(), cls, sharding=sharding, **spec.kwargs)
    except (ValueError, TypeError, NotImplementedError) as err:
        return {
            "sharding": sharding,
            "layout": "-",
            "verdict": "refused",
            "max_rel_diff": math.inf,
            "first_step": None,
            "first_param": None,
            "params": [],
            "note": f"{type(err).__name__}: {err}",
            "tolerance": spec.rtol,
        }
    ref_opt = cls(ref.parameters(), **spec.kwargs)  # as the user builds it (no injected fused/foreach)
    layout = str(opt.sharding)
    tol = max(spec.rtol, LBFGS_RTOL) if layout == "lbfgs" else spec.rtol
    note = opt.probe_verdict.reason if opt.probe_verdict is not None else ""
    diffs = [0.0] * len(names)
    first: list[int | None] = [None] * len(names)
    for target in (_modes(ref_opt), _modes(opt)):
        if target is not None:
            target.train()
    for step in range(1, spec.steps + 1):
        _step_both(spec, ref, ref_opt, net, opt, loss_fn, last=step == spec.steps)
        for i, (a, b) in enumerate(zip(net.parameters(), ref.parameters())):
            a64, b64 = a.detach().double(), b.detach().double()
            if torch.equal(a64, b64):
                continue
            first[i] = step if first[i] is None else first[i]
            scale = max(float(b64.abs().max()), 1e-12)
            diff = float((a64 - b64).abs().nan_to_num(nan=math.inf).max()) / scale
            diffs[i] = max(diffs[i], diff)
    params = [
        {
            "name": name,
            "shape": list(p.shape),
            "max_rel_diff": d,
            "first_step": f,
            "verdict": _verdict(d, f is not None, tol),
        }
        for name, p, d, f in zip(names, ref.parameters(), diffs, first)
    ]
    return _summarise(sharding, layout, params, tol, note)


def _step_both(
    spec: Spec,
    ref: torch.nn.Module,
    ref_opt: Any,
    net: torch.nn.Module,
    opt: Any,
    loss_fn: Any,
    *,
    last: bool,
) -> None:
    """One step of each copy: the plain copy's gradients given to both, or a closure on each."""
    if spec.closure:
        for model, optimizer in ((ref, ref_opt), (net, opt)):

            def closure(model: torch.nn.Module = model, optimizer: Any = optimizer) -> torch.Tensor:
                with torch.enable_grad():
                    optimizer.zero_grad()
                    loss = loss_fn(model)
                    loss.backward()
                return loss  # type: ignore[no-any-return]

            optimizer.step(closure)
    else:
        ref_opt.zero_grad()
        opt.zero_grad()
        loss_fn(ref).backward()
        for a, b in zip(net.parameters(), ref.parameters()):
            a.grad = None if b.grad is None else b.grad.detach().clone()
        ref_opt.step()
        opt.step()
    if last:
        for target in (_modes(ref_opt), _modes(opt)):
            if target is not None:
                target.eval()
