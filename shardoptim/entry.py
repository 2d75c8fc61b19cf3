"""Agree, before a rare collective starts, that every rank of the group has called it.

Consolidation and sharded checkpoints are collectives, but hand-written training loops call save
code on rank 0 only (`if master_process: ...`). Called there, the first collective inside waits
for ranks that are busy elsewhere (in DDP's next all-reduce, which in turn waits for rank 0): the
job hangs until the group's timeout (30 minutes by default) and then fails with a message about a
closed connection, or worse, rank 0's collective pairs with an unrelated one of the other ranks.

`EntryCheck.enter` runs first, through the process group's key-value store rather than a
collective, so a rank that gives up leaves nothing pending in the group: the rank expected to call
alone (the consolidation target) waits at most `deadline_s`, the others as long as the group
allows. Arrivals are counted with one atomic add; the last rank to arrive decides "go", a rank that
gives up decides "cancelled", each with one atomic compare-and-set on the same key, so every rank
sees the same decision and none starts the collective that another has abandoned.

Must not import the rest of shardoptim.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed.distributed_c10d import Store

__all__ = ["EntryCheck", "EntryError"]

logger = logging.getLogger(__name__)

_GO = b"go"
_CANCELLED = b"cancelled"
_POLL_MIN_S = 0.0005
_POLL_MAX_S = 0.05
#: Optimizers built on each group so far, in construction order (the same on every rank, since
#: construction is collective): the key namespace of each optimizer's entry checks.
_serials: dict[str, Iterator[int]] = {}


class EntryError(RuntimeError):
    """Not every rank of the group called a collective of the optimizer in time."""


class EntryCheck:
    """The entry handshake of one optimizer's collectives on one process group.

    Args:
        group: the process group (None: the default group); unused when `world_size` is 1.
        rank: this rank in `group`.
        world_size: ranks in `group`.
        deadline_s: how long the rank that may be calling alone waits for the others.
        group_timeout_s: how long every other rank waits (the group's own timeout).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        *,
        rank: int,
        world_size: int,
        deadline_s: float,
        group_timeout_s: float,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.deadline_s = deadline_s
        self.group_timeout_s = group_timeout_s
        self._store: Store | None = None
        self._calls = 0
        self._namespace = ""
        if world_size == 1:
            return
        store = _group_store(group)
        if store is None:
            return
        pg = group if group is not None else dist.group.WORLD
        name = getattr(pg, "group_name", "") or "default"
        serial = next(_serials.setdefault(name, itertools.count()))
        self._store = store
        self._namespace = f"shardoptim/entry/{name}/{serial}"

    def enter(self, what: str, *, lone_rank: int) -> None:
        """Return once every rank has entered `what`; raise EntryError on every rank that gives up.

        Collective: call on every rank of the group, in the same order, before the collective
        `what` itself. `lone_rank` is the rank likely to be calling alone by mistake (the
        consolidation target, rank 0 of a checkpoint save): it waits at most `deadline_s`; the
        others wait up to the group's timeout.

        Raises:
            EntryError: not every rank arrived in time; names the ranks missing and the likely fix.
        """
        if self._store is None:
            return
        store = self._store
        key = f"{self._namespace}/{self._calls}"
        self._calls += 1
        store.set(f"{key}/{self.rank}", "1")
        if store.add(f"{key}/count", 1) == self.world_size:
            store.compare_set(f"{key}/state", "", _GO.decode())
        wait_s = self.deadline_s if self.rank == lone_rank else self.group_timeout_s
        decision = _wait_for(store, f"{key}/state", wait_s)
        if decision is None:
            decision = bytes(store.compare_set(f"{key}/state", "", _CANCELLED.decode()))
        if decision == _GO:
            return
        missing = [r for r in range(self.world_size) if not store.check([f"{key}/{r}"])]
        prefix = f"[rank {self.rank}/{self.world_size}] "
        if self.rank == lone_rank:
            raise EntryError(
                f"{prefix}{what} is a collective, but ranks {missing} did not call it within {self.deadline_s:g} s. "
                f"Called on rank {lone_rank} only? Call it on every rank, outside `if rank == {lone_rank}:` "
                "(then use the result on that rank alone), e.g. `opt.consolidate_state_dict(to=0)` on every rank "
                "before `if master_process: torch.save(opt.state_dict(), path)`, or `sd = opt.full_state_dict(to=0)`. "
                "If the ranks are only slow to arrive, raise ShardedOptimizer(..., entry_timeout_s=...)"
            )
        raise EntryError(
            f"{prefix}{what} was abandoned: rank {lone_rank} gave up waiting for ranks {missing} "
            f"({self.deadline_s:g} s). Every rank must call the optimizer's collectives, in the same order"
        )


def _wait_for(store: Store, key: str, timeout_s: float) -> bytes | None:
    """Return the value of `key` once it is set, or None after `timeout_s` (polls with back-off)."""
    deadline = time.monotonic() + timeout_s
    pause = _POLL_MIN_S
    while True:
        if store.check([key]):
            return bytes(store.get(key))
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, _POLL_MAX_S)


def _group_store(group: dist.ProcessGroup | None) -> Store | None:
    """Return the key-value store behind `group`, or None where there is none to use (fake groups)."""
    from torch.distributed import distributed_c10d as c10d

    pg = group if group is not None else c10d._get_default_group()
    try:
        # NOTE: torch keeps the store of every group it created; there is no public accessor.
        store = c10d._get_process_group_store(pg)
    except (AttributeError, KeyError, RuntimeError, ValueError) as err:
        logger.debug("no store for the entry check of group %r: %s", pg, err)
        return None
    if type(store).__name__ == "FakeStore":  # torch's fake process group: nothing to agree with
        return None
    return store
