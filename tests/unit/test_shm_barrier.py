"""SpinBarrier: ordering of shared writes across 4 processes, dead and missing ranks, bad arguments.

The ranks are plain processes that map one file in /dev/shm: no process group. They come from a
forkserver that imported torch once (before any OpenMP thread ran), so each start costs a fork,
not a torch import.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
import torch

from shardoptim.shmbarrier import SpinBarrier

_DATA_OFFSET = 4096  # bytes: the barrier's flags first, the test's data after
_NUMEL = 4096  # int64 values each rank writes per round
_FILE_NBYTES = _DATA_OFFSET + 2 * 4 * _NUMEL * 8  # two halves of up to 4 ranks
_DEADLINE_S = 60.0  # for the ranks that should report at all

_RankFn = Callable[..., Any]


@pytest.fixture
def shm_path() -> Iterator[str]:
    """A zero-filled file in /dev/shm, unlinked after the test."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this host")
    path = f"/dev/shm/shardoptim-test-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, _FILE_NBYTES)
    finally:
        os.close(fd)
    yield path
    os.unlink(path)


# Rank functions: module level so they pickle by reference ----------------------------------------------


def _rank_main(
    fn: _RankFn, rank: int, world_size: int, path: str, pid_queue: Any, results: Any, kw: Any
) -> None:
    """Map the file, build the barrier from the pids the parent sends, run fn and report its result."""
    torch.set_num_threads(1)
    pids = pid_queue.get()
    shared = torch.from_file(path, shared=True, size=_FILE_NBYTES, dtype=torch.uint8)
    timeout_s = kw.pop("timeout_s")
    barrier = SpinBarrier(
        shared[: SpinBarrier.nbytes(world_size)], rank, world_size, pids, timeout_s=timeout_s
    )
    start = time.monotonic()
    try:
        value = fn(rank, world_size, barrier, shared, **kw)
    except Exception as err:
        value = f"{type(err).__name__}: {err}"
    results.put((rank, value, time.monotonic() - start))


def _check_sees_every_write(
    rank: int, world_size: int, barrier: SpinBarrier, shared: torch.Tensor, *, rounds: int
) -> int:
    """Write this round's values into own region, pass the barrier, check every rank's; return rounds done."""
    # NOTE: halves alternate, as in the staging area: a half is written again only after the next
    # round's barrier, which every rank reaches only once done reading it.
    data = shared[_DATA_OFFSET:].view(torch.int64)[: 2 * world_size * _NUMEL].view(2, world_size, _NUMEL)
    mine = torch.empty(_NUMEL, dtype=torch.int64)
    for k in range(rounds):
        if (k + rank) % 5 == 0:
            time.sleep(0.0005)  # vary who arrives last
        data[k % 2, rank].copy_(mine.fill_(k * world_size + rank))
        barrier.wait("round")
        for other in range(world_size):
            seen = data[k % 2, other]
            lo, hi = int(seen.min()), int(seen.max())
            expected = k * world_size + other
            if lo != expected or hi != expected:
                raise AssertionError(
                    f"round {k}: rank {rank} saw {lo}..{hi} from rank {other}, expected {expected}"
                )
    return rounds


def _die_before_barrier(
    rank: int, world_size: int, barrier: SpinBarrier, shared: torch.Tensor, *, how: str
) -> None:
    """Pass 3 barriers; then the last rank dies (`how`: exit or kill) and the others wait for it."""
    for _ in range(3):
        barrier.wait("warm-up")
    if rank == world_size - 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    barrier.wait("after death")


def _sleep_before_barrier(rank: int, world_size: int, barrier: SpinBarrier, shared: torch.Tensor) -> None:
    """Pass one barrier; then the last rank sleeps (alive) while the others wait for it."""
    barrier.wait("warm-up")
    if rank == world_size - 1:
        time.sleep(_DEADLINE_S)
    barrier.wait("never completes")


# Harness -----------------------------------------------------------------------------------------------


def _run(fn: _RankFn, world_size: int, path: str, *, expect: int, **kw: Any) -> dict[int, tuple[Any, float]]:
    """Run fn on world_size processes; return {rank: (result or error text, seconds)} of the first `expect`.

    The processes left over (dead, or asleep on purpose) are killed before returning.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", __name__])  # each rank then costs a fork
    pid_queue, results = ctx.Queue(), ctx.Queue()
    procs: list[BaseProcess] = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, path, pid_queue, results, kw), daemon=True)
        for r in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            pid_queue.put([proc.pid for proc in procs])
        deadline = time.monotonic() + _DEADLINE_S
        out: dict[int, tuple[Any, float]] = {}
        while len(out) < expect:
            try:
                rank, value, seconds = results.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                codes = {r: proc.exitcode for r, proc in enumerate(procs) if r not in out}
                raise AssertionError(
                    f"ranks did not report within {_DEADLINE_S} s; exit codes: {codes}"
                ) from None
            out[rank] = (value, seconds)
        return out
    finally:
        for proc in procs:
            if proc.pid is not None:
                proc.kill()
                proc.join(timeout=10)


# Tests -------------------------------------------------------------------------------------------------


def test_every_rank_sees_every_write_of_the_round(shm_path: str) -> None:
    results = _run(_check_sees_every_write, 4, shm_path, expect=4, timeout_s=30.0, rounds=200)
    assert {rank: value for rank, (value, _) in results.items()} == {0: 200, 1: 200, 2: 200, 3: 200}


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_dead_rank_is_named_at_once(shm_path: str, how: str) -> None:
    results = _run(_die_before_barrier, 3, shm_path, expect=2, timeout_s=30.0, how=how)
    for rank in (0, 1):
        message, seconds = results[rank]
        assert message.startswith(f"RuntimeError: [rank {rank}/3] after death: rank 2 (pid "), message
        assert "exited" in message
        assert seconds < 5.0, f"rank {rank} noticed the dead rank only after {seconds:.1f} s"


def test_missing_rank_times_out_naming_it(shm_path: str) -> None:
    results = _run(_sleep_before_barrier, 3, shm_path, expect=2, timeout_s=1.0)
    for rank in (0, 1):
        message, seconds = results[rank]
        assert message.startswith(f"RuntimeError: [rank {rank}/3] never completes: ranks [2] did not"), (
            message
        )
        assert "same order" in message
        assert 1.0 <= seconds < 5.0


def test_counters_live_one_per_cache_line() -> None:
    # Rank 1 of 2 in this process: rank 0's counter is set by hand.
    flags = torch.zeros(SpinBarrier.nbytes(2), dtype=torch.uint8)
    counters = flags.view(torch.int64)
    barrier = SpinBarrier(flags, 1, 2, [os.getpid()] * 2, timeout_s=0.3)
    counters[0] = 1
    barrier.wait("first")
    assert counters.tolist() == [1] + [0] * 7 + [1] + [0] * 7
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^\[rank 1/2\] second: ranks \[0\] did not reach barrier 2"):
        barrier.wait("second")
    assert time.monotonic() - start >= 0.3


def test_one_rank_never_waits() -> None:
    flags = torch.zeros(SpinBarrier.nbytes(1), dtype=torch.uint8)
    barrier = SpinBarrier(flags, 0, 1, [os.getpid()], timeout_s=1.0)
    for _ in range(3):
        barrier.wait("alone")
    assert int(flags.view(torch.int64)[0]) == 3


def test_nbytes_and_bad_arguments() -> None:
    assert [SpinBarrier.nbytes(n) for n in (1, 2, 4)] == [64, 128, 256]
    assert SpinBarrier.supported() == (platform.machine().lower() in ("x86_64", "amd64"))
    pids = [os.getpid()] * 4
    with pytest.raises(ValueError, match=r"at least 256 bytes .* for 4 ranks, got 255 bytes"):
        SpinBarrier(torch.zeros(255, dtype=torch.uint8), 0, 4, pids, timeout_s=1.0)
    with pytest.raises(TypeError, match="uint8"):
        SpinBarrier(torch.zeros(32, dtype=torch.int64), 0, 4, pids, timeout_s=1.0)
    with pytest.raises(ValueError, match="cache line"):
        SpinBarrier(torch.zeros(512, dtype=torch.uint8)[8:], 0, 4, pids, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\), got 4"):
        SpinBarrier(torch.zeros(256, dtype=torch.uint8), 4, 4, pids, timeout_s=1.0)
    with pytest.raises(ValueError, match=r"one pid per rank \(4\), got 3"):
        SpinBarrier(torch.zeros(256, dtype=torch.uint8), 0, 4, pids[:3], timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        SpinBarrier(torch.zeros(256, dtype=torch.uint8), 0, 4, pids, timeout_s=0.0)
