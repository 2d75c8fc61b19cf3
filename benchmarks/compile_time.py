"""Time each rank's local update eager against compile=True, for several optimizer classes.

Run from the repository root (CPU, gloo; spawns its own 2 ranks, nothing else to launch):

    python benchmarks/compile_time.py                        # 100 x 100,000 fp32, 20 timed steps, ~6 min
    python benchmarks/compile_time.py --tensors 20 --numel 10000 --steps 5     # quick smoke run
    PYTHONPATH=/tmp/timmpkg python benchmarks/compile_time.py                  # with the timm rows

Classes: torch AdamW (foreach=True), torch AdamW (fused=True), timm Lion, timm Adan,
pytorch_optimizer Lion and schedulefree.AdamWScheduleFree. timm is optional: without it its rows
say so. Its package `__init__` imports torchvision, whose build may not match torch's, so its
optimizer modules (which need only torch) are loaded under bare package stubs.

One set of 2 freshly spawned ranks (gloo, FileStore, OMP_NUM_THREADS=1) runs every class in
turn; for each class the eager and the compiled ShardedOptimizer (each over its own parameters
of `--tensors` tensors of `--numel` fp32 elements, the same values, fixed random gradients) are
stepped alternately, step by step, so both see the same machine load. The lr changes at every
step (as a scheduler would). The first `--warmup` steps are not timed; their total wall time for
the compiled side is the "compile s" column (it includes those steps' own update time). The
local update (the base step over this rank's slice: what compile= changes) is timed on its own
in every timed step, as thread CPU time and wall time; a step's time is the max over ranks and
the table holds medians over steps. "graphs" is the number of graphs compiled during the whole
run (not growing after warm-up: no recompilation), "fallback" the reason a class runs eagerly.

The machine is shared: read the load average printed with the table, and run twice to see the noise.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import markdown_table, run_fresh_ranks  # noqa: E402

from shardoptim import ShardedOptimizer  # noqa: E402

#: (row label, options for the base class); the class is looked up by `_optimizer_class`.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("torch AdamW foreach", {"lr": 1e-3, "weight_decay": 0.1, "foreach": True}),
    ("torch AdamW fused", {"lr": 1e-3, "weight_decay": 0.1, "fused": True}),
    ("timm Lion", {"lr": 1e-4, "weight_decay": 0.1}),
    ("timm Adan", {"lr": 1e-3, "weight_decay": 0.02}),
    ("pytorch_optimizer Lion", {"lr": 1e-4, "weight_decay": 0.1}),
    ("schedulefree AdamWScheduleFree", {"lr": 1e-3, "weight_decay": 0.1, "foreach": True}),
]


@functools.cache
def _load_timm() -> types.ModuleType | None:
    """Return a namespace with timm's Lion and Adan, or None when timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    optim_dir = Path(next(iter(spec.submodule_search_locations)), "optim")
    # NOTE: a package of another name over timm/optim, not timm's own package modules, whose
    # imports reach torchvision; "timm" itself stays unimported, as other libraries probe it.
    package = "_timm_optim"
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [str(optim_dir)]
        stub.__spec__ = importlib.machinery.ModuleSpec(package, None, is_package=True)
        stub.__spec__.submodule_search_locations = [str(optim_dir)]
        sys.modules[package] = stub
    found = types.ModuleType("timm_optimizers")
    found.Lion = importlib.import_module(f"{package}.lion").Lion  # type: ignore[attr-defined]
    found.Adan = importlib.import_module(f"{package}.adan").Adan  # type: ignore[attr-defined]
    return found


def _optimizer_class(label: str) -> type[torch.optim.Optimizer] | None:
    """Return the class of a row, or None when its package is not installed."""
    if label.startswith("torch AdamW"):
        return torch.optim.AdamW
    if label.startswith("timm"):
        timm = _load_timm()
        return None if timm is None else getattr(timm, label.split()[1])  # type: ignore[no-any-return]
    if label == "pytorch_optimizer Lion":
        import pytorch_optimizer

        return pytorch_optimizer.Lion  # type: ignore[no-any-return]
    import schedulefree

    return schedulefree.AdamWScheduleFree  # type: ignore[no-any-return]


class _TimedUpdate:
    """Wraps an optimizer's `compiled_update.step` to time each call (thread CPU and wall)."""

    def __init__(self, opt: ShardedOptimizer) -> None:
        self.update = opt.compiled_update
        self.inner = self.update.step
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.update.step = self  # type: ignore[method-assign]

    def __call__(self, **kwargs: Any) -> Any:
        cpu, wall = time.thread_time(), time.perf_counter()
        result = self.inner(**kwargs)
        self.cpu_s += time.thread_time() - cpu
        self.wall_s += time.perf_counter() - wall
        return result


def _max_over_ranks(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [float(v) for v in tensor.tolist()]


def _bench_case(
    label: str, options: dict[str, Any], *, tensors: int, numel: int, warmup: int, steps: int
) -> dict[str, Any]:
    """Step the eager and the compiled optimizer of one class alternately; return per-step times."""
    cls = _optimizer_class(label)
    if cls is None:
        return {"skipped": "timm not installed (see the module docstring)"}
    torch.manual_seed(0)
    values = [torch.randn(numel) for _ in range(tensors)]
    grads = [torch.randn(numel) * 1e-2 for _ in range(tensors)]
    sides: dict[str, Any] = {}
    for side, compile in (("eager", False), ("compiled", True)):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = ShardedOptimizer(params, cls, compile=compile, **options)
        if hasattr(opt, "train"):
            opt.train()
        sides[side] = {"opt": opt, "timer": _TimedUpdate(opt), "warn": caught, "times": [], "warm_s": 0.0}
    base_lr = options["lr"]
    for i in range(warmup + steps):
        for side in ("eager", "compiled"):
            state = sides[side]
            opt, timer = state["opt"], state["timer"]
            for group in opt.param_groups:
                group["lr"] = base_lr * (1.0 - i / (10 * (warmup + steps)))
            dist.barrier()
            timer.cpu_s = timer.wall_s = 0.0
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            state["warn"] += caught
            if i < warmup:
                state["warm_s"] += time.perf_counter() - start
            else:
                state["times"].append(_max_over_ranks([timer.cpu_s, timer.wall_s]))
    out: dict[str, Any] = {}
    for side, state in sides.items():
        update = state["opt"].compiled_update
        out[side] = {
            "cpu_ms": statistics.median(t[0] for t in state["times"]) * 1e3,
            "wall_ms": statistics.median(t[1] for t in state["times"]) * 1e3,
            "warm_s": _max_over_ranks([state["warm_s"]])[0],
            "graphs": update.num_compiles,
            "compiles": update.compiles,
            "fallback": update.fallback_reason,
            "sharding": state["opt"].sharding,
        }
    return out


def _run(
    rank: int, world_size: int, *, tensors: int, numel: int, warmup: int, steps: int, only: list[str]
) -> Any:
    torch.set_num_threads(1)
    results = {}
    for label, options in CASES:
        if only and label not in only:
            continue
        results[label] = _bench_case(label, options, tensors=tensors, numel=numel, warmup=warmup, steps=steps)
    return results


def _short(reason: str) -> str:
    return reason.split(";")[0].split(" (")[0][:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=100, help="number of parameters (default 100)")
    parser.add_argument(
        "--numel", type=int, default=100_000, help="fp32 elements per parameter (default 100,000)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--only", nargs="*", default=[], help="row labels to run (default: all)")
    args = parser.parse_args()
    kwargs = {
        "tensors": args.tensors,
        "numel": args.numel,
        "warmup": args.warmup,
        "steps": args.steps,
        "only": args.only,
    }
    load_before = os.getloadavg()
    results = run_fresh_ranks(_run, world_size=2, kwargs=kwargs, timeout_s=3600.0)[0]
    load_after = os.getloadavg()
    rows = []
    notes = []
    for label, out in results.items():
        if "skipped" in out:
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", "skipped"])
            notes.append(f"{label}: {out['skipped']}")
            continue
        eager, comp = out["eager"], out["compiled"]
        rows.append(
            [
                label,
                eager["sharding"],
                f"{eager['cpu_ms']:.2f}",
                f"{comp['cpu_ms']:.2f}",
                f"{eager['cpu_ms'] / comp['cpu_ms']:.2f}x",
                f"{eager['wall_ms']:.2f} / {comp['wall_ms']:.2f}",
                f"{comp['warm_s']:.1f}",
                str(comp["graphs"]),
                "compiled" if comp["compiles"] else f"eager: {_short(comp['fallback'])}",
            ]
        )
    headers = [
        "class",
        "sharding",
        "eager CPU ms",
        "compiled CPU ms",
        "speedup",
        "wall ms eager / compiled",
        "compile s",
        "graphs",
        "compiled update",
    ]
    total = args.tensors * args.numel
    print(
        f"\n## Local update per step, 2 ranks (gloo, OMP_NUM_THREADS=1): {args.tensors} x {args.numel:,} fp32 = "
        f"{total:,} elements ({total // 2:,} per rank); medians of {args.steps} steps after {args.warmup}; "
        f"torch {torch.__version__}; {datetime.date.today()}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after\n"
    )
    print(markdown_table(headers, rows))
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
