"""Time the flat CPU bucket collectives: gloo (torch.distributed) against shardoptim.mpi_comm (mpi4py).

Run from the repository root under an MPI launcher (the MPICH from pip works:
`pip install --only-binary=:all: mpi4py mpich`):

    mpiexec -n 2 python benchmarks/comm.py                 # 100 MiB fp32 bucket, ~30 s
    launch/mpirun.sh 2 benchmarks/comm.py --mib 16          # the same through the repo's launcher script
    mpiexec -n 2 python benchmarks/comm.py --mib 1 --reps 5 --warmup 1     # quick smoke run

shardoptim.init_distributed() creates the gloo group (rank 0's TCPStore address goes out through
mpi4py) and MpiCollectives.create() the MPI path over the same ranks. The bucket is
`--mib` MiB of float32 cut into world_size near-equal ranges (padded to a multiple of world_size, as
gloo's all_gather needs equal ranges). Operations, each timed as: barrier, time.perf_counter around
the call, max over ranks (MPI Allreduce MAX); the table reports the median over `--reps` after
`--warmup` untimed calls:

    gloo all_gather_single        one in-place dist.all_gather_single (before torch 2.13:
                                  all_gather_into_tensor)
    gloo broadcasts               one async dist.broadcast per rank from the owner into its range
    shardoptim shared memory      Comm's /dev/shm staging path (what comm_backend="auto" times MPI
                                  against on one host), as gather and as reduce-scatter
    MPI all_gather_bucket_        MpiCollectives.all_gather_bucket_ (Iallgatherv IN_PLACE, polled)
    mpi4py Allgatherv (blocking)  the raw blocking mpi4py call, to show the cost of polling for a timeout
    gloo reduce_scatter           dist.reduce_scatter_single (reduce_scatter_tensor before torch 2.13),
                                  else one dist.reduce per rank if gloo rejects it
    MPI reduce_scatter_bucket_    MpiCollectives.reduce_scatter_bucket_ (Ireduce_scatter, polled)
    mpi4py Reduce_scatter (blocking)  the raw blocking mpi4py call

"vs gloo" divides by the gloo all_gather_single row (gathers) or the gloo reduce_scatter row
(reductions). Rank 0 prints one markdown table. OMP_NUM_THREADS=1 and torch.set_num_threads(1).
"""

from __future__ import annotations

import os

# NOTE: before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):
    # NOTE: run as a script: make `shardoptim` (repo root) and `_bench` (this folder) importable.
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _bench import markdown_table  # noqa: E402

from shardoptim import init_distributed  # noqa: E402
from shardoptim.comm import Comm  # noqa: E402
from shardoptim.mpi_comm import MpiCollectives  # noqa: E402

MiB = 1 << 20
# NOTE: torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single (the old names warn).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _time_op(fn: Callable[[], None], *, reps: int, warmup: int, mpi_world: Any) -> float:
    """Return the median over reps of the max over ranks of one call, in ms. Collective."""
    from mpi4py import MPI

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(mpi_world.allreduce(elapsed, op=MPI.MAX) * 1e3)
    return float(statistics.median(times))


def _gloo_reduce_scatter(
    bucket: torch.Tensor, bounds: list[int], out: torch.Tensor
) -> tuple[str, Callable[[], None]]:
    """Pick gloo's reduce-scatter: the single-tensor call if gloo runs it, else one reduce per rank."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        _reduce_scatter_single(out, bucket)
        ok = torch.tensor([1])
    except (RuntimeError, NotImplementedError, ValueError):
        ok = torch.tensor([0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # the same choice on every rank
    if int(ok) == 1:
        return f"gloo {_reduce_scatter_single.__name__}", lambda: _reduce_scatter_single(out, bucket)

    def per_rank_reduce() -> None:
        works = [
            dist.reduce(bucket[bounds[r] : bounds[r + 1]], dst=r, async_op=True) for r in range(world_size)
        ]
        for work in works:
            assert work is not None
            work.wait()
        out.copy_(bucket[bounds[rank] : bounds[rank + 1]])

    return "gloo reduce per rank", per_rank_reduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mib", type=float, default=100.0, help="bucket size in MiB of float32 (default 100)"
    )
    parser.add_argument("--reps", type=int, default=15, help="timed calls per operation (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo")
    rank, world_size = info.rank, info.world_size
    mpi = MpiCollectives.create(
        rank, world_size=world_size, global_ranks=list(range(world_size)), timeout_s=600.0
    )
    if mpi is None:
        raise RuntimeError(
            f"[rank {rank}/{world_size}] MpiCollectives.create() returned None: start this script with "
            "mpiexec -n 2 python benchmarks/comm.py (mpi4py and an MPI launcher are needed)"
        )
    from mpi4py import MPI

    mpi_world = MPI.COMM_WORLD.Dup()
    numel = int(args.mib * MiB) // 4 // world_size * world_size
    shard = numel // world_size
    bounds = [r * shard for r in range(world_size + 1)]
    bucket = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
    mine = bucket[bounds[rank] : bounds[rank + 1]]
    out = torch.empty(shard)

    def gloo_broadcasts() -> None:
        works = [
            dist.broadcast(bucket[bounds[r] : bounds[r + 1]], src=r, async_op=True) for r in range(world_size)
        ]
        for work in works:
            assert work is not None
            work.wait()

    # shardoptim's own torch-side path on one host: the /dev/shm staging buffer (what comm_backend="auto"
    # times MPI against); comm_backend="torch" keeps MPI out of it.
    comm = Comm(backend_choice="torch")
    comm.transports.use("shm")

    def shm_gather() -> None:
        comm.gather_bucket_async(bucket, bounds, what="benchmark gather").wait()

    def shm_reduce_scatter() -> None:
        comm.reduce_scatter_mean_async(bucket, bounds, out, accumulate=False, what="benchmark reduce-scatter").wait()

    recv_spec = [bucket.numpy(), [shard] * world_size, bounds[:-1], MPI.FLOAT]
    reduce_name, gloo_reduce = _gloo_reduce_scatter(bucket, bounds, out)
    gathers: list[tuple[str, Callable[[], None]]] = [
        (f"gloo {_all_gather_single.__name__}", lambda: _all_gather_single(bucket, mine)),
        ("gloo broadcasts", gloo_broadcasts),
        ("shardoptim shared memory (gloo group)", shm_gather),
        ("MPI all_gather_bucket_", lambda: mpi.all_gather_bucket_(bucket, bounds)),
        ("mpi4py Allgatherv (blocking)", lambda: mpi_world.Allgatherv(MPI.IN_PLACE, recv_spec)),
    ]
    reductions: list[tuple[str, Callable[[], None]]] = [
        (reduce_name, gloo_reduce),
        ("shardoptim shared memory (gloo group)", shm_reduce_scatter),
        ("MPI reduce_scatter_bucket_", lambda: mpi.reduce_scatter_bucket_(bucket, bounds, out)),
        (
            "mpi4py Reduce_scatter (blocking)",
            lambda: mpi_world.Reduce_scatter(bucket.numpy(), out.numpy(), [shard] * world_size),
        ),
    ]
    rows = []
    for group in (gathers, reductions):
        base = None
        for name, fn in group:
            median_ms = _time_op(fn, reps=args.reps, warmup=args.warmup, mpi_world=mpi_world)
            base = median_ms if base is None else base
            rows.append([name, f"{median_ms:.1f}", f"{median_ms / base:.2f}x"])
    if rank == 0:
        print(
            f"{world_size} ranks, {numel * 4 / MiB:.1f} MiB float32 bucket, median of {args.reps} "
            f"(after {args.warmup} warm-ups), max over ranks; torch {torch.__version__}, "
            f"{MPI.Get_library_version().splitlines()[0].strip()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}\n"
        )
        print(markdown_table(["operation", "median ms", "vs gloo"], rows), flush=True)
    mpi_world.Free()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
