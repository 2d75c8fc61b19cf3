"""Buckets that every rank of a host can read: the one-copy shared-memory gather.

When every rank of a CPU group runs on one host, each rank keeps its CPU buckets (the parameters
themselves: their own storage, or the bucket views) in a file of /dev/shm that it maps shared and
that every peer keeps open. A step's update writes this rank's range where the parameters live,
so a gather is one barrier, every rank reading each other rank's range straight out of that
rank's file into its own buckets, and one more barrier (no rank writes its parameters again
before every peer has read them). One copy instead of the staging area's two (in, then out), and
no staging memory: the files hold the parameters, which no longer live in private memory, so the
host's memory use does not grow.

The peers' ranges are read with `os.preadv` (the kernel copies from the file's pages) rather
than through a mapping of the peers' files: a mapping would count every page read in this
rank's RSS, about (N - 1) / N of the parameters' bytes more per rank, shared in fact but summed
by tools that add up RSS over processes. Own-storage parameters keep a storage each: every home
is its own `torch.frombuffer` over its slice of the mapping, so serializers that de-duplicate
tensors by storage still see distinct tensors.

Must not import torch.distributed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shardoptim.kept import KeptByIdentity
from shardoptim.shm import SHM_DIR

#: Where a bucket starts in a rank's file: a cache line, so no two buckets share one.
_ALIGN_NBYTES = 64
#: Gathers planned at most (a step gathers the same buckets every time: one or two plans).
_MAX_PLANS = 64
#: Bytes per read: a range is read in pieces of at most this many bytes (to share among threads).
_READ_NBYTES = 4 << 20
#: Gathers of at least this many bytes read on several threads when torch uses several.
_THREADED_NBYTES = 8 << 20


def aligned(nbytes: int) -> int:
    """Round `nbytes` up to where the next bucket of a peer region may start."""
    return -(-nbytes // _ALIGN_NBYTES) * _ALIGN_NBYTES


class PeerFiles:
    """The peers' files of one region, open for reading; closed once nothing holds this object.

    Args:
        fds: per rank, a descriptor of its file (None for this rank).
    """

    def __init__(self, fds: Sequence[int | None]) -> None:
        self.fds = tuple(fds)
        weakref.finalize(self, _close, [fd for fd in fds if fd is not None])


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(frozen=True, eq=False, slots=True)
class PeerBucket:
    """One bucket as every rank of the host holds it, at the same byte offset of each rank's file."""

    mine: torch.Tensor
    """This rank's copy (1-D, padding included)."""
    window: memoryview
    """The same bytes, for the kernel to read into."""
    offset: int
    """Byte offset of the bucket in every rank's file."""
    files: PeerFiles


class PeerRegion:
    """This rank's mapping of its buckets, and every peer's file (the same layout), open for reading.

    Built by `open_peer_region`. Args: mine: this rank's mapping; files: the peers' files.
    """

    def __init__(self, mine: mmap.mmap, files: PeerFiles) -> None:
        self._mine = mine
        self._files = files

    def carve(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Return `numel` elements of this rank's mapping at byte `offset`, as a tensor with a storage of its own."""
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._mine, dtype=dtype, count=numel, offset=offset)

    def bucket(self, offset: int, numel: int, dtype: torch.dtype) -> PeerBucket:
        """Return the bucket of `numel` elements at byte `offset` of every rank's file."""
        window = memoryview(self._mine)[offset : offset + numel * dtype.itemsize]
        return PeerBucket(self.carve(offset, numel, dtype), window, offset, self._files)


def open_peer_region(
    rank: int,
    nbytes: int,
    signature: object,
    all_gather_object: Callable[[object], list[object]],
    barrier: Callable[[], None],
) -> tuple[PeerRegion | None, str]:
    """Map a file of `nbytes` per rank that every rank of the host can read; agree on it.

    Each rank reserves its file's blocks (posix_fallocate: a too-small /dev/shm fails here, not
    with SIGBUS later), the ranks exchange the names, open the peers' files for reading and
    unlink their own once everyone has opened it (nothing is left in /dev/shm; the open files and
    the mapping stay valid). Returns (None, why) on every rank when any rank cannot reserve its
    file or open a peer's, or the ranks laid out different buckets (`signature` differs), else
    (the region, "").

    Collective: call on every rank of the group, in the same order.
    """
    name, fd, failure = None, -1, ""
    if nbytes > 0:
        name = f"shardoptim-params-{uuid.uuid4().hex}"
        try:
            fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as err:
            failure = f"rank {rank} cannot reserve {nbytes:,} bytes in {SHM_DIR}: {err}"
            _drop(fd, name)
            name, fd = None, -1
    everyone = all_gather_object((name, signature, failure))
    failures = [str(entry[2]) for entry in everyone if entry[2]]  # type: ignore[index]
    if len({repr(entry[1]) for entry in everyone}) > 1:  # type: ignore[index]
        failures.append("the ranks laid out different buckets (are their models the same?)")
    if failures or nbytes == 0:
        _drop(fd, name)
        return None, "; ".join(failures)
    assert name is not None
    fds: list[int | None] = []
    try:
        for r, entry in enumerate(everyone):
            fds.append(None if r == rank else os.open(os.path.join(SHM_DIR, str(entry[0])), os.O_RDONLY))  # type: ignore[index]
    except OSError as err:  # e.g. ranks in containers that share a host name but not /dev/shm
        failure = f"rank {rank} cannot open a peer's file in {SHM_DIR}: {err}"
    failures = [str(f) for f in all_gather_object(failure) if f]
    if failures:
        _close([f for f in fds if f is not None])
        _drop(fd, name)
        return None, "; ".join(failures)
    files = PeerFiles(fds)
    mine = mmap.mmap(fd, nbytes)  # MAP_SHARED, read and write
    os.close(fd)
    barrier()  # every rank holds every file open: the names can go
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(SHM_DIR, name))
    return PeerRegion(mine, files), ""


def _drop(fd: int, name: str | None) -> None:
    """Close and remove a file this rank reserved (if any)."""
    if fd >= 0:
        os.close(fd)
    if name is not None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, name))


@dataclass(slots=True)
class _GatherPlan:
    reads: list[tuple[int, memoryview, int]]
    """(peer's descriptor, where this rank's bytes go, offset in the peer's file) per read."""
    nbytes: int


class PeerGather:
    """Gather peer buckets: one barrier, each other rank's range read out of its file, one barrier.

    Args:
        barrier: the host's barrier among the group's ranks, given the operation's name.
    """

    def __init__(self, barrier: Callable[[str], None]) -> None:
        self._barrier = barrier
        self._plans: KeptByIdentity[_GatherPlan] = KeptByIdentity(_MAX_PLANS)
        # NOTE: a kernel copy runs on the calling thread: large gathers spread their reads over as
        # many threads as torch's own copies would use (torch.get_num_threads()).
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0

    def gather_(self, buckets: Sequence[tuple[PeerBucket, Sequence[int]]], *, what: str) -> None:
        """Fill every rank's range of each bucket (`bounds`: world_size + 1 offsets) from its owner.

        Collective: call on every rank of the group, in the same order, with the same buckets.
        """
        plan = self._plan(buckets)
        self._barrier(f"{what}: ranges written")
        threads = torch.get_num_threads()
        if threads > 1 and len(plan.reads) > 1 and plan.nbytes >= _THREADED_NBYTES:
            if self._pool is None or self._pool_threads != threads:
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shardoptim-gather")
                self._pool_threads = threads
            for _ in self._pool.map(lambda read: _read_exactly(*read, what=what), plan.reads):
                pass
        else:
            for fd, window, offset in plan.reads:
                _read_exactly(fd, window, offset, what=what)
        self._barrier(f"{what}: ranges read")

    def _plan(self, buckets: Sequence[tuple[PeerBucket, Sequence[int]]]) -> _GatherPlan:
        """Return the reads of one gather: planned once per distinct list of buckets, then replayed."""
        objects = [obj for pair in buckets for obj in pair]  # each bucket and its bounds
        plan = self._plans.get(objects)
        if plan is not None:
            return plan
        plan = _GatherPlan([], 0)
        for bucket, bounds in buckets:
            itemsize = bucket.mine.element_size()
            for fd, lo, hi in zip(bucket.files.fds, bounds, bounds[1:]):
                if fd is None or hi <= lo:
                    continue
                for start in range(lo * itemsize, hi * itemsize, _READ_NBYTES):
                    end = min(start + _READ_NBYTES, hi * itemsize)
                    plan.reads.append((fd, bucket.window[start:end], bucket.offset + start))
                    plan.nbytes += end - start
        return self._plans.put(objects, plan)


def _read_exactly(fd: int, window: memoryview, offset: int, *, what: str) -> None:
    """Read len(window) bytes of file `fd` at `offset` into `window` (the kernel may return fewer per call)."""
    done = 0
    while done < len(window):
        got = os.preadv(fd, [window[done:]], offset + done)
        if got <= 0:
            raise RuntimeError(
                f"{what}: a peer's shared parameter file ended {len(window) - done} bytes early "
                f"(read at offset {offset + done}); was /dev/shm cleaned up under a running job?"
            )
        done += got
