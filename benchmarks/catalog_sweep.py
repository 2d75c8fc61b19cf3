"""Sweep every optimizer class of the public catalogs through ShardedOptimizer; compare with the plain class.

Run from the repository root (a few minutes on 2 cores; needs timm, pytorch_optimizer, schedulefree,
prodigyopt, dadaptation and lion_pytorch: the `test` extra plus `pip install timm`):

    OMP_NUM_THREADS=1 python3 benchmarks/catalog_sweep.py --out /tmp/sweep.md
    OMP_NUM_THREADS=1 python3 benchmarks/catalog_sweep.py --world-sizes 2 --only lamb --grad-scale 10
    OMP_NUM_THREADS=1 python3 benchmarks/catalog_sweep.py --layouts-only   # layout counts, one process

Catalogs: every name of timm.optim.list_optimizers() (the class and the defaults timm's
create_optimizer_v2 binds to the name, with timm's momentum=0.9 and weight_decay=0), every name of
pytorch_optimizer.get_supported_optimizers(), every schedulefree class, prodigyopt.Prodigy, every
dadaptation class and lion_pytorch.Lion. Each is tried as a new user would: default hyperparameters
(only the arguments a class requires: lr=1e-3, num_iterations=12, num_data=32) on adversarial data
(issue 21): a small MLP whose first weight is scale-invariant (Linear(16,33, bias=False) ->
LayerNorm(33) -> Tanh -> Linear(33,7): its gradient is orthogonal to it, which triggers SGDP/AdamP's
projection), 12 steps (more than a typical warm-up) on one fixed full batch, the loss of step 6
scaled by 1e3 (a gradient spike) and that of step 8 by 1e-3 (a drop), so every rank computes the
same gradients (what DDP's averaged gradients would be). A class that
raises without a closure gets one; one whose step needs a Hessian (autograd.grad of the gradients)
gets `backward(create_graph=True)`; one that rejects model.parameters() gets the groups its docs
ask for (pytorch_optimizer's Muon family: use_muon=True for the 2-D weights, False for the rest),
or the 2-D weights alone. Classes with train()/eval() (schedule-free) get opt.train() before the
first step and opt.eval() after the last, on both sides (on opt.optim when ShardedOptimizer has
no train(), as a user of the wrapper without it would try; the message says so).

The oracle is the plain class over the same model on one process, seeded identically; every rank
computes it itself (no extra process) and compares its own sharded result with it, so a rank whose
weights drifted from the others is caught too. Per class and run it prints the layout chosen
(`opt.sharding`) and one of
  EXACT     max relative difference of the parameters <= 1e-6 on every rank (<= 2e-3 for the
            sharded LBFGS in float32: summation order, see RTOL_LBFGS)
  DIVERGES  ran, but some rank's parameters differ from the oracle's (silently wrong)
  REFUSED   ShardedOptimizer raised ValueError/TypeError/NotImplementedError at construction
  ERROR     anything else (the plain class failing or producing non-finite values included; the
            summary counts those in parentheses: no wrapper can fix them)
  HANG      a collective timed out (--class-timeout) or a rank stopped making progress
  SKIPPED   the class needs CUDA (bitsandbytes, apex), takes a model or wraps another optimizer
and then a summary table per world size and gradient scale (--grad-scale 10: 10x larger gradients,
above the default clip thresholds), and the count of each layout chosen.

--layouts-only builds each class once in this process (world size 1, no process group; the layout
does not depend on the world size) and prints only the layout counts (flat / tensor / replicated /
lbfgs / refused): run this script from another checkout's benchmarks/ folder to count that
checkout's choices (it imports the shardoptim next to it), e.g. an older commit for "before".

One spawn per world size runs every class in a loop (gloo, FileStore). Each class runs in a process
group of its own (timeout --class-timeout seconds), recreated after any failure inside a step, so a
rank left behind in a collective cannot pair up with the next class's collectives; a rank that stops
reporting is killed by the parent, the class recorded as HANG, and the loop restarts after it.
Measured on the shared 2-core machine (adversarial data, 12 steps, grads x1 and x10): 153 s at
world size 1, 168 s at 2, 187 s at 3 at a load average of 4-10 (the collectives wait for time
slices); --layouts-only about 2 minutes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
# NOTE: torch.compile (timm's Kron compiles four helpers) spends minutes in the C++ compiler per class
# on a 2-core CPU and changes nothing that is compared here: run everything eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: find shardoptim

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.optim.optimizer as torch_optimizer_module  # noqa: E402
from torch import nn  # noqa: E402

STEPS = 12
#: step -> loss factor: a spike of 3 orders of magnitude mid-run, then a drop of 3 orders.
SPIKES: dict[int, float] = {6: 1e3, 8: 1e-3}
RTOL = 1e-6
#: The sharded LBFGS sums its dot products in another order than torch's (per-rank partial sums,
#: then an all-reduce); over 5 steps of up to 20 inner iterations in float32 that reaches ~1e-3
#: relative (float64: ~1e-11). The README documents this tolerance; it is no wrapper error.
RTOL_LBFGS = 2e-3
BATCH = 32
LR = 1e-3
#: Values for arguments that some classes require (a new user must pass them).
REQUIRED_ARGS: dict[str, Any] = {"lr": LR, "num_iterations": STEPS, "num_data": BATCH}
STATUSES = ("EXACT", "DIVERGES", "REFUSED", "ERROR", "HANG", "SKIPPED")
_SEVERITY = {"SKIPPED": 0, "EXACT": 1, "DIVERGES": 2, "REFUSED": 3, "ERROR": 4, "HANG": 5}
PLAIN_FAILS = "plain class fails"
_NEEDS_CUDA = ("cuda", "bitsandbytes", "apex", "triton", "nvidia")


# ----------------------------------------------------------------------------------------- catalog


@dataclass
class Entry:
    """One optimizer as a new user would build it: the class and the keyword arguments."""

    name: str
    cls: Any  # an Optimizer subclass, or None when skipped
    kwargs: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None


def _import_timm_optim() -> Any:
    """Import timm.optim; work around a torchvision build that cannot load its operators.

    NOTE: an environment workaround only. A CUDA build of torchvision next to a CPU torch fails at
    import (`operator torchvision::nms does not exist`, from torchvision/_meta_registrations.py),
    and timm imports torchvision. The operator registrations are not needed by any optimizer, so
    when (and only when) the plain import fails, torchvision is imported without them.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import timm.optim

    return timm.optim


def _first_arg(cls: Any) -> str:
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return "params"
    return params[0].name if params else ""


def _required_kwargs(cls: Any, given: dict[str, Any]) -> dict[str, Any]:
    """Add values for the arguments the class requires and `given` lacks (lr, num_iterations, ...)."""
    out = dict(given)
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    except (TypeError, ValueError):
        return out
    required = getattr(torch_optimizer_module, "required", None)  # torch's "no default" marker (SGDP's lr)
    for p in params:
        missing = p.default is inspect.Parameter.empty or (required is not None and p.default is required)
        keyword = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if missing and keyword and p.name in REQUIRED_ARGS and p.name not in out:
            out[p.name] = REQUIRED_ARGS[p.name]
    return out


def _entry(name: str, cls: Any, kwargs: dict[str, Any] | None = None) -> Entry:
    first = _first_arg(cls)
    if first in ("model", "module"):
        return Entry(name, None, skip=f"takes a model ({cls.__name__}({first}, ...)), not parameters")
    if first in ("optimizer", "base_optimizer", "base"):
        return Entry(name, None, skip=f"wraps another optimizer ({cls.__name__}({first}, ...))")
    return Entry(name, cls, _required_kwargs(cls, kwargs or {}))


def _timm_entries() -> list[Entry]:
    timm_optim = _import_timm_optim()
    from timm.optim._optim_factory import default_registry

    entries = []
    for name in timm_optim.list_optimizers():
        info = default_registry.get_optimizer_info(name)
        label = f"timm:{name}"
        if isinstance(info.opt_class, str):  # bitsandbytes.*, apex.*: imported lazily by timm
            module = info.opt_class.split(".")[0]
            entries.append(Entry(label, None, skip=f"needs {module} ({info.opt_class}), CUDA only"))
            continue
        # As create_optimizer_v2(params, opt=name) builds it: weight_decay=0, the name's defaults,
        # momentum=0.9 where the class takes momentum.
        kwargs: dict[str, Any] = {"weight_decay": 0.0, **(info.defaults or {})}
        if info.has_momentum:
            kwargs.setdefault("momentum", 0.9)
        entries.append(_entry(label, info.opt_class, kwargs))
    return entries


def _pytorch_optimizer_entries() -> list[Entry]:
    from pytorch_optimizer import get_supported_optimizers, load_optimizer

    entries = []
    for name in get_supported_optimizers():
        try:
            cls = load_optimizer(name)
        except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
            entries.append(Entry(f"pytorch_optimizer:{name}", None, skip=f"cannot load: {err}"))
            continue
        entries.append(_entry(f"pytorch_optimizer:{name}", cls))
    return entries


def _other_entries() -> list[Entry]:
    import dadaptation
    import lion_pytorch
    import prodigyopt
    import schedulefree

    entries = [
        _entry(f"schedulefree:{n}", getattr(schedulefree, n))
        for n in sorted(dir(schedulefree))
        if "ScheduleFree" in n
    ]
    entries.append(_entry("prodigyopt:Prodigy", prodigyopt.Prodigy))
    entries += [
        _entry(f"dadaptation:{n}", getattr(dadaptation, n))
        for n in sorted(dir(dadaptation))
        if n.startswith("DAdapt")
    ]
    entries.append(_entry("lion_pytorch:Lion", lion_pytorch.Lion))
    return entries


def build_catalog(only: str | None = None) -> list[Entry]:
    """Return every catalog entry, in a fixed order; `only`: comma-separated name substrings (any case)."""
    entries = _timm_entries() + _pytorch_optimizer_entries() + _other_entries()
    if only:
        wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
        entries = [e for e in entries if any(w in e.name.lower() for w in wanted)]
    return entries


# ------------------------------------------------------------------------------------- one class


@dataclass(frozen=True)
class Mode:
    """How the training loop drives a class."""

    closure: bool = False
    create_graph: bool = False

    def describe(self) -> str:
        parts = [n for n, on in (("closure", self.closure), ("create_graph", self.create_graph)) if on]
        return "+".join(parts) or "plain"


MODES = (Mode(), Mode(closure=True), Mode(create_graph=True), Mode(closure=True, create_graph=True))

#: How the parameters are handed to a class, tried in this order (the first the plain class accepts):
#: "all": model.parameters(); "use_muon": the groups pytorch_optimizer's Muon family documents
#: (2-D weights with use_muon=True, the rest with use_muon=False); "matrices": the 2-D weights only,
#: for classes that take nothing else.
PARAM_LAYOUTS = ("all", "use_muon", "matrices")


def _params_for(model: nn.Module, layout: str) -> list[Any]:
    params = list(model.parameters())
    matrices = [p for p in params if p.dim() == 2]
    if layout == "use_muon":
        rest = [p for p in params if p.dim() != 2]
        return [{"params": matrices, "use_muon": True}, {"params": rest, "use_muon": False}]
    if layout == "matrices":
        return matrices
    return params


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    # NOTE: no bias before the LayerNorm, so the first weight is exactly scale-invariant.
    return nn.Sequential(nn.Linear(16, 33, bias=False), nn.LayerNorm(33), nn.Tanh(), nn.Linear(33, 7))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 16, generator=gen), torch.randn(BATCH, 7, generator=gen)


def _has_modes(obj: Any) -> bool:
    """Whether a class or an instance has train() and eval() (schedule-free optimizers)."""
    return callable(getattr(obj, "train", None)) and callable(getattr(obj, "eval", None))


def _train(model: nn.Module, opt: Any, *, mode: Mode, scale: float, modes_target: Any) -> None:
    """Run STEPS steps on the fixed batch (SPIKES scale some); call train()/eval() on `modes_target` when given."""
    x, y = _data()
    factor = [scale]

    def loss_fn() -> torch.Tensor:
        return ((model(x) - y) ** 2).mean() * factor[0]

    if modes_target is not None:
        modes_target.train()
    for step in range(STEPS):
        factor[0] = scale * SPIKES.get(step, 1.0)
        if mode.closure:

            def closure() -> torch.Tensor:
                with torch.enable_grad():
                    opt.zero_grad()
                    loss = loss_fn()
                    loss.backward(create_graph=mode.create_graph)
                return loss

            opt.step(closure)
        else:
            opt.zero_grad()
            loss_fn().backward(create_graph=mode.create_graph)
            opt.step()
    if modes_target is not None:
        modes_target.eval()


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _oracle(entry: Entry, scale: float) -> tuple[str, Mode, list[torch.Tensor]] | str:
    """Train the plain class; return (param layout, mode that work, final parameters), or an error."""
    # NOTE: errors in a step say more than errors at construction (the class accepted that way of
    # calling it); the first and the last of them are reported.
    errors: dict[str, list[tuple[str, str]]] = {"construction": [], "step": []}
    for layout in PARAM_LAYOUTS:
        for mode in MODES:
            model = _make_model()
            torch.manual_seed(1)
            phase = "construction"
            try:
                opt = entry.cls(_params_for(model, layout), **entry.kwargs)
                phase = "step"
                modes_target = opt if _has_modes(entry.cls) else None
                _train(model, opt, mode=mode, scale=scale, modes_target=modes_target)
            except Exception as err:  # noqa: BLE001 - recorded, try the next way
                how = ", ".join(w for w in (mode.describe(), layout) if w not in ("plain", "all"))
                errors[phase].append((_short(err, 200), f" ({how})" if how else ""))
                continue
            return layout, mode, _snapshot(model)
    found = errors["step"] or errors["construction"]
    (first, first_how), (last, last_how) = found[0], found[-1]
    return first + first_how if first == last else f"{first}{first_how} / {last}{last_how}"


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}"


def _is_refusal(err: BaseException) -> bool:
    """A deliberate ValueError/TypeError/NotImplementedError raised by shardoptim's own code."""
    if not isinstance(err, (ValueError, TypeError, NotImplementedError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}shardoptim{os.sep}" in frames[-1].filename


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or type(err).__name__ == "DistBackendError"


def _max_rel_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        a, b = a.double(), b.double()
        if not bool(torch.isfinite(a).all()):
            return math.inf
        scale = max(float(b.abs().max()), 1e-12)
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


def run_one(entry: Entry, scale: float, group: Any) -> dict[str, Any]:
    """Run one class at one gradient scale on this rank; return its result (JSON-able).

    Collective over `group` (the sharded run): call on every rank of the group, in the same order.
    """
    from shardoptim import ShardedOptimizer

    out: dict[str, Any] = {
        "status": "EXACT",
        "layout": "-",
        "diff": None,
        "msg": "",
        "mode": "-",
        "desync": False,
    }
    if entry.skip is not None:
        return {**out, "status": "SKIPPED", "msg": entry.skip}
    found = _oracle(entry, scale)
    if isinstance(found, str):
        status = "SKIPPED" if any(word in found.lower() for word in _NEEDS_CUDA) else "ERROR"
        return {**out, "status": status, "msg": f"{PLAIN_FAILS}: {found}"}
    param_layout, mode, want = found
    out["mode"] = mode.describe() + ("" if param_layout == "all" else f" {param_layout}")
    if not all(bool(torch.isfinite(t).all()) for t in want):
        return {**out, "status": "ERROR", "msg": "plain class produces non-finite parameters"}
    model = _make_model()
    torch.manual_seed(1)
    try:
        opt = ShardedOptimizer(
            _params_for(model, param_layout), entry.cls, process_group=group, **entry.kwargs
        )
    except Exception as err:  # noqa: BLE001 - recorded
        status = "REFUSED" if _is_refusal(err) else ("HANG" if _is_timeout(err) else "ERROR")
        return {
            **out,
            "status": status,
            "msg": f"construction: {_short(err, 500)}",
            "desync": status == "HANG",
        }
    out["layout"] = str(getattr(opt, "sharding", "?"))
    modes_target = None
    if _has_modes(entry.cls):
        modes_target = opt if _has_modes(opt) else opt.optim
        if modes_target is not opt:
            out["msg"] = "train()/eval() called on opt.optim (ShardedOptimizer has none); "
    try:
        _train(model, opt, mode=mode, scale=scale, modes_target=modes_target)
    except Exception as err:  # noqa: BLE001 - recorded
        status = "HANG" if _is_timeout(err) else "ERROR"
        return {**out, "status": status, "msg": out["msg"] + f"step: {_short(err)}", "desync": True}
    diff = _max_rel_diff(_snapshot(model), want)
    out["diff"] = diff
    tol = RTOL_LBFGS if out["layout"] == "lbfgs" else RTOL
    out["status"] = "EXACT" if diff <= tol else "DIVERGES"
    return out


def merge(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the ranks' results: the worst status, the largest difference, the worst rank's message."""
    worst_rank = max(range(len(per_rank)), key=lambda r: _SEVERITY[per_rank[r]["status"]])
    worst = per_rank[worst_rank]
    diffs = [r["diff"] for r in per_rank if r["diff"] is not None]
    msg = worst["msg"]
    if msg and len(per_rank) > 1 and worst["status"] not in ("SKIPPED", "REFUSED"):
        msg = f"[rank {worst_rank}] {msg}"
    return {
        "status": worst["status"],
        "layout": per_rank[0]["layout"],
        "diff": max(diffs) if diffs else None,
        "msg": msg,
        "mode": per_rank[0]["mode"],
        "desync": any(r["desync"] for r in per_rank),
    }


# ---------------------------------------------------------------------------------------- ranks


def _quiet() -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Exit this rank once the parent is gone (killed), even while stuck in a collective."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    start: int,
    only: str | None,
    scales: list[float],
    class_timeout_s: float,
    q: Any,
) -> None:
    torch.set_num_threads(1)
    _quiet()
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - some classes print on every train()/eval()
    try:
        entries = build_catalog(only)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=600)
        )
    except Exception:  # noqa: BLE001 - reported to the parent
        q.put(("fatal", rank, traceback.format_exc()))
        return
    if rank == 0:
        q.put(("count", len(entries), [e.name for e in entries]))
    group = None
    for index in range(start, len(entries)):
        entry = entries[index]
        q.put(("start", rank, index))
        results = {}
        for scale in scales:
            if group is None:
                group = dist.new_group(backend="gloo", timeout=timedelta(seconds=class_timeout_s))
            try:
                mine = run_one(entry, scale, group)
            except Exception as err:  # noqa: BLE001 - a bug in the sweep itself: record and go on
                mine = {
                    "status": "ERROR",
                    "layout": "-",
                    "diff": None,
                    "msg": f"sweep: {_short(err)}",
                    "mode": "-",
                    "desync": True,
                }
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, mine)  # default group: never used by a class
            merged = merge(everyone)
            results[str(scale)] = merged
            if merged["desync"]:
                dist.destroy_process_group(group)
                group = None
        if rank == 0:
            q.put(("result", index, json.dumps(results)))
    q.put(("done", rank))
    dist.destroy_process_group()


@dataclass
class _Row:
    name: str
    results: dict[str, dict[str, Any]]  # scale -> merged result


def _spawn(
    world_size: int, start: int, args: argparse.Namespace, scales: list[float]
) -> tuple[list[Any], Any, str]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix=f"catalog_sweep_ws{world_size}_")
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, os.path.join(tmp, "store"), start, args.only, scales, args.class_timeout, q),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    return procs, q, tmp


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def sweep_world_size(world_size: int, args: argparse.Namespace, scales: list[float]) -> dict[int, _Row]:
    """Run every class at one world size; restart the ranks after a class that hangs or kills one."""
    rows: dict[int, _Row] = {}
    names: list[str] = []
    count: int | None = None
    start = 0
    entry_deadline_s = len(scales) * (2 * args.class_timeout + 30) + 30
    while count is None or start < count:
        procs, q, tmp_dir = _spawn(world_size, start, args, scales)
        current: dict[int, tuple[int, float]] = {}
        done: set[int] = set()
        startup = time.monotonic()
        failed: str | None = None
        while len(done) < world_size and failed is None:
            try:
                msg = q.get(timeout=1.0)
            except queue.Empty:
                msg = None
            now = time.monotonic()
            if msg is not None:
                kind = msg[0]
                if kind == "fatal":
                    _kill(procs)
                    raise SystemExit(f"rank {msg[1]} failed to start:\n{msg[2]}")
                if kind == "count":
                    count, names = msg[1], msg[2]
                elif kind == "start":
                    current[msg[1]] = (msg[2], now)
                elif kind == "result":
                    index = msg[1]
                    rows[index] = _Row(names[index], json.loads(msg[2]))
                    _print_row(world_size, rows[index])
                    start = index + 1
                elif kind == "done":
                    done.add(msg[1])
                continue
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]
            stuck = [r for r, (_, t0) in current.items() if now - t0 > entry_deadline_s and r not in done]
            if dead:
                failed = f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
            elif stuck:
                failed = f"rank(s) {stuck} made no progress for {entry_deadline_s:.0f} s"
            elif not current and now - startup > 600:
                failed = "ranks did not start within 600 s"
        _kill(procs)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if failed is None:
            break
        index = max(i for i, _ in current.values()) if current else start
        if count is None:
            raise SystemExit(f"world size {world_size}: {failed}")
        result = {"status": "HANG", "layout": "-", "diff": None, "msg": failed, "mode": "-", "desync": True}
        rows[index] = _Row(names[index], {str(s): dict(result) for s in scales})
        _print_row(world_size, rows[index])
        start = index + 1
    return rows


# ---------------------------------------------------------------------------------------- report


def _fmt_diff(diff: float | None) -> str:
    return "-" if diff is None else ("inf" if math.isinf(diff) else f"{diff:.2e}")


def _print_row(world_size: int, row: _Row) -> None:
    for scale, r in row.results.items():
        msg = r["msg"][:160]
        print(
            f"ws={world_size} x{float(scale):g} {row.name:42s} {r['layout']:10s} {r['status']:8s} "
            f"{_fmt_diff(r['diff']):>9s} {r['mode']:12s} {msg}",
            flush=True,
        )


def summary(all_rows: dict[int, dict[int, _Row]], scales: list[float]) -> list[str]:
    lines = [
        "| world size | grads | runnable | exact (<= 1e-6) | silently different | error (plain class fails) "
        "| refused | hang | skipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for world_size, rows in all_rows.items():
        for scale in scales:
            counts = dict.fromkeys(STATUSES, 0)
            plain_fails = 0
            for row in rows.values():
                result = row.results[str(scale)]
                counts[result["status"]] += 1
                plain_fails += result["status"] == "ERROR" and PLAIN_FAILS in result["msg"]
            runnable = sum(counts.values()) - counts["SKIPPED"]
            lines.append(
                f"| {world_size} | x{scale:g} | {runnable} | {counts['EXACT']} | {counts['DIVERGES']} | "
                f"{counts['ERROR']} ({plain_fails}) | {counts['REFUSED']} | {counts['HANG']} | {counts['SKIPPED']} |"
            )
    return lines


LAYOUTS = ("flat", "tensor", "replicated", "lbfgs", "refused", "other")


def _layout_of(result: dict[str, Any]) -> str:
    if result["status"] == "REFUSED":
        return "refused"
    return result["layout"] if result["layout"] in LAYOUTS else "other"


def layout_counts(all_rows: dict[int, dict[int, _Row]], scales: list[float]) -> list[str]:
    """One row per world size: how many classes got each layout (at the first scale).

    Counted as in --layouts-only: every class whose plain run works (finite results), skipped ones not.
    """
    lines = ["| world size | " + " | ".join(LAYOUTS) + " |", "|---" * (len(LAYOUTS) + 1) + "|"]
    for world_size, rows in all_rows.items():
        counts = dict.fromkeys(LAYOUTS, 0)
        for row in rows.values():
            result = row.results[str(scales[0])]
            plain_broken = result["status"] == "ERROR" and "plain class" in result["msg"]
            if result["status"] != "SKIPPED" and not plain_broken:
                counts[_layout_of(result)] += 1
        lines.append(f"| {world_size} | " + " | ".join(str(counts[k]) for k in LAYOUTS) + " |")
    return lines


def layouts_only(only: str | None) -> int:
    """Build every runnable class once in this process (world size 1); print the layout counts."""
    from shardoptim import ShardedOptimizer

    _quiet()
    counts = dict.fromkeys(LAYOUTS, 0)
    for entry in build_catalog(only):
        if entry.cls is None:
            continue
        found = _oracle(entry, 1.0)
        if isinstance(found, str) or not all(bool(torch.isfinite(t).all()) for t in found[2]):
            continue  # the plain class does not run (or gives non-finite values): not counted, as in the sweep
        param_layout = found[0]
        try:
            opt = ShardedOptimizer(_params_for(_make_model(), param_layout), entry.cls, **entry.kwargs)
            layout = str(opt.sharding) if str(opt.sharding) in LAYOUTS else "other"
        except Exception as err:  # noqa: BLE001 - recorded
            layout = "refused" if _is_refusal(err) else "other"
        counts[layout] += 1
        print(f"{entry.name:44s} {layout}", flush=True)
    import shardoptim

    print(f"\nlayouts chosen by {Path(shardoptim.__file__).parent} over {sum(counts.values())} runnable classes:")
    print("| " + " | ".join(LAYOUTS) + " |\n" + "|---" * len(LAYOUTS) + "|")
    print("| " + " | ".join(str(counts[k]) for k in LAYOUTS) + " |")
    return 0


def details(all_rows: dict[int, dict[int, _Row]], scales: list[float]) -> list[str]:
    lines = []
    for world_size, rows in all_rows.items():
        for scale in scales:
            lines += [
                "",
                f"### world size {world_size}, gradients x{scale:g}",
                "",
                "| class | layout | status | max rel diff | mode | message |",
                "|---|---|---|---|---|---|",
            ]
            for index in sorted(rows):
                r = rows[index].results[str(scale)]
                msg = r["msg"].replace("|", "\\|")[:300]
                lines.append(
                    f"| {rows[index].name} | {r['layout']} | {r['status']} | {_fmt_diff(r['diff'])} | {r['mode']} | {msg} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--world-sizes", default="1,2,3", help="comma-separated world sizes (default 1,2,3)")
    parser.add_argument(
        "--only",
        default=None,
        help="only classes whose catalog name contains one of these comma-separated substrings (any case)",
    )
    parser.add_argument("--grad-scale", default="1,10", help="comma-separated gradient scales (default 1,10)")
    parser.add_argument(
        "--class-timeout", type=float, default=20.0, help="collective timeout per class, seconds"
    )
    parser.add_argument("--out", default=None, help="write the tables to this markdown file")
    parser.add_argument(
        "--layouts-only", action="store_true", help="only count the layouts chosen (one process, no steps compared)"
    )
    args = parser.parse_args(argv)
    if args.layouts_only:
        return layouts_only(args.only)
    world_sizes = [int(w) for w in args.world_sizes.split(",") if w]
    scales = [float(s) for s in args.grad_scale.split(",") if s]
    started = time.monotonic()
    all_rows: dict[int, dict[int, _Row]] = {}
    for world_size in world_sizes:
        t0 = time.monotonic()
        all_rows[world_size] = sweep_world_size(world_size, args, scales)
        print(f"# world size {world_size}: {time.monotonic() - t0:.0f} s", flush=True)
    table = summary(all_rows, scales) + ["", *layout_counts(all_rows, scales)]
    print("\n".join(["", *table]))
    print(f"\n# total {time.monotonic() - started:.0f} s")
    if args.out:
        head = f"torch {torch.__version__}, {STEPS} steps (loss x factor at steps {SPIKES}), rtol {RTOL:g}"
        text = ["# Catalog sweep", "", head, "", *table]
        text += details(all_rows, scales)
        Path(args.out).write_text("\n".join(text) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
