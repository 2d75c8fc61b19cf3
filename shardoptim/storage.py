"""Where the model's parameters keep their values relative to the optimizer's flat buckets.

Two modes, chosen with `parameters_as_bucket_view`:

- own storage (False, the default): every parameter keeps a storage of its own, as with plain
  torch.optim. The buffers hold only this rank's range of each bucket; a bucket is gathered into
  a scratch buffer (a few kept for reuse) whose values are then copied out into the parameters
  (NCCL, MPI, across hosts: one more copy per step and a bounded scratch; on one host the
  shared-memory gather writes the parameters in place, see shardoptim.peer_region). Keeps every
  serializer that de-duplicates tensors by storage (safetensors, `save_pretrained`, Accelerate's
  `save_state`) writing every tensor.
- bucket views (True): every parameter's storage is a view into its bucket, so the gather writes
  straight into the weights. No extra memory or copy, but all parameters of a bucket share one
  storage, which storage-de-duplicating serializers take for one tensor.

In both modes every parameter has a "home", the tensor its storage is: its view in the bucket,
or its own storage as it was when the optimizer was built (or a storage of its own in a peer
region). The local optimizer's pieces (and master copies' targets) are views into the homes. A parameter moved from outside after
construction (`model.to(cpu:0)`, `load_state_dict(assign=True)`) is settled at the next step:
its values are copied home and it is pointed back there. Must not import torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from shardoptim.buffers import FlatBuffers, at_home
from shardoptim.bufpool import BufferPool

if TYPE_CHECKING:
    from shardoptim.pieces import Bucket


#: Bytes of whole-bucket scratch buffers kept for reuse between gathers (own-storage mode), per
#: (dtype, device); the largest one is kept even when larger: a fresh large allocation costs page
#: faults every step, and the steps gather one large bucket at a time.
SCRATCH_POOL_NBYTES = 4 << 20


class ParamStorage:
    """Keep the parameters at their homes (see the module docstring), and gather into them.

    Args:
        as_bucket_view: True for bucket views, False for parameters in their own storage.
        track_writes: report parameters written in place from outside (master copies must re-read
            them); without master copies such writes land at home and need nothing.
    """

    def __init__(self, *, as_bucket_view: bool, track_writes: bool) -> None:
        self.as_bucket_view = as_bucket_view
        self.track_writes = track_writes
        self._index_to_home: dict[int, torch.Tensor] = {}
        self._index_to_kind: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._index_to_version: dict[int, int] = {}
        #: Homes in a peer region, and where they must stay (the peers read them there).
        self._pinned: dict[int, int] = {}
        self._pool = BufferPool(max_nbytes=SCRATCH_POOL_NBYTES)
        # NOTE: the fast check of settle_: every parameter's data pointer (and version counter when
        # writes are tracked) as of the last time all were at home and in step; None: check each.
        self._ptrs: list[int] | None = None
        self._versions: list[int] | None = None

    def attach_(self, buffers: FlatBuffers, params: Sequence[torch.Tensor]) -> None:
        """Take over the parameters of `buffers` (whose values are already at their homes)."""
        self._index_to_home.update(buffers.homes())
        for index in buffers.pinned():
            self._pinned[index] = self._index_to_home[index].data_ptr()
        for index in buffers.indices():
            param = params[index]
            self._index_to_kind[index] = (param.shape, param.dtype, param.device)
        buffers.bind_params_(params)
        self.remember_(params, buffers.indices())

    def remember_(self, params: Sequence[torch.Tensor], indices: Iterable[int]) -> None:
        """Record the version counters of `indices` as in step with the optimizer."""
        for index in indices:
            self._index_to_version[index] = params[index]._version
        self._ptrs = None

    def in_step_(self, params: Sequence[torch.Tensor]) -> None:
        """Record every parameter as in step with the optimizer (after the step's own writes)."""
        if self.track_writes:
            self._versions = [p._version for p in params]
            self._index_to_version.update(zip(self._index_to_kind, (self._versions[i] for i in self._index_to_kind)))

    def settle_(self, params: Sequence[torch.Tensor], *, prefix: str) -> list[int]:
        """Bring parameters written or moved from outside back to their homes.

        A parameter whose storage was replaced by a tensor of the same shape, dtype and device
        type (e.g. `model.to(torch.device("cpu", 0))`, which copies) has its values copied home
        and is pointed back there. Local work only, but every rank sees the same model code, so
        every rank settles the same parameters.

        Returns:
            The indices whose values may differ from what the optimizer last wrote (for master
            copies to re-read): written in place, or moved with other values.

        The common case, nothing moved or written, costs one comparison of the parameters' data
        pointers (and version counters with `track_writes`) with those of the last step.

        Raises:
            RuntimeError: a parameter changed shape, dtype or device type.
        """
        ptrs = [p.data_ptr() for p in params]
        versions = [p._version for p in params] if self.track_writes else None
        if ptrs == self._ptrs and versions == self._versions:
            return []
        changed = self._settle_each_(params, prefix=prefix)
        self._ptrs = [p.data_ptr() for p in params]
        if self.track_writes:
            self._versions = [p._version for p in params]
        return changed

    def _settle_each_(self, params: Sequence[torch.Tensor], *, prefix: str) -> list[int]:
        changed: list[int] = []
        for index, kind in self._index_to_kind.items():
            param = params[index]
            _check_same_kind(index, param, kind, prefix=prefix)
            if param.numel() == 0:
                continue
            home = self._index_to_home[index]
            _check_pinned(index, home, self._pinned.get(index), prefix=prefix)
            replaced = not at_home(param, home)
            written = self.track_writes and param._version != self._index_to_version.get(index)
            if not (replaced or written):
                continue
            # A move (e.g. .to(cpu:0)) carries the same values: master copies stay as they are.
            if written or not torch.equal(param.detach(), home):
                changed.append(index)
            if replaced:
                with torch.no_grad():
                    home.copy_(param.detach())
                param.data = home
            self.remember_(params, [index])
        return changed

    def gather_target(self, bucket: Bucket, rank: int) -> torch.Tensor:
        """Return the whole bucket as one tensor to gather into, this rank's range filled in.

        Bucket views: the bucket itself. Own storage: a scratch buffer (give it to
        `finish_gather_` once gathered).
        """
        if bucket.buffer is not None:
            return bucket.buffer
        whole = self._pool.take(bucket.numel, bucket.segments.dtype, bucket.segments.device)
        lo, hi = bucket.bounds[rank], bucket.bounds[rank + 1]
        bucket.segments.read_(lo, hi, whole.narrow(0, lo, hi - lo))
        return whole

    def finish_gather_(self, bucket: Bucket, whole: torch.Tensor | None) -> None:
        """Copy the gathered bucket `whole` out into the parameters (scratch); call `in_step_` after all.

        `whole` is None after a gather straight into the parameters (`bucket.segments`).
        """
        if whole is not None and whole is not bucket.buffer:
            with torch.no_grad():
                bucket.segments.write_(0, bucket.numel, whole)
            self._pool.give_back(whole)

    def extra_nbytes(self, params: Sequence[torch.Tensor]) -> int:
        """Return the bytes the parameters' own storage and the scratch buckets add (0 for views)."""
        if self.as_bucket_view:
            return 0
        scratch = sum(t.numel() * t.element_size() for t in self._pool.tensors())
        return scratch + sum(params[i].numel() * params[i].element_size() for i in self._index_to_kind)


def _check_same_kind(
    index: int, param: torch.Tensor, kind: tuple[torch.Size, torch.dtype, torch.device], *, prefix: str
) -> None:
    shape, dtype, device = kind
    same_device = param.device.type == device.type and (param.device.type == "cpu" or param.device == device)
    if param.shape == shape and param.dtype == dtype and same_device:
        return
    raise RuntimeError(
        f"{prefix}parameter {index} changed from shape {tuple(shape)}, {dtype} on {device} "
        f"to shape {tuple(param.shape)}, {param.dtype} on {param.device} after the optimizer was built "
        "(model.to(dtype), .half(), a move to another device, or a resize). The optimizer's buffers and "
        "state are laid out for the old parameters. Build the ShardedOptimizer after moving or casting the model"
    )


def _check_pinned(index: int, home: torch.Tensor, pinned: int | None, *, prefix: str) -> None:
    if pinned is None or home.data_ptr() == pinned:
        return
    raise RuntimeError(
        f"{prefix}parameter {index}'s storage was moved out of the shared memory the other ranks read it "
        "from, by share_memory_() (model.share_memory(), or torch.multiprocessing sending the parameter "
        "or a state_dict tensor to another process, which moves its storage in place). The ranks' "
        "parameters would silently diverge. Call model.share_memory() before building the ShardedOptimizer "
        "(such parameters stay where they are), or send copies to other processes (t.detach().clone())"
    )
