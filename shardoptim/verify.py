"""Check an optimizer class on the user's own model: the sharded run against the plain class, per parameter.

`verify(optimizer_class, model_fn, loss_fn, steps=5, world_size=2, sharding="auto", **kwargs)`
spawns `world_size` CPU ranks (gloo, a FileStore in a temporary folder, spawn start method, every
wait under `timeout_s`). Each rank builds the model twice from `model_fn()` (seeded alike): one
copy for the plain `optimizer_class(**kwargs)` on its own, one for
`ShardedOptimizer(..., optimizer_class, sharding=..., **kwargs)`. At every step the loss of the
plain copy gives the gradients, and the sharded copy gets the same gradients (what DDP's
averaged gradients are), so a difference is the optimizer's, not the data's; with `closure=True`
each copy evaluates `loss_fn` on itself inside a closure instead (classes that need one: LBFGS).
The plain class is built as the user builds it (`optimizer_class(params, **kwargs)`), so a
difference from an implementation flag the wrapper picks (fused/foreach) shows too.

Per parameter it records the largest relative difference max|sharded - plain| / max|plain| over
steps and ranks, and the first step where it was not bitwise equal. Verdict: "exact" (bitwise),
"within tolerance" (<= rtol; the sharded LBFGS <= LBFGS_RTOL, its documented float32 tolerance),
"different", or "refused" (the wrapper raised at construction). When the requested layout is not
exact or within tolerance, the more restrictive layouts are tried (flat -> tensor -> replicated)
and the least restrictive one that is becomes `recommended`. The console script
`shardoptim-verify` (shardoptim.verify_cli) prints `VerifyResult.report()`.

A run on one model and a few steps shows a difference when one exists there; it cannot prove that
none exists elsewhere (another model, step count, gradient scale). Classes, `model_fn` and
`loss_fn` must be importable (module-level) or given as "module:attribute" strings, since the
ranks are spawned. Does not import tests/ and creates no process group in the calling process.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from shardoptim.kinds import SHARDING_MODES
from shardoptim.verify_ranks import LAYOUT_ORDER, LBFGS_RTOL, Spec, Verdict, rank_main, resolve

__all__ = ["LBFGS_RTOL", "LayoutRun", "ParamReport", "VerifyResult", "verify"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamReport:
    """How one parameter of the sharded run compares with the plain class's."""

    name: str
    """The parameter's name in `model.named_parameters()`."""
    shape: tuple[int, ...]
    max_rel_diff: float
    """Largest max|sharded - plain| / max|plain| over the steps and ranks (0.0: bitwise equal)."""
    first_step: int | None
    """First step (1-based) after which it was not bitwise equal; None if it never differed."""
    verdict: Verdict


@dataclass(frozen=True, kw_only=True, slots=True)
class LayoutRun:
    """One sharded run: the sharding asked for, the layout used and how it compares."""

    sharding: str
    """What was passed as `sharding=`."""
    layout: str
    """`opt.sharding`: "flat", "tensor", "replicated" or "lbfgs" ("-" when refused)."""
    verdict: Verdict
    max_rel_diff: float
    first_step: int | None
    """First step at which some parameter was not bitwise equal (None: never)."""
    first_param: str | None
    """The first such parameter at that step."""
    params: tuple[ParamReport, ...]
    tolerance: float
    """The relative difference still "within tolerance" for this layout."""
    note: str = ""
    """The probe's reason for the layout, or the refusal's message."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifyResult:
    """What `verify` found: the requested run first, then any more restrictive layouts tried."""

    optimizer_class: str
    world_size: int
    steps: int
    rtol: float
    runs: tuple[LayoutRun, ...]
    recommended: str | None
    """Least restrictive layout found exact or within tolerance (pass it as `sharding=`); None if none."""

    @property
    def verdict(self) -> Verdict:
        """The verdict of the requested sharding."""
        return self.runs[0].verdict

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain data (JSON-able)."""
        return asdict(self)

    def report(self) -> str:
        """Return the human-readable report (one table per layout tried, then the recommendation)."""
        lines = [
            f"shardoptim.verify: {self.optimizer_class} at world size {self.world_size}, {self.steps} steps, "
            f"rtol {self.rtol:g}"
        ]
        for run in self.runs:
            where = f"; first differs at step {run.first_step} in {run.first_param}" if run.first_step else ""
            lines.append(
                f"\nsharding={run.sharding!r} -> layout {run.layout}: {run.verdict.upper()} "
                f"(max rel diff {run.max_rel_diff:.3g}{where})"
            )
            if run.note:
                lines.append(f"  {run.note}")
            if run.params:
                width = max(len("parameter"), *(len(p.name) for p in run.params))
                lines.append(
                    f"  {'parameter':{width}s}  {'shape':14s}  {'layout':10s}  max rel diff  first step  verdict"
                )
                for p in run.params:
                    step = "-" if p.first_step is None else str(p.first_step)
                    lines.append(
                        f"  {p.name:{width}s}  {str(p.shape):14s}  {run.layout:10s}  {p.max_rel_diff:12.3g}  "
                        f"{step:>10s}  {p.verdict}"
                    )
        if self.recommended is None:
            lines.append("\nrecommended: none of the layouts tried matches; report the class")
        else:
            lines.append(f"\nrecommended: sharding={self.recommended!r}")
        return "\n".join(lines)


def verify(
    optimizer_class: type[Optimizer] | str,
    model_fn: Callable[[], torch.nn.Module] | str,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor] | str,
    *,
    steps: int = 5,
    world_size: int = 2,
    sharding: str = "auto",
    rtol: float = 1e-6,
    closure: bool | None = None,
    seed: int = 0,
    timeout_s: float = 300.0,
    **kwargs: Any,
) -> VerifyResult:
    """Run `optimizer_class` sharded at `world_size` CPU ranks against the plain class; report per parameter.

    Spawns `world_size` processes (gloo) and waits for them; the calling process needs no process
    group. See the module docstring for what is compared.

    Args:
        optimizer_class: the class, or "module:Class".
        model_fn: builds the model (called after torch.manual_seed(seed)), or "module:function".
        loss_fn: loss_fn(model) -> scalar loss for one step (the same data on every rank), or a string.
        steps: optimizer steps to compare.
        world_size: ranks to shard over (>= 1; 2 or more shows what crosses ranks).
        sharding: as ShardedOptimizer's ("auto", "flat", "tensor", "replicated").
        rtol: relative difference still "within tolerance" (LBFGS: LBFGS_RTOL at least).
        closure: evaluate the loss in a closure on each copy; None: only for torch.optim.LBFGS.
        seed: torch's seed before each model_fn() call.
        timeout_s: limit for each collective and, times 2 plus 60 s, for the whole run.
        **kwargs: the optimizer's options (lr, betas, ...).

    Returns:
        A VerifyResult; `result.report()` is the printed table.

    Raises:
        ValueError: bad arguments. RuntimeError: a rank failed (its traceback is in the message)
            or did not finish in time.
    """
    cls = resolve(optimizer_class)
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise ValueError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {cls!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if sharding not in SHARDING_MODES:
        raise ValueError(f"sharding must be one of {SHARDING_MODES}, got {sharding!r}")
    out_dir = tempfile.mkdtemp(prefix="shardoptim_verify_")
    spec = Spec(
        optimizer_class=optimizer_class,
        model_fn=model_fn,
        loss_fn=loss_fn,
        steps=steps,
        sharding=sharding,
        kwargs=dict(kwargs),
        rtol=rtol,
        closure=cls is torch.optim.LBFGS if closure is None else closure,
        seed=seed,
        timeout_s=timeout_s,
        out_dir=out_dir,
    )
    try:
        _spawn_and_wait(spec, world_size, deadline_s=2 * timeout_s + 60.0)
        with open(os.path.join(out_dir, "result.json"), encoding="utf-8") as f:
            raw = json.load(f)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    runs = tuple(
        LayoutRun(
            **{**r, "params": tuple(ParamReport(**{**p, "shape": tuple(p["shape"])}) for p in r["params"])}
        )
        for r in raw["runs"]
    )
    ok = [run.layout for run in runs if run.verdict in ("exact", "within tolerance")]
    recommended = min(ok, key=lambda k: LAYOUT_ORDER.index(k) if k in LAYOUT_ORDER else 0) if ok else None
    return VerifyResult(
        optimizer_class=f"{cls.__module__}.{cls.__qualname__}",
        world_size=world_size,
        steps=steps,
        rtol=rtol,
        runs=runs,
        recommended=recommended,
    )


def _spawn_and_wait(spec: Spec, world_size: int, *, deadline_s: float) -> None:
    ctx = mp.get_context("spawn")  # NOTE: never fork: it deadlocks once torch's OpenMP threads ran
    procs = [
        ctx.Process(target=rank_main, args=(rank, world_size, spec), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    # NOTE: poll, so that a rank that failed does not leave the others waiting in a collective.
    while time.monotonic() < end and any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.05)
    stuck = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    errors = []
    for rank in range(world_size):
        path = os.path.join(spec.out_dir, f"rank{rank}.err")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                errors.append(f"[rank {rank}/{world_size}] {f.read()}")
    if errors:
        raise RuntimeError("shardoptim.verify: a rank failed:\n" + errors[0])
    if stuck:
        raise RuntimeError(
            f"shardoptim.verify: rank(s) {stuck} did not finish within {deadline_s:.0f} s; raise timeout_s "
            "or check that loss_fn and the optimizer take the same path on every rank"
        )
    failed = [(rank, p.exitcode) for rank, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"shardoptim.verify: rank(s) exited with (rank, code) {failed}")
