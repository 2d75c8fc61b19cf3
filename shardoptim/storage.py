"""Where the model's parameters keep their values relative to the optimizer's flat buckets.

Two modes, chosen with `parameters_as_bucket_view`:

- own storage (False, the default): every parameter keeps a storage of its own, as with plain
  torch.optim. The buckets hold a copy; after each gather the new values are copied out into the
  parameters. Costs one copy of the parameters in memory and one copy per step, and keeps every
  serializer that de-duplicates tensors by storage (safetensors, `save_pretrained`, Accelerate's
  `save_state`) writing every tensor.
- bucket views (True): every parameter's storage is a view into its bucket, so the gather writes
  straight into the weights. No extra memory or copy, but all parameters of a bucket share one
  storage, which storage-de-duplicating serializers take for one tensor.

In both modes a parameter written or moved from outside after construction (`model.to(cpu:0)`,
`model.load_state_dict`, `nn.init`) is settled at the next step: its values reach the bucket
(and, in bucket-view mode, it is pointed back at its view). Must not import torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from shardoptim.buffers import FlatBuffers


class ParamStorage:
    """Keep the parameters and the buckets in step, in one of the two modes above.

    Args:
        as_bucket_view: True for bucket views, False for parameters in their own storage.
    """

    def __init__(self, *, as_bucket_view: bool) -> None:
        self.as_bucket_view = as_bucket_view
        self._index_to_view: dict[int, torch.Tensor] = {}
        self._index_to_version: dict[int, int] = {}
        self._index_to_ptr: dict[int, int] = {}

    def attach_(self, buffers: FlatBuffers, params: Sequence[torch.Tensor]) -> None:
        """Take over the parameters of `buffers` (whose values are already in the buckets)."""
        self._index_to_view.update(buffers.items())
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
        parameter written in place since the last step is copied into its bucket. Local work
        only, but every rank sees the same model code, so every rank settles the same parameters.

        Returns:
            The indices whose values may differ from what the optimizer last wrote (for master
            copies to re-read).

        Raises:
            RuntimeError: a parameter changed shape, dtype or device type.
        """
        changed: list[int] = []
        for index, view in self._index_to_view.items():
            param = params[index]
            _check_same_kind(index, param, view, prefix=prefix)
            if view.numel() == 0:
                continue
            home = view.data_ptr() if self.as_bucket_view else self._index_to_ptr.get(index)
            replaced = param.data_ptr() != home
            written = param._version != self._index_to_version.get(index)
            if replaced:
                # A move (e.g. .to(cpu:0)) carries the same values: master copies stay as they are.
                same = bool(torch.equal(param.detach(), view))
                if not same:
                    changed.append(index)
                with torch.no_grad():
                    view.copy_(param.detach())
                if self.as_bucket_view:
                    param.data = view
            elif written:
                changed.append(index)  # written in place (through the view, or into its own storage)
                if not self.as_bucket_view:
                    with torch.no_grad():
                        view.copy_(param.detach())
            if replaced or written:
                self.remember_(params, [index])
        return changed

    def copy_out_(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> None:
        """Copy the gathered bucket values of `indices` into the parameters (own-storage mode only)."""
        if self.as_bucket_view or not indices:
            return
        views = self._index_to_view
        dst = [params[i] for i in indices if views[i].numel()]
        src = [views[i] for i in indices if views[i].numel()]
        with torch.no_grad():
            if dst:
                torch._foreach_copy_([p.detach() for p in dst], src)
        self.remember_(params, indices)

    def extra_nbytes(self, params: Sequence[torch.Tensor]) -> int:
        """Return the bytes the parameters' own storage adds beyond the buckets (0 for views)."""
        if self.as_bucket_view:
            return 0
        return sum(params[i].numel() * params[i].element_size() for i in self._index_to_view)


def _check_same_kind(index: int, param: torch.Tensor, view: torch.Tensor, *, prefix: str) -> None:
    same_device = param.device.type == view.device.type and (
        param.device.type == "cpu" or param.device == view.device
    )
    if param.shape == view.shape and param.dtype == view.dtype and same_device:
        return
    raise RuntimeError(
        f"{prefix}parameter {index} changed from shape {tuple(view.shape)}, {view.dtype} on {view.device} "
        f"to shape {tuple(param.shape)}, {param.dtype} on {param.device} after the optimizer was built "
        "(model.to(dtype), .half(), a move to another device, or a resize). The optimizer's buffers and "
        "state are laid out for the old parameters. Build the ShardedOptimizer after moving or casting the model"
    )
