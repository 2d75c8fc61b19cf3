"""Checkpoint benchmark: consolidation time and memory, sharded save/load, vs ZeroRedundancyOptimizer.

Run:  python benchmarks/checkpoint.py [--world-sizes 2 4] [--numel-scale 1.0]

For about 50M fp32 parameters of AdamW state (shaped like a small transformer), on gloo with
OMP_NUM_THREADS=1, each configuration in freshly spawned ranks, it prints per world size:
- consolidate_state_dict(to=0) time for shardoptim and for torch's ZeroRedundancyOptimizer, and the
  peak extra resident memory during it on the receiving rank and on the sending ranks (VmHWM reset
  through /proc/self/clear_refs just before);
- torch.save of the consolidated dict on rank 0, fsynced and renamed into place like the sharded
  save (the "consolidated save");
- shardoptim.checkpoint.save (sharded, every rank writes its part in parallel) and load times.
Medians over --repeats runs inside one process set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import current_rss_nbytes, markdown_table, run_fresh_ranks  # noqa: E402

from shardoptim import DEFAULT_BUCKET_NUMEL, ShardedOptimizer, checkpoint  # noqa: E402

MiB = 1 << 20


def _shapes(scale: float) -> list[tuple[int, ...]]:
    d, vocab, layers = 512, int(32000 * scale) or 1, max(1, round(12 * scale))
    shapes: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (4 * d, d),
            (4 * d,),
            (d, 4 * d),
            (d,),
        ]
    return shapes + [(d,), (d,)]


def _params(scale: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in _shapes(scale)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_nbytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _timed_extra(fn: Any) -> tuple[float, float, Any]:
    """Run fn after a barrier; return (max seconds over ranks, extra peak MiB on this rank, result)."""
    dist.barrier()
    before = current_rss_nbytes()
    _reset_peak()
    start = time.perf_counter()
    result = fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    extra = (_peak_nbytes() - before) / MiB
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item()), extra, result


def _bench_shardoptim(rank: int, world_size: int, *, scale: float, repeats: int, tmp: str) -> dict[str, Any]:
    params = _params(scale)
    opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    opt.step()
    out: dict[str, list[float]] = {"consolidate": [], "extra": [], "save_full": [], "save": [], "load": []}
    path = Path(tmp) / "sharded"
    full_path = Path(tmp) / "full.pt"

    def save_full() -> None:
        # The same durability as checkpoint.save: write a temporary file, fsync it, rename it.
        if rank == 0:
            tmp_path = full_path.with_suffix(".partial")
            with open(tmp_path, "wb") as handle:
                torch.save(opt.state_dict(), handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_path, full_path)

    for _ in range(repeats):
        seconds, extra, _ = _timed_extra(lambda: opt.consolidate_state_dict(to=0))
        out["consolidate"].append(seconds)
        out["extra"].append(extra)
        out["save_full"].append(_timed_extra(save_full)[0])
        opt.placement.invalidate()
        out["save"].append(_timed_extra(lambda: checkpoint.save(path, opt))[0])
        out["load"].append(_timed_extra(lambda: checkpoint.load(path, opt))[0])
    state_mib = opt.local_state_nbytes() / MiB
    return {"rank": rank, "state_mib": state_mib, **{k: statistics.median(v) for k, v in out.items()}}


def _bench_zero(rank: int, world_size: int, *, scale: float, repeats: int, tmp: str) -> dict[str, Any]:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = _params(scale)
    opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    opt.step()
    times, extras = [], []
    for _ in range(repeats):
        seconds, extra, _ = _timed_extra(lambda: opt.consolidate_state_dict(to=0))
        times.append(seconds)
        extras.append(extra)
    return {"rank": rank, "consolidate": statistics.median(times), "extra": statistics.median(extras)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--numel-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    numel = sum(torch.Size(s).numel() for s in _shapes(args.numel_scale))
    print(
        f"# checkpoint benchmark: {numel:,} fp32 parameters, AdamW state {8 * numel / MiB:,.0f} MiB total\n"
    )
    ok = True
    for world_size in args.world_sizes:
        with tempfile.TemporaryDirectory(prefix="shardoptim_ckpt_") as tmp:
            kw = {"scale": args.numel_scale, "repeats": args.repeats, "tmp": tmp}
            mine = run_fresh_ranks(_bench_shardoptim, world_size=world_size, kwargs=kw)
            shutil.rmtree(Path(tmp) / "sharded", ignore_errors=True)
            zero = run_fresh_ranks(_bench_zero, world_size=world_size, kwargs={**kw, "repeats": 1})
        send_extra = max(r["extra"] for r in mine[1:])
        zero_send_extra = max(r["extra"] for r in zero[1:])
        bucket_mib = 4 * DEFAULT_BUCKET_NUMEL / MiB
        rows = [
            [
                "shardoptim consolidate_state_dict",
                f"{mine[0]['consolidate']:.3f}",
                f"{mine[0]['extra']:.0f}",
                f"{send_extra:.0f}",
            ],
            [
                "ZeroRedundancyOptimizer consolidate_state_dict",
                f"{zero[0]['consolidate']:.3f}",
                f"{zero[0]['extra']:.0f}",
                f"{zero_send_extra:.0f}",
            ],
            ["consolidated save (torch.save + fsync + rename on rank 0)", f"{mine[0]['save_full']:.3f}", "", ""],
            ["shardoptim.checkpoint.save (sharded, parallel)", f"{mine[0]['save']:.3f}", "", ""],
            ["shardoptim.checkpoint.load (sharded)", f"{mine[0]['load']:.3f}", "", ""],
        ]
        print(f"## {world_size} ranks (state per rank {mine[0]['state_mib']:.0f} MiB)\n")
        print(
            markdown_table(["operation", "median s", "extra peak MiB rank 0", "extra peak MiB senders"], rows)
        )
        speedup = zero[0]["consolidate"] / mine[0]["consolidate"]
        checks = [
            (
                f"consolidation {speedup:.1f}x faster than ZeroRedundancyOptimizer (target >= 20x)",
                speedup >= 20,
            ),
            (
                f"sender extra peak {send_extra:.0f} MiB <= one bucket ({bucket_mib:.0f} MiB)",
                send_extra <= bucket_mib,
            ),
            (
                f"sharded save {mine[0]['save']:.3f} s <= consolidation + consolidated save "
                f"{mine[0]['consolidate'] + mine[0]['save_full']:.3f} s",
                mine[0]["save"] <= mine[0]["consolidate"] + mine[0]["save_full"],
            ),
        ]
        print()
        for text, passed in checks:
            ok &= passed
            print(f"- [{'x' if passed else ' '}] {text}")
        print()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
