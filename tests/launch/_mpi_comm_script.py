"""Run under mpiexec by tests/launch/test_mpi_comm.py: check MpiCollectives against plain torch references.

    mpiexec -n 2 python tests/launch/_mpi_comm_script.py      # also -n 3

No torch.distributed: every rank rebuilds every rank's inputs from per-rank seeds and computes the
expected result locally. Prints "MPI_COMM_OK rank=R world_size=W" on success; any failure prints its
traceback and aborts every rank (non-zero exit).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable

import torch
from mpi4py import MPI

from shardoptim.mpi_comm import MpiCollectives

PAD = 3  # elements before bounds[0] and after bounds[-1], which must stay untouched


def layouts(world_size: int) -> list[list[int]]:
    """Rank range sizes: uneven with an empty range, larger (multi-chunk transfers), all empty."""
    return [[7, 0, 12, 5][:world_size], [300_001, 2, 150_000][:world_size], [0] * world_size]


def to_bounds(sizes: list[int]) -> list[int]:
    bounds = [PAD]
    for numel in sizes:
        bounds.append(bounds[-1] + numel)
    return bounds


def values(rank: int, numel: int, seed: int, dtype: torch.dtype, *, integer: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    if integer:
        return torch.randint(-1000, 1000, (numel,), generator=gen).to(dtype)
    return torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)


def check_all_gather(mpi: MpiCollectives, sizes: list[int], dtype: torch.dtype, seed: int) -> None:
    bounds = to_bounds(sizes)
    expected = torch.full((bounds[-1] + PAD,), -7.0, dtype=dtype)
    for r, numel in enumerate(sizes):
        expected[bounds[r] : bounds[r + 1]] = values(r, numel, seed, dtype)
    bucket = torch.full_like(expected, -7.0)
    bucket[bounds[mpi.rank] : bounds[mpi.rank + 1]] = values(mpi.rank, sizes[mpi.rank], seed, dtype)
    mpi.all_gather_bucket_(bucket, bounds)
    assert torch.equal(bucket, expected), f"rank {mpi.rank}: all_gather {dtype} {sizes} differs"


def check_reduce_scatter(mpi: MpiCollectives, sizes: list[int], dtype: torch.dtype, seed: int) -> None:
    bounds = to_bounds(sizes)
    numel = bounds[-1] + PAD
    for integer in (True, False):
        buckets = [values(r, numel, seed, dtype, integer=integer) for r in range(mpi.world_size)]
        expected = torch.stack(buckets).sum(0)[bounds[mpi.rank] : bounds[mpi.rank + 1]]
        bucket = buckets[mpi.rank].clone()
        out = torch.full((sizes[mpi.rank],), float("nan"), dtype=dtype)
        mpi.reduce_scatter_bucket_(bucket, bounds, out)
        assert torch.equal(bucket, buckets[mpi.rank]), f"rank {mpi.rank}: reduce_scatter wrote its input"
        if integer:  # sums of small integers are exact in any order
            assert torch.equal(out, expected), f"rank {mpi.rank}: {dtype} {sizes} integer sums differ"
        else:
            rtol = 1e-6 if dtype == torch.float32 else 1e-14
            torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol)


def check_rejections(mpi: MpiCollectives) -> None:
    """Bad input raises on every rank before any MPI call, so no rank is left waiting."""
    bounds = to_bounds([4] * mpi.world_size)
    numel = bounds[-1] + PAD
    mine = bounds[mpi.rank + 1] - bounds[mpi.rank]
    for dtype in (torch.bfloat16, torch.float16):
        try:
            mpi.reduce_scatter_bucket_(torch.ones(numel, dtype=dtype), bounds, torch.ones(mine, dtype=dtype))
        except TypeError as exc:
            assert "torch.distributed" in str(exc) and f"[rank {mpi.rank}/" in str(exc), exc
        else:
            raise AssertionError(f"{dtype} reduce_scatter_bucket_ did not raise TypeError")
    bucket = torch.ones(numel)
    bad_calls: dict[str, Callable[[], object]] = {
        "non-contiguous bucket": lambda: mpi.all_gather_bucket_(torch.ones(numel, 2)[:, 0], bounds),
        "short bounds": lambda: mpi.all_gather_bucket_(bucket, bounds[:-1]),
        "bounds past the end": lambda: mpi.all_gather_bucket_(bucket, [*bounds[:-1], numel + 1]),
        "wrong out numel": lambda: mpi.reduce_scatter_bucket_(bucket, bounds, torch.ones(mine + 1)),
        "out inside bucket": lambda: mpi.reduce_scatter_bucket_(
            bucket, bounds, bucket[bounds[mpi.rank] : bounds[mpi.rank + 1]]
        ),
    }
    for name, call in bad_calls.items():
        try:
            call()
        except ValueError:
            continue
        raise AssertionError(f"{name} did not raise ValueError")


def check_create(world_size: int, rank: int) -> None:
    everyone = list(range(world_size))
    assert MpiCollectives.create(rank, world_size=world_size, global_ranks=everyone, timeout_s=5) is not None
    # A subgroup, or a rank order that is not MPI's, stays on gloo.
    assert MpiCollectives.create(0, world_size=1, global_ranks=[rank], timeout_s=5) is None
    shifted = everyone[1:] + everyone[:1]
    assert MpiCollectives.create(rank, world_size=world_size, global_ranks=shifted, timeout_s=5) is None


def check_timeout(rank: int, world_size: int) -> None:
    """Rank 0 alone enters a gather with a short timeout: it must raise, not hang."""
    mpi = MpiCollectives(MPI.COMM_WORLD, timeout_s=0.3 if rank == 0 else 30.0)
    bucket = torch.zeros(world_size + 1)
    mpi.all_gather_bucket_(bucket, list(range(world_size + 1)))  # the Idup happens here, on every rank
    if rank == 0:
        try:
            mpi.all_gather_bucket_(bucket, list(range(world_size + 1)))
        except RuntimeError as exc:
            assert str(exc).startswith(f"[rank 0/{world_size}] MPI all_gather_bucket_ did not finish"), exc
        else:
            raise AssertionError("a gather without peers did not time out")
        try:
            mpi.all_gather_bucket_(bucket, list(range(world_size + 1)))
        except RuntimeError as exc:
            assert "earlier MPI collective timed out" in str(exc), exc
        else:
            raise AssertionError("a call after a timeout did not refuse to run")
    else:
        time.sleep(0.6)
        mpi.all_gather_bucket_(bucket, list(range(world_size + 1)))  # rank 0's Barrier drives it
    MPI.COMM_WORLD.Barrier()


def main() -> None:
    world_size, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    check_create(world_size, rank)
    mpi = MpiCollectives.create(rank, world_size=world_size, global_ranks=range(world_size), timeout_s=30)
    assert mpi is not None and (mpi.rank, mpi.world_size) == (rank, world_size)
    for seed, sizes in enumerate(layouts(world_size)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            check_all_gather(mpi, sizes, dtype, seed)
        for dtype in (torch.float32, torch.float64):
            check_reduce_scatter(mpi, sizes, dtype, seed)
    check_rejections(mpi)
    check_timeout(rank, world_size)
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"MPI_COMM_OK rank={rank} world_size={world_size}\n".encode())


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # NOTE: a plain exit finalises MPI cleanly and mpiexec would wait for the other ranks, which
        # then sit in a collective until their timeout; Abort stops them all at once.
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
