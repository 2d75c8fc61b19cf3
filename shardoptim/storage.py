"""Where the model's parameters keep their values relative to the optimizer's flat buckets.

Two modes, chosen with `parameters_as_bucket_view`:

- own storage (False, the default): every parameter keeps a storage of its own, as with plain
  torch.optim. The buffers hold only this rank's range of each bucket; a bucket is gathered into
  a scratch buffer (a few kept for reuse) whose values are then copied out into the parameters.
  Costs one copy per step and a bounded scratch, and keeps every serializer that de-duplicates
  tensors by storage (safetensors, `save_pretrained`, Accelerate's `save_state`) writing every
  tensor.
- bucket views (True): every parameter's storage is a view into its bucket, so the gather writes
  straight into the weights. No extra memory or copy, but all parameters of a bucket share one
  storage, which storage-de-duplicating serializers take for one tensor.

In both modes a parameter written or moved from outside after construction (`model.to(cpu:0)`,
`model.load_state_dict`, `nn.init`) is settled at the next step: its values reach the bucket
(and, in bucket-view mode, it is pointed back at its view). Must not import torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from shardoptim.buffers import FlatBuffers
from shardoptim.bufpool import BufferPool

if TYPE_CHECKING:
    from shardoptim.pieces import Bucket


#: Bytes of whole-bucket scratch buffers kept for reuse between gathers (own-storage mode), per
#: (dtype, device); the largest one is kept even when larger: a fresh large allocation costs page
#: faults every step, and the steps gather one large bucket at a time.
SCRATCH_POOL_NBYTES = 4 << 20


class ParamStorage:
    """Keep the parameters and the buckets in step, in one of the two modes above.

    In own-storage mode the buffers hold only this rank's range of each bucket: a whole bucket
    is a scratch buffer that lives from `gather_target` to `finish_gather_`.

    Args:
        as_bucket_view: True for bucket views, False for parameters in their own storage.
    """

    def __init__(self, *, as_bucket_view: bool) -> None:
        self.as_bucket_view = as_bucket_view
        self._index_to_view: dict[int, torch.Tensor] = {}
        self._index_to_owned: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._index_to_kind: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._index_to_version: dict[int, int] = {}
        self._index_to_ptr: dict[int, int] = {}
        self._pool = BufferPool(max_nbytes=SCRATCH_POOL_NBYTES)

    def attach_(self, buffers: FlatBuffers, params: Sequence[torch.Tensor]) -> None:
        """Take over the parameters of `buffers` (whose values are already in the buckets)."""
        self._index_to_view.update(buffers.items())
        self._index_to_owned.update(buffers.owned_parts())
        for index in buffers.indices():
            param = params[index]
            self._index_to_kind[index] = (param.shape, param.dtype, param.device)
        if self.as_bucket_view:
            buffers.bind_params_(params)
        self.remember_(params, buffers.indices())

    def remember_(self, params: Sequence[torch.Tensor], indices: Iterable[int]) -> None:
        """Record the version counters and storages of `indices` as in step with the buckets."""
        for index in indices:
            param = params[index]
            self._index_to_version[index] = param._version
            self._index_to_ptr[index] = param.data_ptr()

    def settle_(self, params: Sequence[torch.Tensor], *, prefix: str) -> list[int]:
        """Bring parameters written or moved from outside back in step with their buckets.

        A parameter whose storage was replaced by a tensor of the same shape, dtype and device
        type (e.g. `model.to(torch.device("cpu", 0))`, which copies) has its values copied into
        its bucket; in bucket-view mode it is then pointed back at its view. In own-storage mode a
        parameter written in place since the last step is copied into its bucket (the range this
        rank holds). Local work only, but every rank sees the same model code, so every rank
        settles the same parameters.

        Returns:
            The indices whose values may differ from what the optimizer last wrote (for master
            copies to re-read).

        Raises:
            RuntimeError: a parameter changed shape, dtype or device type.
        """
        changed: list[int] = []
        for index, kind in self._index_to_kind.items():
            param = params[index]
            _check_same_kind(index, param, kind, prefix=prefix)
            if param.numel() == 0:
                continue
            view = self._index_to_view.get(index)
            home = view.data_ptr() if view is not None and self.as_bucket_view else self._index_to_ptr.get(index)
            replaced = param.data_ptr() != home
            written = param._version != self._index_to_version.get(index)
            if not (replaced or written):
                continue
            pairs = self._pairs(index, param)
            # A move (e.g. .to(cpu:0)) carries the same values: master copies stay as they are.
            if written or not all(torch.equal(src, dst) for src, dst in pairs):
                changed.append(index)
            if replaced or not self.as_bucket_view:
                with torch.no_grad():
                    for src, dst in pairs:
                        dst.copy_(src)
            if replaced and view is not None and self.as_bucket_view:
                param.data = view
            self.remember_(params, [index])
        return changed

    def _pairs(self, index: int, param: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return (values in the parameter, where the buckets keep them) for parameter `index`."""
        view = self._index_to_view.get(index)
        if view is not None:
            return [(param.detach(), view)]
        flat = param.detach().reshape(-1)
        return [(flat.narrow(0, start, owned.numel()), owned) for start, owned in self._index_to_owned.get(index, [])]

    def gather_target(self, bucket: Bucket) -> torch.Tensor:
        """Return the whole bucket to gather into, this rank's range filled in.

        Bucket views: the bucket itself. Own storage: a scratch buffer (give it to
        `finish_gather_` once gathered).
        """
        if self.as_bucket_view:
            return bucket.buffer
        whole = self._pool.take(bucket.numel, bucket.buffer.dtype, bucket.buffer.device)
        whole.narrow(0, bucket.owned_start, bucket.buffer.numel()).copy_(bucket.buffer)
        return whole

    def finish_gather_(self, params: Sequence[torch.Tensor], bucket: Bucket, whole: torch.Tensor) -> None:
        """Copy the gathered bucket `whole` out into the parameters of `bucket` (own-storage mode)."""
        if self.as_bucket_view:
            return
        pairs = [
            (params[i].detach(), whole.narrow(0, start, params[i].numel()).view(params[i].shape))
            for i, start in zip(bucket.param_indices, bucket.starts)
            if params[i].numel()
        ]
        with torch.no_grad():
            if pairs:
                torch._foreach_copy_([dst for dst, _ in pairs], [src for _, src in pairs])
        self.remember_(params, bucket.param_indices)
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
