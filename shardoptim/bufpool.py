"""A small pool of released flat buffers, reused instead of allocated anew on every step.

A fresh allocation of a large buffer costs page faults on every step (about 7 ms per 16 MiB on
the CPU machines, 10x the copy into it), so stage 2's full gradient buckets and own-storage
mode's scratch buckets are handed back here and taken again. Pure torch: must not import
torch.distributed.
"""

from __future__ import annotations

import torch


class BufferPool:
    """Released 1-D buffers per (dtype, device), the largest kept within a byte (and count) bound.

    Args:
        max_nbytes: bytes kept per (dtype, device); the largest buffer is kept even when larger.
        max_count: buffers kept per (dtype, device) at most (None: no count bound).
    """

    def __init__(self, *, max_nbytes: int, max_count: int | None = None) -> None:
        self._max_nbytes = max_nbytes
        self._max_count = max_count
        self._pools: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Return `numel` uninitialised elements: the smallest pooled buffer that fits, else a new one."""
        pool = self._pools.get((dtype, device), [])
        fitting = [i for i, t in enumerate(pool) if t.numel() >= numel]
        if fitting:
            buffer = pool.pop(min(fitting, key=lambda i: pool[i].numel()))  # by position: no tensor ==
            return buffer[:numel]
        return torch.empty(numel, dtype=dtype, device=device)

    def give_back(self, buffer: torch.Tensor) -> None:
        """Keep `buffer` (or the buffer it was cut from) if it is among the largest within the bounds."""
        base = buffer if buffer._base is None else buffer._base
        pool = self._pools.setdefault((base.dtype, base.device), [])
        pool.append(base)
        pool.sort(key=lambda t: t.numel(), reverse=True)
        nbytes, keep = 0, 0
        for t in pool[: self._max_count]:
            nbytes += t.numel() * t.element_size()
            if keep and nbytes > self._max_nbytes:
                break
            keep += 1
        del pool[keep:]

    def tensors(self) -> list[torch.Tensor]:
        """Return every pooled buffer (for memory accounting)."""
        return [t for pool in self._pools.values() for t in pool]
