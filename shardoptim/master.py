"""Master weights: this rank's shard of low-precision parameter buckets, kept in a wider dtype.

For a bf16 or fp16 bucket, the local optimizer updates an fp32 (or fp64) copy of the range this
rank owns; after the update the copy is cast back into the bucket, which is then gathered in the
model's dtype. Only 1/N of the parameters get a master copy on each rank.

A master copy follows the model when the model's weights are written from outside after the
optimizer was built (`model.load_state_dict`, `nn.init`, `p.copy_` under no_grad): the optimizer
(shardoptim.storage) finds those parameters at the next step and `reread_` copies them in.

Must not import torch.distributed or shardoptim.optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class MasterPiece:
    """One parameter's part of a master shard."""

    index: int
    """Position of the parameter in the optimizer's list of all parameters."""
    bucket: int
    start_local: int
    """Offset of the piece inside this rank's range of the bucket."""
    numel: int


def needs_master(param_dtype: torch.dtype, master_dtype: torch.dtype | None) -> bool:
    """Return whether parameters of `param_dtype` get master copies in `master_dtype`."""
    if master_dtype is None or not param_dtype.is_floating_point:
        return False
    return torch.finfo(param_dtype).bits < torch.finfo(master_dtype).bits


class MasterShards:
    """The master copies of this rank's ranges, one flat tensor per low-precision bucket.

    Each piece of a master shard is tied to its target: the same elements of the parameter in
    the model's dtype (a view into its bucket, or into its own storage).

    Args:
        dtype: the master dtype (torch.float32 or torch.float64).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._bucket_to_shard: dict[int, torch.Tensor] = {}
        self._bucket_to_pieces: dict[int, list[tuple[MasterPiece, torch.Tensor]]] = {}

    def add_bucket(self, bucket: int, numel: int, device: torch.device) -> None:
        """Create the (zero) master shard of bucket `bucket`: `numel` elements, this rank's range."""
        self._bucket_to_shard[bucket] = torch.zeros(numel, dtype=self.dtype, device=device)
        self._bucket_to_pieces[bucket] = []

    def has(self, bucket: int) -> bool:
        return bucket in self._bucket_to_shard

    def drop_from_(self, first_bucket: int) -> None:
        """Forget the master shards of buckets `first_bucket` and later (a placement rolled back)."""
        for bucket in [b for b in self._bucket_to_shard if b >= first_bucket]:
            del self._bucket_to_shard[bucket]
            del self._bucket_to_pieces[bucket]

    def add_piece(self, piece: MasterPiece, target: torch.Tensor) -> torch.Tensor:
        """Tie `piece` to `target` (1-D, the model's dtype), copy its values in; return the master piece."""
        local = self._bucket_to_shard[piece.bucket].narrow(0, piece.start_local, piece.numel)
        local.copy_(target)
        self._bucket_to_pieces[piece.bucket].append((piece, target))
        return local

    def reread_(self, indices: set[int]) -> None:
        """Copy the model's current values of parameters `indices` into their master pieces."""
        for pieces in self._bucket_to_pieces.values():
            for piece, target in pieces:
                if piece.index in indices:
                    self._bucket_to_shard[piece.bucket].narrow(0, piece.start_local, piece.numel).copy_(target)

    def nbytes(self) -> int:
        """Return the bytes of every master shard on this rank."""
        return sum(shard.numel() * shard.element_size() for shard in self._bucket_to_shard.values())

    def write_back_(self, buckets: Iterable[int]) -> None:
        """Cast the master copies of `buckets` into the model's parameters (before their gather)."""
        for bucket in buckets:
            if bucket not in self._bucket_to_shard:
                continue
            shard = self._bucket_to_shard[bucket]
            for piece, target in self._bucket_to_pieces[bucket]:
                target.copy_(shard.narrow(0, piece.start_local, piece.numel))


#: The state key under which a parameter's master piece is saved with the optimizer state.
MASTER_KEY = "master_param"
