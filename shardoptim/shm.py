"""A node-local shared-memory staging area for gathering and reduce-scattering CPU buckets.

gloo moves CPU tensors between local ranks through TCP loopback: the kernel copies every byte
twice and the gather dominates a sharded step. When every rank of the group runs on one host, a
bucket is gathered instead by each rank copying its fresh range into a shared staging buffer
(one per host, in /dev/shm), a barrier, and each rank copying the other ranges out; a gradient
bucket is reduce-scattered by each rank copying its contribution in, a barrier, and each rank
adding up its own range. The parameters and gradients themselves stay private to each rank.

The staging area has a fixed size (two halves of HALF_NBYTES, used in turn), whatever the model:
every rank maps it and counts it in its RSS, so it streams large buckets in rounds instead of
holding them whole. The barrier between rounds is a counter per rank in the same mapping
(shmbarrier.py: a few microseconds, against N gloo round trips), where the machine's memory
order allows it (x86); elsewhere the group's gloo barrier.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shardoptim.kept import KeptByIdentity
from shardoptim.segments import Segments
from shardoptim.shmbarrier import SpinBarrier

logger = logging.getLogger(__name__)

#: Where the staging files live while the ranks map them (unlinked right after).
SHM_DIR = "/dev/shm"


def same_host(all_gather_object: Callable[[object], list[object]]) -> bool:
    """Return whether every rank runs on this host (same hostname and boot id).

    Collective: call on every rank of the group, in the same order. Same result on every rank.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = ""
    mine = (socket.gethostname(), boot, os.path.isdir(SHM_DIR))
    everyone = all_gather_object(mine)
    return all(other == mine for other in everyone) and mine[2]


def _aligned(nbytes: int) -> int:
    """Round `nbytes` up to a multiple of 64 (a cache line), where each staged block starts."""
    return -(-nbytes // 64) * 64


#: Bytes of one half of the staging area (it has two, used in turn). Gathers and reduce-scatters
#: of any size stream through it in rounds of at most this many bytes, one barrier each, so the
#: staging every rank maps (and counts in its RSS) is 2 x this, whatever the model and buckets.
#: Smaller halves mean more barriers per step, cheap with the shared-memory barrier (with gloo
#: barriers, 8 MiB halves made 4-rank stage-2 steps on 2 cores about 25% slower than 16 MiB).
HALF_NBYTES = 4 << 20

#: One piece of a gather round: (bucket, bounds, start, end, byte offset in the half).
_Segment = tuple[Segments, Sequence[int], int, int, int]
_GATHER = "parameter gather (shared memory)"
_REDUCE = "gradient reduce-scatter (shared memory)"
#: Gather rounds planned at most (a step over B buckets uses about B + total / HALF_NBYTES rounds).
_MAX_PLANS = 4096


@dataclass(slots=True)
class _RoundPlan:
    """The copies of one gather round: into the staging half, then out of it (see _round_plan)."""

    read_dst: list[torch.Tensor] = field(default_factory=list)
    read_src: list[torch.Tensor] = field(default_factory=list)
    write_dst: list[torch.Tensor] = field(default_factory=list)
    write_src: list[torch.Tensor] = field(default_factory=list)



class SharedStaging:
    """One shared byte buffer per host, of two fixed halves used in turn by every round.

    Every round (of a gather or a reduce-scatter) writes into the next half, passes one barrier
    and reads back from that half. A half is written again only two rounds later, after the next
    round's barrier, which every rank reaches only once done reading it: one barrier per round
    and none between rounds, whichever collective comes next. So every collective that uses a
    staging area must go through it in the same order on every rank.

    Args:
        rank: this rank in the group.
        world_size: ranks in the group.
        all_gather_object: the group's object all-gather (to agree on the file name).
        barrier: the group's barrier (under the group's timeout), given the operation's name for
            its error message.
        half_nbytes: bytes of each half (the same on every rank).
        timeout_s: how long a round's barrier waits for a live rank before it raises (a dead
            rank is noticed within 0.1 s); the group's timeout.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        all_gather_object: Callable[[object], list[object]],
        barrier: Callable[[str], None],
        *,
        half_nbytes: int = HALF_NBYTES,
        timeout_s: float,
    ) -> None:
        self._rank = rank
        self._world_size = world_size
        self._next_set = 0
        self._all_gather_object = all_gather_object
        self._group_barrier = barrier
        self._timeout_s = timeout_s
        self._spin: SpinBarrier | None = None
        # NOTE: a reduce-scatter round needs world_size x (world_size - 1) slots of a cache line or more.
        self._half_nbytes = max(_aligned(half_nbytes), 64 * world_size * world_size)
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._plans: KeptByIdentity[_RoundPlan] = KeptByIdentity(_MAX_PLANS)

    @property
    def nbytes(self) -> int:
        """Bytes of shared memory mapped now (0 before the first use)."""
        return self._buffer.numel()

    def map_(self, what: str) -> bool:
        """Map both halves on first use; return False on every rank if /dev/shm is too small.

        Rank 0 reserves the file's blocks with posix_fallocate before anyone maps it: a sparse
        mapping of a too-small tmpfs would otherwise die with SIGBUS on first touch.

        Collective: every rank sees the same sizes, in the same order.
        """
        halves = 2 * self._half_nbytes
        nbytes = halves + _aligned(SpinBarrier.nbytes(self._world_size))
        if nbytes <= self._buffer.numel():
            return True
        name: str | None = None
        if self._rank == 0:
            name = f"shardoptim-{uuid.uuid4().hex}"
            path = os.path.join(SHM_DIR, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                finally:
                    os.close(fd)
            except OSError as err:
                logger.warning(
                    "cannot reserve %d bytes in %s (%s); gathering through gloo instead", nbytes, SHM_DIR, err
                )
                with contextlib.suppress(OSError):
                    os.unlink(path)
                name = None
        everyone = self._all_gather_object((name, os.getpid()))
        name = everyone[0][0]  # type: ignore[index]
        if name is None:
            return False
        path = os.path.join(SHM_DIR, str(name))
        self._buffer = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        self._plans.clear()  # they point into the old mapping
        if SpinBarrier.supported():  # the counters start at zero: the file was just reserved
            pids = [int(entry[1]) for entry in everyone]  # type: ignore[index]
            flags = self._buffer[halves:]
            self._spin = SpinBarrier(flags, self._rank, self._world_size, pids, timeout_s=self._timeout_s)
        self._group_barrier(what)
        if self._rank == 0:
            os.unlink(path)  # the mappings stay valid; nothing is left behind in /dev/shm
        return True

    def barrier(self, what: str) -> None:
        """Wait for every rank of the host group (between a round's copies in and out).

        Collective: call on every rank of the group, in the same order.
        """
        if self._spin is not None:
            self._spin.wait(what)
        else:
            self._group_barrier(what)

    def _next_half(self) -> torch.Tensor:
        """Return the half the next round writes (bytes), and turn to the other one."""
        offset = self._next_set * self._half_nbytes
        self._next_set ^= 1
        return self._buffer[offset : offset + self._half_nbytes]

    def gather_(self, bucket: torch.Tensor, bounds: Sequence[int]) -> bool:
        """Fill every rank's range of `bucket` from its owner through the shared buffer.

        Returns False (on every rank, having done nothing) when the staging buffer cannot be mapped.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        return self.gather_many_([(bucket, bounds)])

    def gather_many_(self, buckets: Sequence[tuple[torch.Tensor | Segments, Sequence[int]]]) -> bool:
        """Gather several CPU buckets in rounds of up to one half: copies in, one barrier, copies out.

        Small buckets share a round; a large one is cut into pieces that fill rounds. A bucket
        given as `Segments` (parameters in their own storage) is read from and written to its
        segments directly, its padding left out. Returns False (on every rank, having done
        nothing) when the staging buffer cannot be mapped.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        if not self.map_(_GATHER):
            return False
        cacheable = all(isinstance(given, Segments) for given, _ in buckets)
        segments: list[_Segment] = []
        used = 0
        for given, bounds in buckets:
            bucket = given if isinstance(given, Segments) else Segments.whole(given)
            itemsize, numel = bucket.element_size(), bucket.numel
            start = 0
            while start < numel:
                room = (self._half_nbytes - used) // itemsize
                if room == 0:
                    self._gather_round(segments, cacheable=cacheable)
                    segments, used = [], 0
                    continue
                end = min(numel, start + room)
                segments.append((bucket, bounds, start, end, used))
                used = _aligned(used + (end - start) * itemsize)
                start = end
        if segments:
            self._gather_round(segments, cacheable=cacheable)
        return True

    def _gather_round(self, segments: Sequence[_Segment], *, cacheable: bool) -> None:
        """Run one gather round: own ranges into the next half, one barrier, other ranges out.

        `cacheable`: the buckets are the caller's own lasting `Segments` (keep the round's plan).
        """
        half_index = self._next_set
        half = self._next_half()
        plan = self._round_plan(half_index, half, segments, cacheable=cacheable)
        if plan.read_dst:
            torch._foreach_copy_(plan.read_dst, plan.read_src)
        self.barrier(_GATHER)
        if plan.write_dst:
            torch._foreach_copy_(plan.write_dst, plan.write_src)

    def _round_plan(
        self, half_index: int, half: torch.Tensor, segments: Sequence[_Segment], *, cacheable: bool
    ) -> _RoundPlan:
        """Return the copies of a gather round: planned once per distinct round, then replayed.

        A step gathers the same buckets in the same rounds every time, so the views (one per
        parameter segment in range, which dominated the host time of steps over thousands of
        small tensors) are kept. Plans hold the buckets they were made for and are used only for
        those same objects (never for a new one at a reused address).
        """
        objects = [obj for segment in segments for obj in segment[:2]]  # each bucket and its bounds
        extra = (half_index, tuple(segment[2:] for segment in segments))
        plan = self._plans.get(objects, extra)
        if plan is not None:
            return plan
        plan = _RoundPlan()
        for bucket, bounds, start, end, offset in segments:
            nbytes = (end - start) * bucket.element_size()
            stage = half[offset : offset + nbytes].view(bucket.dtype)
            lo, hi = max(start, bounds[self._rank]), min(end, bounds[self._rank + 1])
            spans = [(start, end)] if lo >= hi else [(start, lo), (hi, end)]
            if lo < hi:
                mine, theirs = bucket.pairs(lo, hi, stage[lo - start : hi - start])
                plan.read_dst += theirs
                plan.read_src += mine
            for a, b in spans:
                if a < b:
                    mine, theirs = bucket.pairs(a, b, stage[a - start : b - start])
                    plan.write_dst += mine
                    plan.write_src += theirs
        if cacheable:
            self._plans.put(objects, plan, extra)
        return plan

    def all_reduce_max_(self, tensor: torch.Tensor, *, what: str, negate: bool = False) -> bool:
        """Set the small CPU `tensor` to its elementwise max (min with `negate`) over the ranks.

        One round: each rank writes its values into its slot of the next half, one barrier, each
        rank reduces every slot in rank order. Exact (a max does not round), a few microseconds
        where a gloo all-reduce costs a round trip per rank. Returns False (on every rank, having
        done nothing) when the staging buffer cannot be mapped or the tensor does not fit.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        `what` names the operation in errors.
        """
        what = f"{what} (shared memory)"
        nbytes = _aligned(tensor.numel() * tensor.element_size())
        if nbytes * self._world_size > self._half_nbytes or not self.map_(what):
            return False
        slots = self._next_half()[: nbytes * self._world_size].view(self._world_size, nbytes).view(tensor.dtype)
        numel = tensor.numel()
        slots[self._rank, :numel].copy_(tensor.reshape(-1))
        self.barrier(what)
        values = slots[:, :numel]
        tensor.copy_((values.amin(dim=0) if negate else values.amax(dim=0)).view(tensor.shape))
        return True

    def reduce_scatter_(
        self,
        bucket: torch.Tensor,
        bounds: Sequence[int],
        out: torch.Tensor,
        *,
        accumulate: bool = False,
        scale: float = 1.0,
    ) -> bool:
        """Set `out` to `scale` times the sum over ranks of this rank's range of `bucket` (or add it).

        In rounds: round k takes the k-th chunk of every rank's range. Each rank copies its
        contribution to each other owner's chunk into its row of a world_size x (world_size - 1)
        grid of slots in the next half (its own contribution it reads from `bucket` itself);
        after one barrier each rank adds up its chunk in rank order (the same order on every
        rank, so the result does not depend on timing or on the chunk size). So every rank
        reduces in every round, and the staging stays one half per round whatever the bucket
        size. `out` may be wider than `bucket` (fp32 sums of a bf16 bucket). Returns False (on
        every rank, having done nothing) when the staging buffer cannot be mapped.

        Collective: call on every rank of the group, in the same order, with the same sizes.
        """
        if not self.map_(_REDUCE):
            return False
        world, itemsize, me = self._world_size, bucket.element_size(), self._rank
        others = max(world - 1, 1)
        # NOTE: a chunk is a whole number of cache lines, so every slot starts aligned.
        chunk = self._half_nbytes // (world * others) // 64 * 64 // itemsize
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
        for first in range(0, max(sizes), chunk):
            grid = self._next_half()[: world * others * chunk * itemsize].view(bucket.dtype)
            slots = grid.view(world, others, chunk)  # slots[writer, owner without the writer]
            for owner in range(world):
                numel = min(chunk, sizes[owner] - first)
                if owner != me and numel > 0:
                    start = bounds[owner] + first
                    slots[me, owner - (owner > me)].narrow(0, 0, numel).copy_(bucket[start : start + numel])
            self.barrier(_REDUCE)
            numel = min(chunk, sizes[me] - first)
            if numel <= 0:
                continue
            start = bounds[me] + first
            terms = [
                bucket[start : start + numel] if rank == me else slots[rank, me - (me > rank), :numel]
                for rank in range(world)
            ]
            part = out[first : first + numel]
            if accumulate:
                for term in terms:
                    part.add_(term, alpha=scale)
            else:
                part.copy_(terms[0])
                for term in terms[1:]:
                    part.add_(term)
                if scale != 1.0:
                    part.mul_(scale)
        return True
