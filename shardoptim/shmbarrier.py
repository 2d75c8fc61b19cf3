"""A barrier among the ranks of one host, through counters in a shared memory mapping.

The shared-memory staging area (shm.py) needs one barrier per round, dozens per optimizer step; a
gloo barrier costs world_size TCP round trips each. Here each rank owns one int64 counter, alone on
its 64-byte cache line of a shared mapping: to pass a barrier a rank increments its counter and
polls until every counter has reached its own. Counters only grow, so nothing is ever reset.

Why a rank's earlier copies into the staging area are visible to a rank that saw its counter:
x86 orders stores (total store order): a core's writes become visible to other cores in program
order, so the copies, which come before the counter store, are visible first; and loads are not
reordered with older loads, so the copies out come after the counter was read. A torch copy that
runs on several OpenMP threads joins them before the counter is stored, and x86 store visibility
is transitive. Other machines (ARM, POWER) reorder stores without fences, which Python cannot issue:
there supported() is False and the caller keeps its gloo barrier.

Must not import torch.distributed.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence

import torch

_LINE_NBYTES = 64  # bytes per rank: one cache line, so that no two counters share one
_LINE_NUMEL = _LINE_NBYTES // 8  # int64 counters per cache line
#: Back-off while waiting. First poll with os.sched_yield() in between, for this long: all ranks
#: usually arrive within it, and the yield lets a rank that shares this core (4 ranks on 2 cores)
#: run; spinning without it made a 4-rank barrier on 2 cores take ~100 us instead of ~6 us.
_YIELD_S = 1e-3
#: Then sleep a sixteenth of the time waited so far, within these bounds: a late rank is noticed
#: at most ~6% (plus a ~60 us wake-up) after it arrives, and a rank that waits for seconds wakes
#: 50 times a second (~1% of a core here, against ~3% with 1 ms sleeps).
_SLEEP_FRACTION = 1 / 16
_SHORTEST_SLEEP_S = 50e-6
_LONGEST_SLEEP_S = 20e-3
#: How often a waiting rank checks that the ranks it waits for are still alive.
_LIVENESS_PERIOD_S = 0.1


def _is_dead(pid: int) -> bool:
    """Return whether process `pid` of this host has exited (gone, zombie or dead in /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # NOTE: the command name in parentheses may hold spaces or ')'; the state follows the last ')'.
    fields = stat.rpartition(")")[2].split()
    return not fields or fields[0] in ("Z", "X")


class SpinBarrier:
    """A barrier among the ranks of one host that share the mapping of `flags`.

    Args:
        flags: uint8 CPU tensor of at least nbytes(world_size) bytes, a view into a memory mapping
            shared by every rank (the same bytes on each), zero-filled before the first wait, and
            starting on a cache line. Rank r owns the int64 at byte offset 64 * r.
        rank: this rank in the group.
        world_size: ranks in the group.
        pids: process id of every rank, indexed by rank, in this process's pid namespace (each
            rank's os.getpid(), if all run in one container). A waiting rank reads /proc for them.
        timeout_s: seconds a wait may last before it raises RuntimeError.
    """

    def __init__(
        self, flags: torch.Tensor, rank: int, world_size: int, pids: Sequence[int], *, timeout_s: float
    ) -> None:
        prefix = f"[rank {rank}/{world_size}] "
        nbytes = self.nbytes(world_size)
        if flags.dtype != torch.uint8 or flags.device.type != "cpu":
            raise TypeError(f"{prefix}flags must be a uint8 CPU tensor, got {flags.dtype} on {flags.device}")
        if not 0 <= rank < world_size:
            raise ValueError(f"{prefix}rank must be in [0, {world_size}), got {rank}")
        if flags.numel() < nbytes or not flags.is_contiguous():
            raise ValueError(
                f"{prefix}flags must be a contiguous tensor of at least {nbytes} bytes (64 per rank) "
                f"for {world_size} ranks, got {flags.numel()} bytes (contiguous: {flags.is_contiguous()}); "
                "size it with SpinBarrier.nbytes(world_size)"
            )
        if flags.data_ptr() % _LINE_NBYTES != 0:
            raise ValueError(
                f"{prefix}flags must start on a 64-byte cache line, got address {flags.data_ptr():#x}"
            )
        if len(pids) != world_size:
            raise ValueError(f"{prefix}pids must hold one pid per rank ({world_size}), got {len(pids)}")
        if timeout_s <= 0:
            raise ValueError(f"{prefix}timeout_s must be positive, got {timeout_s}")
        self._prefix, self._rank, self._world_size = prefix, rank, world_size
        self._pids, self._timeout_s, self._generation = list(pids), timeout_s, 0
        # NOTE: indexing a memoryview cast to int64 is the cheapest read and write from Python
        # (about 50 ns, half of a numpy scalar's); the numpy array keeps `flags` alive.
        self._counters = flags.detach().reshape(-1)[:nbytes].numpy().data.cast("q")

    @staticmethod
    def nbytes(world_size: int) -> int:
        """Return the bytes of shared memory the counters of `world_size` ranks need (64 per rank)."""
        return _LINE_NBYTES * world_size

    @staticmethod
    def supported() -> bool:
        """Return whether the memory ordering this barrier relies on holds here (x86_64 only)."""
        return platform.machine().lower() in ("x86_64", "amd64")

    def wait(self, what: str) -> None:
        """Return once every rank has called wait as many times as this rank has.

        Collective: call on every rank of the group, in the same order. `what` names the
        operation in error messages.

        Raises:
            RuntimeError: a rank it waits for has exited (checked every 0.1 s), or timeout_s passed.
        """
        self._generation += 1
        generation, counters = self._generation, self._counters
        counters[self._rank * _LINE_NUMEL] = generation
        arrived = 0  # ranks below this one have reached `generation`; counters only grow
        start = time.monotonic()
        next_check = _LIVENESS_PERIOD_S
        while True:
            while arrived < self._world_size and counters[arrived * _LINE_NUMEL] >= generation:
                arrived += 1
            if arrived == self._world_size:
                return
            waited_s = time.monotonic() - start
            if waited_s < _YIELD_S:
                os.sched_yield()
                continue
            if waited_s >= next_check:
                self._check(what, generation, waited_s=waited_s)
                next_check = waited_s + _LIVENESS_PERIOD_S
            time.sleep(min(_LONGEST_SLEEP_S, max(_SHORTEST_SLEEP_S, waited_s * _SLEEP_FRACTION)))

    def _check(self, what: str, generation: int, *, waited_s: float) -> None:
        """Raise RuntimeError if a rank that has not reached `generation` is dead or the wait timed out."""
        missing = [r for r in range(self._world_size) if self._counters[r * _LINE_NUMEL] < generation]
        dead = [r for r in missing if _is_dead(self._pids[r])]
        if dead:
            names = ", ".join(f"rank {r} (pid {self._pids[r]})" for r in dead)
            raise RuntimeError(
                f"{self._prefix}{what}: {names} exited before reaching barrier {generation}; "
                "see that rank's own error for the cause"
            )
        if missing and waited_s >= self._timeout_s:
            raise RuntimeError(
                f"{self._prefix}{what}: ranks {missing} did not reach barrier {generation} within "
                f"{self._timeout_s} s; every rank must call the optimizer's collectives in the same order"
            )
