"""Time one AdamW step of ShardedOptimizer against torch's ZeroRedundancyOptimizer and plain AdamW.

Run from the repository root (CPU, gloo; spawns its own ranks, nothing else to launch):

    python benchmarks/step_time.py                          # N = 2 and 4, about 55M params, ~3 min
    python benchmarks/step_time.py --numel-scale 0.05 --steps 5 --world-sizes 2   # quick smoke run
    python benchmarks/step_time.py --world-sizes 2 --shape 4000x16 --steps 24 \
        --configs shardoptim "shardoptim bucket_view" "zero best" "unsharded fused"   # host overhead per tensor
    python benchmarks/step_time.py --world-sizes 2 --configs shardoptim \
        --bucket-numels 4194304 8388608 33554432 --profile --repeat 2           # bucket sweep + profile

The parameters are shaped like a small transformer: token embedding 32000 x 512 (tied head),
positions 1024 x 512, 12 blocks of width 512 (qkv, attention proj, 4x MLP, biases, two layernorms)
and a final layernorm: 54,737,920 fp32 elements (the exact count is printed). `--numel-scale s`
shrinks width, vocabulary and context by sqrt(s) for a quick run.

Every configuration runs in its own freshly spawned set of N ranks (gloo, FileStore,
OMP_NUM_THREADS=1 and torch.set_num_threads(1) in every rank), one after another:

    shardoptim             ShardedOptimizer(params, AdamW) defaults: fused, flat, parameters in their own
                           storage; on gloo with every rank on one host the parameters live in shared
                           memory every rank maps, and a gather copies each rank's range straight out
                           of its owner's parameters ("shm", shardoptim.peer_region)
    shardoptim bucket_view the same with parameters_as_bucket_view=True: parameters are views into the
                           buckets (one storage per bucket)
    shardoptim broadcast   the same with `opt.placement.comm.transports.use("broadcast")` (one gloo broadcast
                           per rank per bucket: the multi-host gloo path)
    shardoptim all_gather  the same with `opt.placement.comm.transports.use("all_gather")` (gloo's all_gather)
    zero default           ZeroRedundancyOptimizer(params, optimizer_class=AdamW)
    zero best              the same with parameters_as_bucket_view=True and fused=True
    shardoptim fused=None  the same with fused=None: AdamW picks its own kernel, as a plain AdamW(params)
                           does (single-tensor on CPU, foreach on CUDA): the numbers of the plain run
    unsharded fused        torch.optim.AdamW(fused=True) on every rank, no communication
    unsharded default      torch.optim.AdamW(params) without flags on every rank, no communication

All use lr 1e-3 and weight_decay 0.1. Each rank sets .grad once to the same fixed random tensors,
runs `--warmup` steps and then times `--steps` calls of step(), each after a barrier, with
time.perf_counter; a step's time is the max over ranks (all_reduce MAX) and the table reports the
median over steps. It prints, per world size, one markdown table with: median step ms, ratios to
ZeRO default / ZeRO best / unsharded fused, optimizer-state MiB per rank (max over ranks; every
state tensor, the 4-byte `step` scalars included), state / ideal where ideal = 8 bytes x numel / N
(exp_avg + exp_avg_sq; the `step` scalars are excluded from this ratio), peak extra RSS (max over
ranks of peak RSS minus the RSS measured right after the params and grads were built), extra PSS
(the same with the PSS after the steps: RSS counts a shared page in every rank that touched it) and step CPU
ms (median over steps of the max over ranks of the CPU time of step(), every thread of the rank
included: less sensitive than wall time to other load on the machine). Then it prints the target
check lines for N = 2 (shardoptim <= 0.35x ZeRO default, <= 0.8x ZeRO best, state within 0.1% of
total / N on every rank) and exits with status 1 if one fails.

`--bucket-numels` adds one row per bucket size for each shardoptim configuration in `--configs`
(or for plain "shardoptim" when none is). `--repeat R` runs the whole sequence R times,
interleaved, pools the timed steps of each row and adds a column of the per-run medians (the spread
shows the noise). `--profile` adds, after the timed steps of every shardoptim run and in the same
ranks, a breakdown of its step by phase on each rank (hparam sync, local update, gather issue,
gather wait, other; the shared-memory gather is synchronous, so it shows under "gather issue"), and
the local update and the gather of all buckets, each timed alone and one after the other, with
their CPU and kernel CPU time.

The machine is shared: read the load average printed at the top, and run twice to see the noise.
"""

from __future__ import annotations

import os

# NOTE: before torch is imported, here and in every spawned rank (they re-import this file).
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):
    # NOTE: run as a script: make `shardoptim` (repo root) and `_bench` (this folder) importable.
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _bench import current_rss_nbytes, markdown_table, peak_rss_nbytes, pss_nbytes, run_fresh_ranks  # noqa: E402
from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402

import shardoptim  # noqa: E402
import shardoptim.stepping as so_stepping  # noqa: E402
from shardoptim.gather_queue import gather_all  # noqa: E402

LR = 1e-3
WEIGHT_DECAY = 0.1
MIB = 1 << 20
CONFIGS = (
    "shardoptim",
    "shardoptim bucket_view",
    "shardoptim broadcast",
    "shardoptim all_gather",
    "shardoptim fused=None",
    "zero default",
    "zero best",
    "unsharded fused",
    "unsharded default",
)
TARGET_VS_ZERO_DEFAULT = 0.35
TARGET_VS_ZERO_BEST = 0.8
TARGET_STATE_TOL = 1e-3


def transformer_shapes(scale: float = 1.0) -> list[tuple[int, ...]]:
    """Return the parameter shapes of a small GPT-like model, in model.parameters() order.

    At scale 1: vocab 32000, context 1024, width 512, 12 blocks, MLP 4x; the head is tied to the
    token embedding. `scale` multiplies width, vocabulary and context by sqrt(scale).
    """
    factor = math.sqrt(scale)
    d = max(16, round(512 * factor / 16) * 16)
    vocab = max(16, round(32000 * factor))
    context = max(16, round(1024 * factor))
    shapes: list[tuple[int, ...]] = [(vocab, d), (context, d)]
    for _ in range(12):
        shapes += [
            (d,), (d,),  # ln_1 weight, bias
            (3 * d, d), (3 * d,),  # attn qkv
            (d, d), (d,),  # attn proj
            (d,), (d,),  # ln_2 weight, bias
            (4 * d, d), (4 * d,),  # mlp fc
            (d, 4 * d), (d,),  # mlp proj
        ]  # fmt: skip
    shapes += [(d,), (d,)]  # ln_f weight, bias
    return shapes


#: --shape: the transformer above, or many equal 1-D tensors ("COUNTxNUMEL"): the host overhead
#: per tensor shows where there is little to compute (300 x 16 is a Llama-8B's tensor count).
SHAPES = ("transformer", "300x16", "4000x16", "4000x2500")


def param_shapes(shape: str, scale: float) -> list[tuple[int, ...]]:
    """Return the shapes for --shape (the transformer's scaled by `scale`)."""
    if shape == "transformer":
        return transformer_shapes(scale)
    count, numel = (int(v) for v in shape.split("x"))
    return [(numel,)] * count


def _label(config: str, bucket_numel: int | None) -> str:
    if bucket_numel is None:
        return config
    exp = math.log2(bucket_numel)
    return f"{config} bucket 2^{exp:.0f}" if exp.is_integer() else f"{config} bucket {bucket_numel}"


# ------------------------------------------------------------------------------------------ ranks


def _build(config: str, params: list[torch.nn.Parameter], bucket_numel: int | None) -> Any:
    kw: dict[str, Any] = {"lr": LR, "weight_decay": WEIGHT_DECAY}
    if config.startswith("shardoptim"):
        if bucket_numel is not None:
            kw["bucket_numel"] = bucket_numel
        if config == "shardoptim fused=None":  # the kernel plain AdamW(params) picks: reproduces a plain run
            return shardoptim.ShardedOptimizer(params, torch.optim.AdamW, fused=None, **kw)
        if config == "shardoptim bucket_view":
            return shardoptim.ShardedOptimizer(params, torch.optim.AdamW, parameters_as_bucket_view=True, **kw)
        opt = shardoptim.ShardedOptimizer(params, torch.optim.AdamW, **kw)
        if config != "shardoptim":
            opt.placement.comm.transports.use(config.split()[1])  # type: ignore[arg-type]  # the gloo path to compare
        return opt
    if config == "zero default":
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kw)
    if config == "zero best":
        return ZeroRedundancyOptimizer(
            params, optimizer_class=torch.optim.AdamW, parameters_as_bucket_view=True, fused=True, **kw
        )
    if config == "unsharded fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if config == "unsharded default":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"unknown config {config!r}; choose from {CONFIGS}")


def _state_nbytes(states: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """Return (bytes of all state tensors, bytes of the 0-d ones such as `step`)."""
    total = scalars = 0
    for state in states:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                nbytes = value.numel() * value.element_size()
                total += nbytes
                if value.dim() == 0:
                    scalars += nbytes
    return total, scalars


def _local_state(config: str, opt: Any) -> tuple[int, int]:
    if config.startswith("shardoptim"):
        _, scalars = _state_nbytes(opt.optim.state.values())
        return opt.local_state_nbytes(), scalars
    if config.startswith("zero"):
        return _state_nbytes(opt.optim.state.values())
    return _state_nbytes(opt.state.values())


def _max_over_ranks(*values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(v) for v in t]


def _timed_steps(step: Callable[[], Any], *, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Call step() warmup + steps times, each after a barrier.

    Collective. Returns, for the timed calls, the wall seconds and the CPU seconds (every thread of
    the process, gloo's included), each the max over ranks; the same lists on every rank.
    """
    walls, cpus = [], []
    for i in range(warmup + steps):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        wall, cpu = _max_over_ranks(time.perf_counter() - wall, time.process_time() - cpu)
        if i >= warmup:
            walls.append(wall)
            cpus.append(cpu)
    return walls, cpus


class _Phases:
    """Accumulates wall seconds per named phase; `wrap` times every call of a function."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


def _instrument(opt: shardoptim.ShardedOptimizer, phases: _Phases) -> None:
    """Time the phases of opt.step() by wrapping what it calls (benchmark only; private names).

    The local update (`opt.optim.step`) and the gather (`opt.placement.comm.gather_bucket_async` and the
    handles' `wait`) are always timed; the smaller phases only where the hook is found, since the
    library's internals change. What is not wrapped is reported as "other".
    """
    optional = [
        (so_stepping, "copy_hparams_", "hparam sync"),
        (opt._stepper.ctx.hparams, "sync_", "hparam sync"),
        (opt.placement, "settle_", "storage check"),
        (opt._stepper, "attach_grads", "attach grads"),
        (opt._stepper, "clear_grads", "attach grads"),
        (opt.placement.comm, "gather_buckets_", "gather (batched rounds)"),
    ]
    for obj, attr, name in optional:
        if obj is not None and callable(getattr(obj, attr, None)):
            setattr(obj, attr, phases.wrap(name, getattr(obj, attr)))
    opt.optim.step = phases.wrap("local update", opt.optim.step)  # type: ignore[method-assign]
    issue = opt.placement.comm.gather_bucket_async

    def gather_bucket_async(*args: Any, **kwargs: Any) -> Any:
        handle = phases.wrap("gather issue", issue)(*args, **kwargs)
        handle.wait = phases.wrap("gather wait", handle.wait)
        return handle

    opt.placement.comm.gather_bucket_async = gather_bucket_async  # type: ignore[method-assign]


def _wall_cpu_sys(fn: Callable[[], Any], *, warmup: int, steps: int) -> tuple[float, float, float]:
    """Return the median wall, CPU and system-CPU seconds of fn() on this rank (all its threads)."""
    samples = []
    for i in range(warmup + steps):
        dist.barrier()
        wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        fn()
        wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
        if i >= warmup:
            sys_s = after.ru_stime - before.ru_stime
            samples.append((wall, after.ru_utime - before.ru_utime + sys_s, sys_s))
    return tuple(statistics.median(s[k] for s in samples) for k in range(3))  # type: ignore[return-value]


def _profile(opt: shardoptim.ShardedOptimizer, *, warmup: int, steps: int) -> dict[str, float]:
    """Return per-phase median ms of opt.step() on this rank, and its parts timed alone.

    "alone" rows time the local update of all buckets in one call and the gather of all buckets
    (no update), each by itself; "serial" runs them one after the other (update everything, then
    gather everything, as ZeroRedundancyOptimizer does), to compare with the bucketed overlap of
    step(). CPU ms counts every thread of the process (the gloo threads included).
    """
    active = [True] * len(opt.placement.buckets)

    def update_only() -> None:
        with torch.no_grad():
            hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
            opt._stepper.attach_grads(active, None, hidden)  # type: ignore[attr-defined]
            opt.optim.step()
            opt._stepper.clear_grads(hidden)  # type: ignore[attr-defined]

    def gather_only() -> None:
        gather_all(opt.placement)  # own storage: into scratch buckets, then copied out into the parameters

    def serial() -> None:
        update_only()
        gather_only()

    out: dict[str, float] = {}
    for name, fn in (
        ("step()", opt.step),
        ("alone: local update, all buckets in one call", update_only),
        ("alone: gather, all buckets", gather_only),
        ("serial: update all, then gather all", serial),
    ):
        wall, cpu, sys_s = _wall_cpu_sys(fn, warmup=1, steps=steps)
        out[f"{name}: wall"], out[f"{name}: CPU"], out[f"{name}: CPU in kernel"] = wall, cpu, sys_s
    phases = _Phases()
    _instrument(opt, phases)
    per_step: dict[str, list[float]] = defaultdict(list)
    for i in range(warmup + steps):
        dist.barrier()
        phases.seconds.clear()
        start = time.perf_counter()
        opt.step()
        total = time.perf_counter() - start
        if i >= warmup:
            per_step["instrumented step() wall"].append(total)
            for name, seconds in phases.seconds.items():
                per_step[f"  {name}"].append(seconds)
            per_step["  other"].append(total - sum(phases.seconds.values()))
    out.update({name: statistics.median(values) for name, values in per_step.items()})
    return {name: seconds * 1e3 for name, seconds in out.items()}


def _bench_rank(
    rank: int,
    world_size: int,
    *,
    config: str,
    shape: str,
    scale: float,
    warmup: int,
    steps: int,
    bucket_numel: int | None,
    profile: bool,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    shapes = param_shapes(shape, scale)
    gen = torch.Generator().manual_seed(0)
    # NOTE: filled in place, so building them leaves no freed temporaries behind that would
    # count in the peak RSS but not in the baseline.
    params = [torch.nn.Parameter(torch.empty(s).normal_(0.0, 0.02, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.empty(p.shape).normal_(generator=gen)
    rss_base, pss_base = current_rss_nbytes(), pss_nbytes()
    opt = _build(config, params, bucket_numel)
    times, cpu_times = _timed_steps(opt.step, warmup=warmup, steps=steps)
    rss_extra = peak_rss_nbytes() - rss_base
    pss_extra = pss_nbytes() - pss_base
    state, scalars = _local_state(config, opt)
    with torch.no_grad():
        checksum = sum(float(p.sum(dtype=torch.float64)) for p in params)
    result: dict[str, Any] = {
        "times": times,
        "cpu_times": cpu_times,
        "state_nbytes": state,
        "scalar_nbytes": scalars,
        "rss_extra_nbytes": rss_extra,
        "pss_extra_nbytes": pss_extra,
        "checksum": checksum,
        "num_buckets": len(opt.placement.buckets) if config.startswith("shardoptim") else None,
    }
    if profile:
        result["profile_ms"] = _profile(opt, warmup=warmup, steps=steps)
    return result


# ------------------------------------------------------------------------------------------ driver


def _run(args: argparse.Namespace, config: str, world_size: int, bucket_numel: int | None) -> dict[str, Any]:
    start = time.perf_counter()
    profile = args.profile and config.startswith("shardoptim")
    per_rank = run_fresh_ranks(
        _bench_rank,
        world_size=world_size,
        kwargs={
            "config": config,
            "shape": args.shape,
            "scale": args.numel_scale,
            "warmup": args.warmup,
            "steps": args.steps,
            "bucket_numel": bucket_numel,
            "profile": profile,
        },
    )
    checksums = {r["checksum"] for r in per_rank}
    if len(checksums) != 1:
        print(f"WARNING: {config} at N={world_size}: parameters differ across ranks: {sorted(checksums)}")
    label = _label(config, bucket_numel)
    print(
        f"  {label:<30} N={world_size}: median {statistics.median(per_rank[0]['times']) * 1e3:8.1f} ms "
        f"(CPU {statistics.median(per_rank[0]['cpu_times']) * 1e3:.1f} ms; {time.perf_counter() - start:.1f} s "
        f"wall, load average {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return {"label": label, "config": config, "per_rank": per_rank}


def _summarise(
    runs: list[dict[str, Any]], *, world_size: int, numel: int, num_tensors: int
) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    """Pool the runs of each label (repeats): median over all their timed steps, worst memory."""
    ideal = 8 * numel / world_size
    label_to_runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        label_to_runs[run["label"]].append(run)
    by_label: dict[str, dict[str, Any]] = {}
    for label, same in label_to_runs.items():
        ranks = [r for run in same for r in run["per_rank"]]
        moments = [r["state_nbytes"] - r["scalar_nbytes"] for r in ranks]
        by_label[label] = {
            "ms": statistics.median(t for run in same for t in run["per_rank"][0]["times"]) * 1e3,
            "run_ms": [statistics.median(run["per_rank"][0]["times"]) * 1e3 for run in same],
            "cpu_ms": statistics.median(t for run in same for t in run["per_rank"][0]["cpu_times"]) * 1e3,
            "state_mib": max(r["state_nbytes"] for r in ranks) / MIB,
            "ratio_max": max(moments) / ideal,
            "ratio_min": min(moments) / ideal,
            "rss_mib": max(r["rss_extra_nbytes"] for r in ranks) / MIB,
            "pss_mib": max(r["pss_extra_nbytes"] for r in ranks) / MIB,
        }
    refs = [by_label.get(name, {}).get("ms") for name in ("zero default", "zero best", "unsharded fused")]
    repeated = any(len(s["run_ms"]) > 1 for s in by_label.values())
    rows = []
    for label, s in by_label.items():
        row = [
            label,
            f"{s['ms']:.1f}",
            *(f"{s['ms'] / ref:.2f}x" if ref else "-" for ref in refs),
            f"{s['state_mib']:.1f}",
            f"{s['ratio_max']:.4f}",
            f"{s['rss_mib']:.0f}",
            f"{s['pss_mib']:.0f}",
            f"{s['cpu_ms']:.1f}",
            f"{s['ms'] / num_tensors:.4f}",
        ]
        if repeated:
            row.append(" ".join(f"{ms:.0f}" for ms in s["run_ms"]))
        rows.append(row)
    return rows, by_label


def _check_targets(by_label: dict[str, dict[str, float]]) -> bool:
    so = by_label.get("shardoptim")
    if so is None:
        print("targets (N=2): no 'shardoptim' row; nothing to check")
        return True
    ok = True
    for ref, target in (("zero default", TARGET_VS_ZERO_DEFAULT), ("zero best", TARGET_VS_ZERO_BEST)):
        if ref in by_label:
            ratio = so["ms"] / by_label[ref]["ms"]
            passed = ratio <= target
            ok &= passed
            print(
                f"target N=2: shardoptim {so['ms']:.1f} ms = {ratio:.3f}x {ref} {by_label[ref]['ms']:.1f} ms "
                f"(<= {target}x): {'PASS' if passed else 'FAIL'}"
            )
    worst = max(abs(so["ratio_max"] - 1), abs(so["ratio_min"] - 1))
    passed = worst <= TARGET_STATE_TOL
    ok &= passed
    print(
        f"target N=2: shardoptim state / (total/N) = {so['ratio_min']:.6f} .. {so['ratio_max']:.6f} over ranks "
        f"(exp_avg + exp_avg_sq; 4-byte step scalars excluded), within {TARGET_STATE_TOL:.1%}: "
        f"{'PASS' if passed else 'FAIL'}"
    )
    return ok


def _print_profile(runs: list[dict[str, Any]], world_size: int) -> None:
    for run in runs:
        if "profile_ms" not in run["per_rank"][0]:
            continue
        names = list(run["per_rank"][0]["profile_ms"])
        rows = [[name, *(f"{r['profile_ms'].get(name, 0.0):.1f}" for r in run["per_rank"])] for name in names]
        print(
            f"\nProfile of {run['label']}, N={world_size} ({run['per_rank'][0]['num_buckets']} buckets), "
            "median ms per step on each rank (after the timed steps, same ranks):\n"
        )
        print(markdown_table(["phase", *(f"rank {r}" for r in range(world_size))], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4], help="N values (default 2 4)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument(
        "--numel-scale", type=float, default=1.0, help="shrink the model, e.g. 0.05 (default 1)"
    )
    parser.add_argument(
        "--shape", default="transformer", choices=SHAPES, help="the transformer, or COUNT equal tensors of NUMEL"
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="subset to run")
    parser.add_argument(
        "--bucket-numels", type=int, nargs="*", default=[], help="extra shardoptim rows, one per bucket_numel"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add a phase breakdown of every shardoptim run (after its timing)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the whole sequence R times, interleaved; pool the steps"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.numel_scale <= 0 or args.repeat < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --numel-scale > 0 and --repeat >= 1")

    shapes = param_shapes(args.shape, args.numel_scale)
    numel = sum(math.prod(s) for s in shapes)
    print(
        f"# step_time: AdamW(lr={LR}, weight_decay={WEIGHT_DECAY}) on {numel:,} fp32 params "
        f"({len(shapes)} tensors, {numel * 4 / MIB:.1f} MiB), torch {torch.__version__}, gloo, "
        f"OMP_NUM_THREADS=1, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# {args.warmup} warm-up + {args.steps} timed steps; each configuration in fresh ranks; "
        f"default bucket_numel {shardoptim.DEFAULT_BUCKET_NUMEL:,}\n",
        flush=True,
    )
    headers = [
        "config",
        "median step ms",
        "vs ZeRO default",
        "vs ZeRO best",
        "vs unsharded fused",
        "state MiB per rank (max)",
        "state / (total/N)",
        "peak extra RSS MiB",
        "extra PSS MiB",
        "step CPU ms per rank",
        "ms per tensor",
    ]
    ok = True
    for world_size in args.world_sizes:
        print(f"Running N={world_size} ...", flush=True)
        runs = []
        for _ in range(args.repeat):
            runs += [_run(args, c, world_size, None) for c in args.configs]
            swept = [c for c in args.configs if c.startswith("shardoptim")] or ["shardoptim"]
            runs += [_run(args, c, world_size, b) for c in swept for b in args.bucket_numels]
        rows, by_label = _summarise(runs, world_size=world_size, numel=numel, num_tensors=len(shapes))
        print(f"\n## N={world_size}, {args.shape}: {numel:,} params, load average {os.getloadavg()[0]:.2f}\n")
        print(markdown_table(headers + (["per-run medians ms"] if args.repeat > 1 else []), rows))
        print(
            "\nstate MiB: every state tensor on the rank (for shardoptim, opt.local_state_nbytes()), max over "
            "ranks; state / (total/N): exp_avg + exp_avg_sq bytes (max over ranks) / (8 B x numel / N); "
            "peak extra RSS: max over ranks of ru_maxrss minus RSS after params + grads were built (it counts "
            "every shared page a rank touched: with one-copy gathers, the other ranks' ranges of the parameters); "
            "extra PSS: max over ranks of the PSS after the steps minus the PSS then (shared pages split among "
            "the ranks that map them: what the host holds); step CPU: "
            "median over steps of the max over ranks of the CPU time of step() (all threads of the rank, "
            "gloo's included; less sensitive than wall time to other load on the machine)."
        )
        if args.profile:
            _print_profile(runs, world_size)
        print()
        if world_size == 2 and args.shape == "transformer":
            ok &= _check_targets(by_label)
            print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
