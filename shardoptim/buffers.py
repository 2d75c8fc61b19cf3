"""Flat padded buffers, one per bucket of a layout, and the parameter views into them.

Two kinds, chosen by `full`:

- full (parameters as bucket views): one buffer per whole bucket; after `bind_params_` every
  parameter's storage is a view into it, so the all-gather of a bucket writes straight into the
  model's weights (no copy), and the local optimizer's slices are views of the same memory.
- owned only (parameters in their own storage): each buffer holds just this rank's range of
  its bucket, which the local optimizer updates; a whole bucket exists only while it is
  gathered (`ParamStorage.gather_target`), after which its values are copied out into the parameters. The
  parameters are then the one full copy of the weights on the rank.

Must not import torch.distributed.
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
        rank: this rank (whose range an owned-only buffer holds).
        full: hold whole buckets (True) or only this rank's range of each (False).
        offset: position of `params[0]` in the optimizer's list of all parameters; the methods
            below take and return indices into that list.

    The parameters are not touched until `bind_params_` is called.
    """

    def __init__(
        self, layout: Layout, params: Sequence[torch.Tensor], *, rank: int, full: bool = True, offset: int = 0
    ) -> None:
        self.layout = layout
        self.full = full
        self.buffers: list[torch.Tensor] = []
        """Per bucket: the whole bucket (full) or this rank's range of it."""
        self.starts: list[int] = []
        """Per bucket: where `buffers[b]` starts in the whole bucket (0 when full)."""
        self._index_to_view: dict[int, torch.Tensor] = {}
        self._indices: list[int] = []
        self._index_to_owned: dict[int, list[tuple[int, torch.Tensor]]] = {}
        with torch.no_grad():
            for bucket in layout.buckets:
                first = params[bucket.placements[0].index]
                start = 0 if full else bucket.bounds[rank]
                numel = bucket.padded_numel if full else bucket.bounds[rank + 1] - start
                self.buffers.append(torch.zeros(numel, dtype=first.dtype, device=first.device))
                self.starts.append(start)
            for b, bucket in enumerate(layout.buckets):
                for placement in bucket.placements:
                    param = params[placement.index]
                    index = offset + placement.index
                    self._indices.append(index)
                    if full:
                        view = self.buffers[b].narrow(0, placement.start_global, placement.numel)
                        view.copy_(param.detach().reshape(-1))
                        self._index_to_view[index] = view.view(param.shape)
            for piece in layout.local_slices(rank):
                owned = self.local_view(piece)
                if not full:
                    flat = params[piece.index].detach().reshape(-1)
                    owned.copy_(flat.narrow(0, piece.in_param.start, piece.in_param.numel))
                self._index_to_owned.setdefault(offset + piece.index, []).append((piece.in_param.start, owned))

    def indices(self) -> list[int]:
        """Return the optimizer indices of the parameters these buffers hold."""
        return list(self._indices)

    def items(self) -> list[tuple[int, torch.Tensor]]:
        """Return (optimizer index, full-shape view in its bucket) for every parameter (full only)."""
        return list(self._index_to_view.items())

    def owned_parts(self) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """Return per optimizer index the (offset in the flat parameter, 1-D view) of the parts this rank owns."""
        return self._index_to_owned

    def local_view(self, piece: LocalSlice, *, shape: torch.Size | None = None) -> torch.Tensor:
        """Return the owned piece of a parameter as a view of its buffer (1-D, or `shape` if given)."""
        start = piece.start_global - self.starts[piece.bucket]
        view = self.buffers[piece.bucket].narrow(0, start, piece.in_param.numel)
        return view if shape is None else view.view(shape)

    def bind_params_(self, params: Sequence[torch.Tensor]) -> None:
        """Point every parameter's storage at its view in the buckets (values are already there).

        Args:
            params: the optimizer's list of all parameters (indexed with the offset).
        """
        assert self.full, "only whole buckets can back the parameters"
        for index, view in self._index_to_view.items():
            params[index].data = view
