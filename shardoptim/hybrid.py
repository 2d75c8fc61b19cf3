"""Hybrid sharding: shard within a group of ranks (a node), replicate across such groups.

At thousands of ranks an all-gather across every rank spans the whole cluster. Hybrid sharding
keeps the optimizer state sharded within a shard group (typically the ranks of one node, joined by
fast links) and one full copy per shard group: each replicate group holds the ranks with the same
position in every shard group. What crosses the replicate groups:

- stage 1: nothing from the optimizer (DDP's all-reduce over every rank already averaged the
  gradients, and every shard group updates identically);
- stage 2: each rank's reduce-scattered gradient shard is averaged across its replicate group,
  once before the gradients are read (step, clipping, unscaling);
- every step, the hyperparameters (and, for classes that draw random numbers, the generator
  state), so every rank holds the values of global rank 0's shard group, the lead replica.

Checkpoints come from the lead replica only (the shard group holding global rank 0); loading
works at any (shard, replicate) shape, as every rank reads the pieces it owns.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.distributed as dist

from shardoptim.comm import Comm

#: Environment variables that say how many ranks run on this node, in the order they are read.
_LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


class HybridGroups(NamedTuple):
    """The two process groups of this rank: unpack as `shard_group, replicate_group = ...`."""

    shard_group: dist.ProcessGroup
    """The ranks this rank shards the optimizer state with (its node)."""
    replicate_group: dist.ProcessGroup
    """The ranks holding the same shard as this rank in every other shard group."""


def local_world_size(environ: Any = None) -> int | None:
    """Return the ranks per node the launcher announced (torchrun, Open MPI, MPICH, Slurm), or None."""
    env = os.environ if environ is None else environ
    for name in _LOCAL_SIZE_VARS:
        raw = str(env.get(name, "")).split("(")[0].split(",")[0].strip()  # Slurm: "4(x2)" or "4,4"
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    return None


def hybrid_groups(shard_size: int | None = None) -> HybridGroups:
    """Build the node-local layout: shard within each block of `shard_size` consecutive ranks.

    Shard groups are ranks [k * S, (k + 1) * S), replicate groups ranks {i, i + S, i + 2S, ...}
    (S = `shard_size`, by default the launcher's ranks per node, LOCAL_WORLD_SIZE under torchrun).
    Pass the result to `ShardedOptimizer(..., shard_group=..., replicate_group=...)`.

    Collective: call on every rank of the default group, in the same order (it creates groups).

    Raises:
        ValueError: no shard size is given or announced, or it does not divide the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "hybrid_groups() needs torch.distributed; call shardoptim.init_distributed() (or "
            "torch.distributed.init_process_group) first"
        )
    world = dist.get_world_size()
    size = shard_size if shard_size is not None else local_world_size()
    if size is None:
        raise ValueError(
            "hybrid_groups(): the launcher did not say how many ranks run per node (LOCAL_WORLD_SIZE and the "
            f"MPI/Slurm equivalents {list(_LOCAL_SIZE_VARS[1:])} are unset); pass shard_size=..."
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(
            f"hybrid_groups(): shard_size={size!r} must be a positive divisor of the world size {world}; "
            "use the ranks per node (or a multiple of it that divides the world)"
        )
    shard_lists = [list(range(k * size, (k + 1) * size)) for k in range(world // size)]
    replicate_lists = [list(range(i, world, size)) for i in range(size)]
    shard, _ = dist.new_subgroups_by_enumeration(shard_lists)  # type: ignore[no-untyped-call]
    replicate, _ = dist.new_subgroups_by_enumeration(replicate_lists)  # type: ignore[no-untyped-call]
    assert shard is not None and replicate is not None
    return HybridGroups(shard, replicate)


def resolve_groups(
    process_group: dist.ProcessGroup | None,
    shard_group: dist.ProcessGroup | None,
    replicate_group: dist.ProcessGroup | None,
    device_mesh: Any,
) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """Return (shard group, replicate group or None) from the ways the user can name them.

    `process_group` and `shard_group` are the same thing (the first is ZeroRedundancyOptimizer's
    name); a `device_mesh` replaces both: 1-D shards over its one dimension, 2-D is (replicate,
    shard) as in FSDP's hybrid sharding, or picked by the dimension names "replicate" and "shard".
    """
    if process_group is not None and shard_group is not None and process_group is not shard_group:
        raise ValueError(
            "process_group and shard_group name the same thing (the ranks to shard over); pass only one"
        )
    shard = shard_group if shard_group is not None else process_group
    if device_mesh is None:
        return shard, replicate_group
    if shard is not None or replicate_group is not None:
        raise ValueError(
            "device_mesh replaces process_group / shard_group / replicate_group; pass either the mesh or the groups"
        )
    names = tuple(device_mesh.mesh_dim_names or ())
    if device_mesh.ndim == 1:
        return device_mesh.get_group(0), None
    if device_mesh.ndim != 2:
        raise ValueError(
            f"device_mesh must be 1-D (shard) or 2-D (replicate, shard), got {device_mesh.ndim} dimensions "
            f"{names or ''}; slice the mesh to the data-parallel dimensions, e.g. mesh['replicate', 'shard']"
        )
    if "shard" in names and "replicate" in names:
        return device_mesh.get_group("shard"), device_mesh.get_group("replicate")
    return device_mesh.get_group(1), device_mesh.get_group(0)


@dataclass(frozen=True, slots=True)
class Replicas:
    """The replicate dimension of a hybrid optimizer, checked to form a grid with the shard groups."""

    comm: Comm
    """The replicate group (one rank of every shard group, all at this rank's shard position)."""
    lead: int
    """The rank in `comm` that belongs to the lead replica (the shard group of the lowest global rank)."""

    @property
    def is_lead(self) -> bool:
        """Whether this rank's shard group is the lead replica (it saves and consolidates)."""
        return self.comm.rank == self.lead

    @property
    def size(self) -> int:
        return self.comm.world_size

    @staticmethod
    def create(shard: Comm, group: dist.ProcessGroup | None) -> Replicas | None:
        """Check `group` against the shard group; return None when there is nothing to replicate.

        Collective: call on every rank, in the same order (one object all-gather over `group`).

        Raises:
            ValueError: on every rank of the replicate group, when the groups do not form a grid:
                members at different shard positions, shard groups of different sizes or
                overlapping.
        """
        if group is None:
            return None
        comm = Comm(group, backend_choice="torch")
        if comm.world_size == 1:
            return None
        members = tuple(shard.global_rank(r) for r in range(shard.world_size))
        mine = (shard.rank, shard.world_size, members)
        rows = comm.all_gather_object(mine, what="hybrid layout check")
        positions = [row[0] for row in rows]  # type: ignore[index]
        sizes = [row[1] for row in rows]  # type: ignore[index]
        groups = [set(row[2]) for row in rows]  # type: ignore[index]
        problem = ""
        if len(set(sizes)) != 1:
            problem = f"the shard groups have different sizes {sizes}"
        elif len(set(positions)) != 1:
            problem = f"its members sit at different shard ranks {positions}"
        elif sum(len(g) for g in groups) != len(set().union(*groups)):
            problem = f"the shard groups of its members overlap ({[sorted(g) for g in groups]})"
        if problem:
            raise ValueError(
                f"{comm.prefix}replicate_group does not fit the shard groups: {problem}. Each replicate group must "
                "hold one rank of every shard group, all at the same shard rank; shardoptim.hybrid_groups() builds "
                "such groups"
            )
        # NOTE: the shard group of the lowest global rank (rank 0 when the groups cover the world):
        # every replicate group sees every shard group, so all of them pick the same one.
        lead = min(range(len(groups)), key=lambda r: min(groups[r]))
        return Replicas(comm, lead)
