"""Tests of the multi-process harness itself (tests/_dist.py): results, errors, hangs, dead workers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests._dist import RankPool, all_equal_across_ranks, run_ranks

_HANG_TIMEOUT_S = 8.0


@pytest.fixture(scope="module")
def short_pool() -> Iterator[RankPool]:
    """A private 2-rank pool with short deadlines, for the tests that kill it on purpose."""
    pool = RankPool(2, timeout_s=_HANG_TIMEOUT_S, error_grace_s=1.0)
    yield pool
    pool.close()


# Rank functions: module level so they pickle by reference ----------------------------------------------


def _check_values(rank: int, world_size: int, *, scale: int) -> dict[str, Any]:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {
        "value": rank * scale,
        "sum": t.item(),
        "world_size": world_size,
        "dist_rank": dist.get_rank(),
        "backend": dist.get_backend(),
        "pid": os.getpid(),
        "num_threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }


def _raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom from rank 1")
    return rank


def _raise_on_rank1_before_collective(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 skips the all_reduce")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that never comes


def _hang_on_rank0(rank: int, world_size: int) -> int:
    if rank == 0:
        # Rank 1 never joins; the explicit 60 s makes the pool deadline, not gloo's, fire first.
        dist.monitored_barrier(timeout=timedelta(seconds=60))
    return rank


def _exit_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def _check_all_equal(rank: int, world_size: int) -> dict[str, bool]:
    same = torch.arange(5, dtype=torch.float32)
    nan = torch.tensor([float("nan"), 1.0])
    return {
        "same": all_equal_across_ranks(same),
        "same_bf16": all_equal_across_ranks(same.to(torch.bfloat16)),
        "same_bool": all_equal_across_ranks(same > 2),
        "nan": all_equal_across_ranks(nan),
        "scalar": all_equal_across_ranks(torch.tensor(3.0)),
        "empty": all_equal_across_ranks(torch.empty(0, 3)),
        "differs": all_equal_across_ranks(same + rank),
        "one_ulp": all_equal_across_ranks(torch.nextafter(same, same + rank)),
        "signed_zero": all_equal_across_ranks(torch.tensor([0.0 if rank == 0 else -0.0])),
        "shape": all_equal_across_ranks(torch.zeros(2 + rank)),
        "dtype": all_equal_across_ranks(torch.zeros(2, dtype=torch.float32 if rank == 0 else torch.float64)),
    }


# Tests -----------------------------------------------------------------------------------------------


def test_run_returns_per_rank_results(ranks2: RankPool) -> None:
    results = ranks2.run(_check_values, scale=10)
    assert [r["value"] for r in results] == [0, 10]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert [r["dist_rank"] for r in results] == [0, 1]
    assert {r["world_size"] for r in results} == {2}
    assert {r["backend"] for r in results} == {"gloo"}
    assert {r["num_threads"] for r in results} == {1}
    assert {r["omp"] for r in results} == {"1"}
    pids = [r["pid"] for r in results]
    assert pids == ranks2.pids and len(set(pids)) == 2 and os.getpid() not in pids
    # The same workers run the next task.
    assert [r["pid"] for r in ranks2.run(_check_values, scale=1)] == pids


def test_rank_error_reports_traceback_and_pool_survives(ranks2: RankPool) -> None:
    pids = [r["pid"] for r in ranks2.run(_check_values, scale=1)]
    with pytest.raises(AssertionError, match=r"\[rank 1\] Traceback") as info:
        ranks2.run(_raise_on_rank1)
    message = str(info.value)
    assert "ValueError: boom from rank 1" in message
    assert "_raise_on_rank1" in message
    assert "[rank 0]" not in message
    results = ranks2.run(_check_values, scale=10)
    assert [r["value"] for r in results] == [0, 10]
    assert [r["pid"] for r in results] == pids  # not restarted


def test_unpicklable_fn_is_rejected(ranks2: RankPool) -> None:
    with pytest.raises(TypeError, match="module level"):
        ranks2.run(lambda rank, world_size: rank)


def test_all_equal_across_ranks(ranks2: RankPool) -> None:
    results = ranks2.run(_check_all_equal)
    assert results[0] == results[1]
    expected_true = {"same", "same_bf16", "same_bool", "nan", "scalar", "empty"}
    assert {k for k, v in results[0].items() if v} == expected_true


def test_hang_raises_timeout_naming_the_rank_and_pool_recovers(short_pool: RankPool) -> None:
    # Start the pool first, so the measured time covers the hang only.
    old_pids = [r["pid"] for r in short_pool.run(_check_values, scale=1)]
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"on ranks \[0\]") as info:
        short_pool.run(_hang_on_rank0)
    elapsed = time.monotonic() - start
    assert _HANG_TIMEOUT_S <= elapsed < 20.0
    assert "finished: [1]" in str(info.value)
    assert "_hang_on_rank0" in str(info.value)  # rank 0's stack at the deadline
    assert short_pool.pids == []
    results = short_pool.run(_check_values, scale=10)
    assert [r["value"] for r in results] == [0, 10]
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert set(r["pid"] for r in results).isdisjoint(old_pids)


def test_failed_rank_with_peer_stuck_in_collective_fails_fast(short_pool: RankPool) -> None:
    short_pool.run(_check_values, scale=1)
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"\[rank 1\] Traceback") as info:
        short_pool.run(_raise_on_rank1_before_collective)
    assert time.monotonic() - start < _HANG_TIMEOUT_S
    assert "ranks [0] did not finish" in str(info.value)
    assert short_pool.pids == []


def test_dead_worker_raises_runtime_error_naming_it(short_pool: RankPool) -> None:
    short_pool.run(_check_values, scale=1)
    with pytest.raises(RuntimeError, match=r"rank 1: exit code 3"):
        short_pool.run(_exit_on_rank1)
    assert short_pool.pids == []  # killed; the next run() restarts it (shown by the hang test)


def test_run_ranks_uses_a_throwaway_pool() -> None:
    results = run_ranks(_check_values, 1, scale=7)
    assert [r["value"] for r in results] == [0]
    assert [r["sum"] for r in results] == [1.0]
