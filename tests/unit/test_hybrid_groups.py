"""Hybrid sharding's argument handling and ranks-per-node discovery (no process group needed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer, hybrid_groups
from shardoptim.hybrid import local_world_size, resolve_groups


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LOCAL_WORLD_SIZE": "8"}, 8),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),
        ({"MPI_LOCALNRANKS": "2"}, 2),
        ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 4),
        ({"LOCAL_WORLD_SIZE": "", "MPI_LOCALNRANKS": "3"}, 3),
        ({"LOCAL_WORLD_SIZE": "0"}, None),
        ({}, None),
    ],
)
def test_local_world_size_reads_the_launchers_variables(environ: dict[str, str], expected: int | None) -> None:
    assert local_world_size(environ) == expected


class _Mesh:
    """Just what resolve_groups reads of a torch DeviceMesh."""

    def __init__(self, names: tuple[str, ...] | None, ndim: int) -> None:
        self.mesh_dim_names = names
        self.ndim = ndim

    def get_group(self, dim: Any) -> str:
        return f"group[{dim}]"


def test_device_mesh_dimensions_follow_fsdp_hybrid_convention() -> None:
    assert resolve_groups(None, None, None, _Mesh(("replicate", "shard"), 2)) == ("group[shard]", "group[replicate]")
    assert resolve_groups(None, None, None, _Mesh(None, 2)) == ("group[1]", "group[0]")
    assert resolve_groups(None, None, None, _Mesh(None, 1)) == ("group[0]", None)
    with pytest.raises(ValueError, match="must be 1-D .* or 2-D .* got 3 dimensions"):
        resolve_groups(None, None, None, _Mesh(("pp", "dp", "tp"), 3))


def test_conflicting_group_arguments_are_refused() -> None:
    a, b = object(), object()
    with pytest.raises(ValueError, match="process_group and shard_group name the same thing"):
        resolve_groups(a, b, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device_mesh replaces"):
        resolve_groups(None, None, a, _Mesh(None, 2))  # type: ignore[arg-type]


def test_without_torch_distributed_hybrid_groups_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="init_distributed"):
        hybrid_groups(shard_size=2)


def test_single_process_reports_one_replica() -> None:
    opt = ShardedOptimizer([torch.nn.Parameter(torch.ones(3))], torch.optim.SGD, lr=0.1)
    assert (opt.world_size, opt.num_replicas, opt.replica_rank) == (1, 1, 0)
