"""Flat padded buffers, one per bucket of a layout, and the parameter views into them.

Two kinds, chosen by `full`:

- full (parameters as bucket views): one buffer per whole bucket; after `bind_params_` every
  parameter's storage is a view into it, so the all-gather of a bucket writes straight into the
  model's weights (no copy), and the local optimizer's slices are views of the same memory.
- own storage: no buffers at all. Every parameter keeps a storage of its own (its "home"), the
  local optimizer's slices are views into the homes, and a bucket is the homes laid end to end
  (`segments`): a shared-memory gather reads and writes them in place; other gathers go through
  a whole-bucket scratch buffer (`ParamStorage.gather_target`).

Must not import torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shardoptim.layout import Layout, LocalSlice
from shardoptim.segments import Segments


class FlatBuffers:
    """Allocate one zero-padded buffer per bucket of `layout` and copy the parameters in (or not: own storage).

    Args:
        layout: where every parameter goes (indices refer to `params`).
        params: the parameters the layout places, in layout index order. All parameters of a
            bucket must share a device and dtype (the layout's keys guarantee it).
        full: hold whole buckets (True), or keep the parameters in their own storage (False).
        offset: position of `params[0]` in the optimizer's list of all parameters; the methods
            below take and return indices into that list.

    The parameters are not touched until `bind_params_` is called.
    """

    def __init__(self, layout: Layout, params: Sequence[torch.Tensor], *, full: bool = True, offset: int = 0) -> None:
        self.layout = layout
        self.full = full
        self.buffers: list[torch.Tensor | None] = []
        """Per bucket: the whole bucket (full), else None."""
        self._index_to_home: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for bucket in layout.buckets:
                first = params[bucket.placements[0].index]
                self.buffers.append(
                    torch.zeros(bucket.padded_numel, dtype=first.dtype, device=first.device) if full else None
                )
            for b, bucket in enumerate(layout.buckets):
                buffer = self.buffers[b]
                for placement in bucket.placements:
                    param = params[placement.index]
                    index = offset + placement.index
                    if buffer is not None:
                        view = buffer.narrow(0, placement.start_global, placement.numel)
                        view.copy_(param.detach().reshape(-1))
                        self._index_to_home[index] = view.view(param.shape)
                    else:
                        # NOTE: a non-contiguous parameter (rare) gets a contiguous home at bind time.
                        self._index_to_home[index] = param.detach().contiguous()
        self._offset = offset

    def indices(self) -> list[int]:
        """Return the optimizer indices of the parameters these buffers hold."""
        return list(self._index_to_home)

    def homes(self) -> list[tuple[int, torch.Tensor]]:
        """Return (optimizer index, full-shape tensor the parameter's storage will be) for every parameter."""
        return list(self._index_to_home.items())

    def segments(self, b: int) -> Segments:
        """Return bucket `b` as flat segments: its one buffer, or its parameters' homes end to end."""
        buffer = self.buffers[b]
        if buffer is not None:
            return Segments.whole(buffer)
        bucket = self.layout.buckets[b]
        parts = [
            (p.start_global, self._index_to_home[self._offset + p.index].view(-1))
            for p in sorted(bucket.placements, key=lambda p: p.start_global)
        ]
        return Segments(parts, bucket.padded_numel)

    def local_view(self, piece: LocalSlice, *, shape: torch.Size | None = None) -> torch.Tensor:
        """Return the owned piece of a parameter as a view of its bucket or home (1-D, or `shape` if given)."""
        home = self._index_to_home[self._offset + piece.index].view(-1)
        view = home.narrow(0, piece.in_param.start, piece.in_param.numel)
        return view if shape is None else view.view(shape)

    def bind_params_(self, params: Sequence[torch.Tensor]) -> None:
        """Point every parameter's storage at its home (values are already there).

        Args:
            params: the optimizer's list of all parameters (indexed with the offset).
        """
        for index, home in self._index_to_home.items():
            if not at_home(params[index], home):
                params[index].data = home


def at_home(param: torch.Tensor, home: torch.Tensor) -> bool:
    """Return whether `param`'s storage is `home` (the same memory, laid out the same way)."""
    return param.data_ptr() == home.data_ptr() and param.stride() == home.stride()
