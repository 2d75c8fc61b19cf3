"""Values kept for particular objects, found again only for those very objects.

A step gathers the same buckets with the same bounds every time, so what depends only on them
(range sizes, copy plans) is computed once and replayed. The values are keyed by the objects'
ids, and a hit counts only when the kept objects are the very ones asked about: an id reused by a
new object after the old one died is a miss, never a stale plan. Pure Python: must not import
torch.distributed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class KeptByIdentity(Generic[T]):
    """Values per sequence of objects (and a hashable `extra`), at most `max_kept` (then all dropped).

    The kept objects are held (strong references) as long as their value is kept.
    """

    def __init__(self, max_kept: int) -> None:
        self._max_kept = max_kept
        self._kept: dict[Hashable, tuple[tuple[object, ...], T]] = {}

    def get(self, objects: Sequence[object], extra: Hashable = None) -> T | None:
        """Return the value kept for these very `objects` and `extra`, or None."""
        hit = self._kept.get((extra, *map(id, objects)))
        if hit is None or any(held is not given for held, given in zip(hit[0], objects)):
            return None
        return hit[1]

    def put(self, objects: Sequence[object], value: T, extra: Hashable = None) -> T:
        """Keep `value` for `objects` and `extra`; return it."""
        if len(self._kept) >= self._max_kept:
            self._kept.clear()
        self._kept[(extra, *map(id, objects))] = (tuple(objects), value)
        return value

    def clear(self) -> None:
        """Drop every kept value."""
        self._kept.clear()

    def __len__(self) -> int:
        return len(self._kept)
