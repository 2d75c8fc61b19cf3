"""The placed state of a ShardedOptimizer: where every parameter lives and what this rank owns of it.

One `Placement` holds the parameters, their buckets and layouts, this rank's pieces, the master
copies and the parameters' storage, and whether optimizer state exists. It is built by `place_`
(at construction, and again for each added group) and handed explicitly to the modules that
read the shards: the step strategies, gradients, state_dict, checkpoint, replicas and LBFGS. They
read its public attributes and never mutate them; only `place_`, `bind_` and `restore_` grow or
shrink the lists, so a module holding the Placement always sees a whole, consistent state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from shardoptim.buffers import FlatBuffers, RegionOpener
from shardoptim.comm import Comm
from shardoptim.config import ShardConfig
from shardoptim.entry import EntryCheck
from shardoptim.grads import GradReducer, GradSlot
from shardoptim.hparams import STRUCTURE_KEYS
from shardoptim.hybrid import Replicas
from shardoptim.kinds import Kind, tensor_cost
from shardoptim.layout import Layout
from shardoptim.master import MasterShards
from shardoptim.pieces import Bucket, Piece, place_params
from shardoptim.replicated import whole_pieces
from shardoptim.storage import ParamStorage


@dataclass(frozen=True)
class PlacementMark:
    """How much had been placed at one moment: what `Placement.restore_` rolls back to."""

    counts: tuple[int, ...]
    tensor_loads: tuple[float, ...]


class Placement:
    """Where every parameter lives, what this rank owns, and whether optimizer state exists.

    Args:
        kind: the sharding kind ("flat", "tensor", "replicated", "lbfgs").
        comm: the shard group; meta: its Comm for host-read metadata (see Comm.for_metadata).
        replicas: the replicate dimension of hybrid sharding, or None.
        config: the wrapper's options.
        optimizer_class: the base optimizer class.
    """

    def __init__(
        self,
        *,
        kind: Kind,
        comm: Comm,
        meta: Comm,
        replicas: Replicas | None,
        config: ShardConfig,
        optimizer_class: type[Optimizer],
    ) -> None:
        self.kind: Kind = kind
        self.comm = comm
        self.meta = meta
        self.replicas = replicas
        self.config = config
        self.optimizer_class = optimizer_class
        self.params: list[torch.Tensor] = []
        """Every parameter, in the order of the wrapper's param groups (optimizer indices)."""
        self.buckets: list[Bucket] = []
        self.pieces: list[Piece] = []
        """This rank's pieces of the parameters, in local-optimizer order."""
        self.layouts: list[Layout] = []
        """One layout per batch of placed parameters (construction, then each added group)."""
        self.buffers: list[FlatBuffers] = []
        self.tensor_loads = [0.0] * comm.world_size
        self.masters = MasterShards(config.master_dtype or torch.float32)
        self.storage = ParamStorage(
            as_bucket_view=config.parameters_as_bucket_view, track_writes=config.master_dtype is not None
        )
        self.has_state = False
        """Whether optimizer state may exist on some rank (a step was taken or state was loaded):
        the same on every rank, so state_dict() can decide without communicating."""
        self.consolidated: dict[str, Any] | None = None
        """The consolidated state_dict kept on its target rank until the next step or load."""
        self.consolidated_to: int | None = None
        self.entry: EntryCheck | None = None
        """The entry check of consolidation and sharded checkpoints (set once construction succeeded)."""

    # --------------------------------------------------------------------------- building

    def place_(
        self, new_params: list[torch.Tensor], group_indices: list[int], param_groups: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """Lay out `new_params` (of `param_groups[g]` for g in `group_indices`); return the local group dicts.

        The parameters are not yet bound to the buckets (`bind_` does that once the local
        optimizer accepted the groups, so a rejected option leaves the model untouched).

        Collective: call on every rank, in the same order (CPU buckets may go into a peer region).
        """
        first_index = len(self.params)
        if self.kind == "replicated":
            pieces = whole_pieces(new_params, first_index=first_index)
            self.params.extend(new_params)
            self.pieces.extend(pieces)
            return [{**_options(param_groups[g]), "params": list(param_groups[g]["params"])} for g in group_indices]
        id_to_group = {id(p): g for g in group_indices for p in param_groups[g]["params"]}
        index_to_group = {first_index + i: id_to_group[id(p)] for i, p in enumerate(new_params)}
        placed = place_params(
            new_params,
            first_index=first_index,
            first_bucket=len(self.buckets),
            index_to_group=index_to_group,
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            whole_tensors=self.kind == "tensor",
            cost=tensor_cost(self.optimizer_class),
            tensor_loads=self.tensor_loads,
            bucket_numel=self.config.bucket_numel,
            masters=self.masters,
            master_dtype=self.config.master_dtype,
            full=self.config.parameters_as_bucket_view,
            # NOTE: at stage 2 gradients come from the reduced shards, never from .grad.
            param_locals=self.config.stage == 1 and self.kind in ("flat", "tensor"),
            open_region=self._region_opener(new_params),
        )
        self.layouts.append(placed.layout)
        self.params.extend(new_params)
        self.buffers.append(placed.buffers)
        self.buckets.extend(placed.buckets)
        self.pieces.extend(placed.pieces)
        group_to_locals: dict[int, list[torch.Tensor]] = {g: [] for g in group_indices}
        for piece in placed.pieces:
            group_to_locals[index_to_group[piece.index]].append(piece.local)
        return [{**_options(param_groups[g]), "params": group_to_locals[g]} for g in group_indices]

    def _region_opener(self, new_params: Sequence[torch.Tensor]) -> RegionOpener | None:
        """How CPU buckets get into a peer region, when the group gathers them through shared memory."""
        if self.comm.world_size == 1 or all(p.device.type != "cpu" for p in new_params):
            return None
        return self.comm.transports.open_peer_region

    def bind_(self, first_bucket: int, reducer: GradReducer | None) -> None:
        """Point the latest placed parameters at their buckets; register buckets from `first_bucket` for stage 2."""
        if self.kind == "replicated":
            return
        self.storage.attach_(self.buffers[-1], self.params)
        if reducer is None:
            return
        for b in range(first_bucket, len(self.buckets)):
            bucket = self.buckets[b]
            slots = {
                index: GradSlot(b, start, self.params[index].numel())
                for index, start in zip(bucket.param_indices, bucket.starts)
            }
            dtype, device = bucket.segments.dtype, bucket.segments.device
            shard_dtype = self.masters.dtype if self.masters.has(b) else dtype
            reducer.add_bucket(
                numel=bucket.numel, dtype=dtype, device=device, bounds=bucket.bounds, shard_dtype=shard_dtype, slots=slots
            )

    def add_group_(
        self,
        new_params: list[torch.Tensor],
        param_groups: Sequence[Mapping[str, Any]],
        optim: Optimizer,
        reducer: GradReducer | None,
    ) -> None:
        """Place the last of `param_groups` (holding `new_params`) and add its local group to `optim`.

        On a failure on any rank every rank restores what was placed before and raises.
        Collective: call on every rank, in the same order (one small agreement on the CPU).
        """
        group_index = len(param_groups) - 1
        first_bucket = len(self.buckets)
        mark = self.mark()
        failure: Exception | None = None
        try:
            optim.add_param_group(self.place_(new_params, [group_index], param_groups)[0])
        except Exception as err:
            failure = err
        try:
            self.meta.raise_if_any_failed(failure, what="add_param_group")
        except Exception:
            self.restore_(mark)
            del optim.param_groups[group_index:]
            raise
        self.bind_(first_bucket, reducer)

    def mark(self) -> PlacementMark:
        """Return how much is placed now (for `restore_`)."""
        return PlacementMark(tuple(len(lst) for lst in self._lists()), tuple(self.tensor_loads))

    def restore_(self, mark: PlacementMark) -> None:
        """Drop everything placed after `mark` (a failed add_param_group, on every rank)."""
        for lst, count in zip(self._lists(), mark.counts):
            del lst[count:]
        self.tensor_loads[:] = mark.tensor_loads
        self.masters.drop_from_(len(self.buckets))

    def _lists(self) -> tuple[list[Any], ...]:
        return (self.params, self.buckets, self.pieces, self.buffers, self.layouts)

    # --------------------------------------------------------------------------- reading

    @property
    def norm_pieces(self) -> list[Piece]:
        """The pieces whose gradients count toward global norms and inf/nan checks.

        This rank's pieces; replicated, where every rank holds every piece, rank 0's only.
        """
        return self.pieces if self.kind != "replicated" or self.comm.rank == 0 else []

    def settle_(self) -> None:
        """Bring parameters moved or written from outside since the last step back into the buckets."""
        changed = self.storage.settle_(self.params, prefix=self.comm.prefix)
        if changed:
            with torch.no_grad():
                self.masters.reread_(set(changed))

    def rank_to_numel(self) -> list[int]:
        """Return the parameter elements whose state each rank owns (all groups; no communication)."""
        if self.kind == "replicated":
            return [sum(p.numel() for p in self.params)] * self.comm.world_size
        totals = [0] * self.comm.world_size
        for layout in self.layouts:
            for rank, numel in enumerate(layout.rank_to_numel()):
                totals[rank] += numel
        return totals

    def devices(self) -> list[torch.device]:
        return sorted({p.device for p in self.params}, key=str)

    # --------------------------------------------------------------------------- state status

    def open_entry(self) -> None:
        """Make the entry check of consolidation and checkpoints (once construction succeeded on every rank)."""
        self.entry = EntryCheck(
            self.comm.group,
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            deadline_s=self.config.entry_timeout_s,
            group_timeout_s=self.comm.timeout_s(),
        )

    def enter(self, what: str, *, lone_rank: int) -> None:
        """Check that every rank calls the collective `what` before it starts (see EntryCheck.enter).

        Collective: call on every rank of the group, in the same order.
        """
        if self.entry is None:
            raise RuntimeError(f"{what} called before the optimizer was fully built")
        self.entry.enter(what, lone_rank=lone_rank)

    def invalidate(self) -> None:
        """Drop the consolidated state_dict (the state is about to change: a step, a load)."""
        self.consolidated = None
        self.consolidated_to = None

    def mark_stepped(self) -> None:
        """Record that a step ran: state may exist on some rank from now on."""
        self.has_state = True

    def mark_loaded(self, has_state: bool) -> None:
        """Record that state was loaded (`has_state`: whether it held any), dropping the consolidated copy."""
        self.invalidate()
        self.has_state = has_state

    def keep_consolidated(self, state_dict: dict[str, Any] | None, to: int) -> None:
        """Keep the consolidated `state_dict` (None on every rank but `to`) until the next step or load."""
        self.consolidated = state_dict
        self.consolidated_to = to


def _options(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in STRUCTURE_KEYS}
