"""Flat padded buffers, one per bucket of a layout, and the parameter views into them.

After `bind_params_` every parameter's storage is a view into its bucket, so the all-gather of a
bucket writes straight into the model's weights (no copy), and the local optimizer's slices are
views of the same memory. Must not import torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardoptim.layout import Layout, LocalSlice


class FlatBuffers:
    """Allocate one zero-padded buffer per bucket of `layout` and copy the parameters in.

    Args:
        layout: where every parameter goes (indices refer to `params`).
        params: the parameters the layout places, in layout index order. All parameters of a
            bucket must share a device and dtype (the layout's keys guarantee it).
        offset: position of `params[0]` in the optimizer's list of all parameters; the methods
            below take and return indices into that list.

    The parameters are not touched until `bind_params_` is called.
    """

    def __init__(self, layout: Layout, params: Sequence[torch.Tensor], *, offset: int = 0) -> None:
        self.layout = layout
        self.buffers: list[torch.Tensor] = []
        self._index_to_view: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for bucket in layout.buckets:
                first = params[bucket.placements[0].index]
                buffer = torch.zeros(bucket.padded_numel, dtype=first.dtype, device=first.device)
                for placement in bucket.placements:
                    param = params[placement.index]
                    view = buffer.narrow(0, placement.start_global, placement.numel)
                    view.copy_(param.detach().reshape(-1))
                    self._index_to_view[offset + placement.index] = view.view(param.shape)
                self.buffers.append(buffer)

    def param_view(self, index: int) -> torch.Tensor:
        """Return the full-shape view of parameter `index` inside its bucket."""
        return self._index_to_view[index]

    def indices(self) -> list[int]:
        """Return the optimizer indices of the parameters these buffers hold."""
        return list(self._index_to_view)

    def items(self) -> list[tuple[int, torch.Tensor]]:
        """Return (optimizer index, full-shape view in its bucket) for every parameter held."""
        return list(self._index_to_view.items())

    def local_view(self, piece: LocalSlice, *, shape: torch.Size | None = None) -> torch.Tensor:
        """Return the owned piece of a parameter as a view of its bucket (1-D, or `shape` if given)."""
        view = self.buffers[piece.bucket].narrow(0, piece.start_global, piece.in_param.numel)
        return view if shape is None else view.view(shape)

    def bind_params_(self, params: Sequence[torch.Tensor]) -> None:
        """Point every parameter's storage at its view in the buckets (values are already there).

        Args:
            params: the optimizer's list of all parameters (indexed with the offset).
        """
        for index, view in self._index_to_view.items():
            params[index].data = view
