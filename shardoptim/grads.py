"""ZeRO stage 2: reduce-scatter gradients bucket by bucket during backward, keep only this rank's shard.

A post-accumulate-grad hook on every trainable parameter copies its fresh gradient into the flat
gradient bucket of its parameter bucket and frees the parameter's `.grad`. When every trainable
parameter of a bucket has arrived, the bucket's reduce-scatter (mean over ranks) starts, while
backward goes on; buckets are launched strictly in one fixed order (last bucket first, the order
backward usually produces them), so every rank enters the same collectives in the same order even
when their graphs differ. At the end of each backward pass the buckets still waiting (parameters
unused on this rank, or behind one in the order) are launched, every reduction is waited for and
added into the gradient shard, and the full buckets are released (the largest kept for reuse, up
to POOL_NBYTES): steady-state gradient memory is total/N plus the buckets in flight.

Inside `no_sync()` the hooks only note that a gradient arrived: gradients accumulate in full in
`.grad` as usual, and are reduced by the next backward outside `no_sync()` or by `flush_()`.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from shardoptim.buffers import memory_perm, to_flat
from shardoptim.bufpool import BufferPool
from shardoptim.comm import Comm
from shardoptim.transports import PendingReduce

if TYPE_CHECKING:
    from shardoptim.placement import Placement

#: Reductions allowed in flight before backward waits for the oldest (its full bucket is then
#: released): bounds gradient memory to the shards plus this many buckets (plus those filling).
MAX_IN_FLIGHT = 2
#: At most this many released full buckets are kept for reuse, per (dtype, device): the largest
#: ones, each serving any bucket that fits. A fresh allocation of a large buffer costs page faults
#: on every step (about 7 ms per 16 MiB here, 10x the copy into it), so some gradient memory stays
#: allocated between steps, bounded by bytes (POOL_NBYTES) as well as by this count.
POOL_SIZE = 2
#: At most this many bytes of released full buckets are kept for reuse, per (dtype, device); the
#: largest one is kept even when larger (so one bucket filling at a time never allocates). 32 MiB
#: is two default stage-2 buckets of fp32 (4 Mi elements): two fill at once at the seam between
#: buckets, and keeping only one saved no RSS in benchmarks/memory.py (glibc keeps the freed one
#: resident) while paying a fresh allocation every step. Larger buckets keep only the largest.
POOL_NBYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class GradSlot:
    """Where one parameter's gradient goes in the flat gradient buckets."""

    bucket: int
    start_global: int
    numel: int


@dataclass(slots=True)
class _GradBucket:
    numel: int
    dtype: torch.dtype
    device: torch.device
    bounds: tuple[int, ...]
    shard_dtype: torch.dtype
    param_indices: list[int]
    gaps: list[tuple[int, int]] = field(default_factory=list)
    """(start, numel) of the padding between and after the parameters."""
    full: torch.Tensor | None = None
    """The full gradient bucket being filled in this backward pass (None when not started)."""
    written: set[int] = field(default_factory=set)
    """Parameters whose gradient is in `full` (the rest of it is uninitialised until launch)."""
    seen: set[int] = field(default_factory=set)
    waiting: int = 0
    """Trainable parameters of the bucket whose gradient has not arrived in this pass."""
    active: bool = False
    """Whether any parameter of the bucket requires grad (fixed for the pass)."""
    launched: bool = False
    pending: PendingReduce | None = None
    in_flight: torch.Tensor | None = None
    shard: torch.Tensor | None = None
    """The averaged gradient of the range this rank owns; allocated once, kept across steps."""
    shard_valid: bool = False
    """Whether `shard` holds gradients (False after zero_grad(set_to_none=True): no gradient)."""


class GradReducer:
    """Owns the gradient shards of stage 2 and the hooks that fill them.

    Args:
        comm: the shard group.
        placement: the optimizer's placed state; indices below refer to its `params`.
        replicate: the replicate group of hybrid sharding: the shards are averaged across it
            before they are read (see `flush_`); None without replicas.
    """

    def __init__(self, comm: Comm, placement: Placement, *, replicate: Comm | None = None) -> None:
        self._comm = comm
        self._replicate = replicate
        self._replica_stale = False
        """Whether a reduction reached the shards since they were last averaged across replicas."""
        self._placement = placement
        self._buckets: list[_GradBucket] = []
        self._slots: dict[int, GradSlot] = {}
        self._id_to_index: dict[int, int] = {}
        self._hooked: set[int] = set()
        self.has_grad: list[bool] = []
        """Per parameter: a gradient arrived on this rank since the last zero_grad."""
        self._in_flight: deque[int] = deque()
        self._pool = BufferPool(max_nbytes=POOL_NBYTES, max_count=POOL_SIZE)
        self._no_sync = False
        self._unreduced = False
        self._in_pass = False
        self._next = -1

    def add_bucket(
        self,
        *,
        numel: int,
        dtype: torch.dtype,
        device: torch.device,
        bounds: Sequence[int],
        shard_dtype: torch.dtype,
        slots: dict[int, GradSlot],
    ) -> None:
        """Register the next parameter bucket (`numel` elements of `dtype` on `device`) and its params.

        `slots` maps each parameter index to its place; their `bucket` must be this bucket's
        position (buckets are registered in the optimizer's order).
        """
        grad_bucket = _GradBucket(numel, dtype, device, tuple(bounds), shard_dtype, sorted(slots))
        end = 0
        for slot in sorted(slots.values(), key=lambda s: s.start_global):
            if slot.start_global > end:
                grad_bucket.gaps.append((end, slot.start_global - end))
            end = max(end, slot.start_global + slot.numel)
        if numel > end:
            grad_bucket.gaps.append((end, numel - end))
        self._buckets.append(grad_bucket)
        for index, slot in slots.items():
            assert slot.bucket == len(self._buckets) - 1, (slot, len(self._buckets))
            self._slots[index] = slot
            self._id_to_index[id(self._placement.params[index])] = index
        self.has_grad.extend([False] * (len(self._placement.params) - len(self.has_grad)))
        self.hook_trainable_()

    def hook_trainable_(self) -> None:
        """Register the gradient hook on every trainable parameter that has none yet."""
        for index in self._slots:
            param = self._placement.params[index]
            if param.requires_grad and index not in self._hooked:
                param.register_post_accumulate_grad_hook(self._on_grad)  # type: ignore[no-untyped-call]
                self._hooked.add(index)

    def shard(self, bucket: int) -> torch.Tensor | None:
        """Return the averaged gradient of this rank's range of `bucket` (None if none arrived)."""
        b = self._buckets[bucket]
        return b.shard if b.shard_valid else None

    def shards(self) -> list[torch.Tensor]:
        """Return every gradient shard that holds gradients."""
        return [b.shard for b in self._buckets if b.shard is not None and b.shard_valid]

    def allocated_nbytes(self) -> int:
        """Return the bytes of gradient memory held: shards and the pooled full buckets."""
        tensors = [b.shard for b in self._buckets if b.shard is not None]
        tensors += self._pool.tensors()
        tensors += [t for b in self._buckets for t in (b.full, b.in_flight) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally in `.grad` (no communication) inside the block."""
        previous = self._no_sync
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = previous

    def zero_(self, *, set_to_none: bool) -> None:
        """Drop (or zero) the gradient shards, as `Optimizer.zero_grad` does to `.grad`."""
        for bucket in self._buckets:
            if set_to_none:
                bucket.shard_valid = False  # kept allocated: refilled by the next reduction
            elif bucket.shard is not None and bucket.shard_valid:
                bucket.shard.zero_()
        if set_to_none:
            self.has_grad = [False] * len(self.has_grad)

    # ------------------------------------------------------------------------------ backward

    def _on_grad(self, param: torch.Tensor) -> None:
        index = self._id_to_index[id(param)]
        self.has_grad[index] = True
        if self._no_sync:
            self._unreduced = True
            return
        if not self._in_pass:
            self.hook_trainable_()
            self._start_pass()
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        slot = self._slots[index]
        bucket = self._buckets[slot.bucket]
        if bucket.launched:
            # A second gradient in one pass (reentrant checkpointing): reduced by the next flush.
            self._unreduced = True
            return
        self._take_grad_(bucket, index, slot)
        if index not in bucket.seen:
            bucket.seen.add(index)
            bucket.waiting -= 1
        self._launch_ready()

    def _start_pass(self) -> None:
        # NOTE: requires_grad is set by model code, the same on every rank, so every rank agrees
        # on which buckets take part (and when one is complete) without communicating.
        self._in_pass = True
        self._unreduced = False  # this pass's launches take every gradient left in .grad
        self._next = len(self._buckets) - 1
        for bucket in self._buckets:
            bucket.seen.clear()
            bucket.launched = False
            trainable = sum(1 for i in bucket.param_indices if self._placement.params[i].requires_grad)
            bucket.waiting = trainable
            bucket.active = trainable > 0

    def _take_grad_(self, bucket: _GradBucket, index: int, slot: GradSlot) -> None:
        """Move parameter `index`'s `.grad` into the bucket being filled (and free it)."""
        param = self._placement.params[index]
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise TypeError(
                f"{self._comm.prefix}parameter {index} (shape {tuple(param.shape)}) has a sparse gradient, "
                "which stage=2 cannot reduce-scatter; use stage=1 (e.g. with torch.optim.SparseAdam)"
            )
        if bucket.full is None:
            bucket.full = self._pool.take(bucket.numel, bucket.dtype, bucket.device)
            bucket.written.clear()
        region = bucket.full.narrow(0, slot.start_global, slot.numel)
        flat = to_flat(grad, memory_perm(param))  # the parameter's memory order, as its flat range
        if index in bucket.written:
            region.add_(flat)
        else:
            region.copy_(flat)  # no zero-fill pass over the bucket
            bucket.written.add(index)
        param.grad = None
        self.has_grad[index] = True  # also for a parameter unfrozen since its hook was due

    def _launch_ready(self) -> None:
        while self._next >= 0:
            bucket = self._buckets[self._next]
            if bucket.active:
                if bucket.waiting > 0:
                    return
                self._launch(self._next)
            self._next -= 1

    def _launch(self, b: int) -> None:
        """Start bucket b's reduce-scatter, with every gradient of it still held in `.grad`."""
        bucket = self._buckets[b]
        for index in bucket.param_indices:
            self._take_grad_(bucket, index, self._slots[index])
        full = bucket.full
        if full is None:
            full = self._pool.take(bucket.numel, bucket.dtype, bucket.device).zero_()
        else:
            for start, numel in bucket.gaps:
                full.narrow(0, start, numel).zero_()
            for index in bucket.param_indices:
                if index not in bucket.written:
                    slot = self._slots[index]
                    full.narrow(0, slot.start_global, slot.numel).zero_()
        bucket.full = None
        bucket.in_flight = full
        if bucket.shard is None:
            owned = bucket.bounds[self._comm.rank + 1] - bucket.bounds[self._comm.rank]
            bucket.shard = torch.empty(owned, dtype=bucket.shard_dtype, device=bucket.device)
        bucket.pending = self._comm.reduce_scatter_mean_async(
            full,
            bucket.bounds,
            bucket.shard,
            accumulate=bucket.shard_valid,
            what=f"gradient reduce-scatter (bucket {b})",
        )
        bucket.launched = True
        self._replica_stale = True
        self._in_flight.append(b)
        self._drain(keep=MAX_IN_FLIGHT)

    def _drain(self, *, keep: int) -> None:
        """Finish the oldest reductions: every finished one, and any beyond `keep` in flight."""
        while self._in_flight:
            bucket = self._buckets[self._in_flight[0]]
            assert bucket.pending is not None
            if len(self._in_flight) <= keep and not bucket.pending.done:
                return
            self._in_flight.popleft()
            bucket.pending.wait()  # the mean is now in (or added to) the shard
            bucket.pending = None
            bucket.shard_valid = True
            if bucket.in_flight is not None:
                self._pool.give_back(bucket.in_flight)
            bucket.in_flight = None

    def _end_pass(self) -> None:
        self._launch_rest_and_wait()
        self._in_pass = False

    def _launch_rest_and_wait(self) -> None:
        while self._next >= 0:
            if self._buckets[self._next].active:
                self._launch(self._next)
            self._next -= 1
        self._drain(keep=0)

    def flush_(self) -> None:
        """Reduce gradients still held in `.grad` (left by `no_sync()`) into the shards.

        With replicas (hybrid sharding) the shards are then averaged across the replicate group,
        so every replica holds the gradient of the global batch; call this before reading them.

        Collective: call on every rank of the group, in the same order. Every rank agrees on
        whether there is work because every rank ran the same no_sync() backward passes.
        """
        if self._unreduced:
            self._start_pass()
            self._launch_rest_and_wait()
            self._in_pass = False
        if self._replicate is not None:
            self._average_replicas_(self._replicate)

    def _average_replicas_(self, replicate: Comm) -> None:
        """Average the shards reduced since the last call across the replicate group.

        One all-reduce (max) of a flag per bucket and per parameter first, so replicas agree on
        whether there is work, which buckets hold gradients anywhere (a replica without them
        contributes zeros) and which parameters got a gradient on any rank.

        Collective: call on every rank of the replicate group, in the same order.
        NOTE: gradients accumulated on top of already averaged shards (a second backward without
        zero_grad after a read) are averaged with them again: equal values up to rounding.
        """
        flags = [float(self._replica_stale)] + [float(b.shard_valid) for b in self._buckets]
        packed = torch.tensor(flags + [float(h) for h in self.has_grad], device=replicate.device)
        replicate.all_reduce_(packed, op="max", what="gradient flags across replicas")
        agreed = replicate.to_host(packed).tolist()  # NOTE: one host read per step on an accelerator-only group
        self._replica_stale = False
        if not agreed[0]:
            return
        for b, bucket in enumerate(self._buckets):
            if not agreed[1 + b]:
                continue
            if bucket.shard is None:
                owned = bucket.bounds[self._comm.rank + 1] - bucket.bounds[self._comm.rank]
                bucket.shard = torch.zeros(owned, dtype=bucket.shard_dtype, device=bucket.device)
            elif not bucket.shard_valid:
                bucket.shard.zero_()
            replicate.all_reduce_(bucket.shard, op="mean", what=f"gradient average across replicas (bucket {b})")
            bucket.shard_valid = True
        self.has_grad = [bool(flag) for flag in agreed[1 + len(self._buckets) :]]
