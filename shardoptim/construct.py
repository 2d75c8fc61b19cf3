"""The checks and reports of building a ShardedOptimizer, apart from the facade that runs them.

What a kind supports, the MPI choice settled up front, the layout logged and the replicated
warning given once, and the base class's own default for a flag the wrapper injects. Must not
import shardoptim.optimizer.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from shardoptim.comm import Comm
from shardoptim.config import ShardConfig
from shardoptim.hparams import STRUCTURE_KEYS
from shardoptim.kinds import Kind
from shardoptim.placement import Placement
from shardoptim.probe import ProbeVerdict
from shardoptim.step_lbfgs import LBFGSStep, PlacementShardAccess
from shardoptim.step_replicated import ReplicatedStep
from shardoptim.step_sharded import ShardedStep
from shardoptim.stepping import StepContext, StepSkeleton

logger = logging.getLogger("shardoptim.optimizer")


def check_supported(
    kind: Kind, config: ShardConfig, optimizer_class: type[Optimizer], reason: str, *, num_groups: int
) -> None:
    """Refuse options the kind cannot honour exactly, naming them and what to use instead."""
    if kind == "lbfgs" and num_groups != 1:
        raise ValueError(
            f"torch.optim.LBFGS supports one param group, got {num_groups}; pass the parameters as one "
            "group (LBFGS does not support per-parameter options)"
        )
    if kind == "lbfgs" and config.compile is not False:
        raise ValueError(
            f"compile={config.compile!r} is not supported with LBFGS: its sharded step evaluates the closure and "
            "all-reduces inside every iteration, which is no single local update to compile; drop compile"
        )
    if kind == "lbfgs" and (config.stage != 1 or config.master_dtype or config.skip_nonfinite):
        raise ValueError(
            f"the sharded LBFGS supports stage=1 without master_dtype or skip_nonfinite, got stage={config.stage}, "
            f"master_dtype={config.master_dtype}, skip_nonfinite={config.skip_nonfinite}; drop those options"
        )
    if kind == "replicated" and (config.stage != 1 or config.master_dtype):
        raise ValueError(
            f"{optimizer_class.__name__} runs replicated (unsharded) on every rank ({reason}), "
            f"which supports stage=1 without master_dtype, got stage={config.stage}, "
            f"master_dtype={config.master_dtype}; use stage=1 with DDP, or declare the class with "
            "shardoptim.register_elementwise / register_per_tensor if you know it is safe to shard"
        )
    if config.stage == 2 and optimizer_class is torch.optim.SparseAdam:
        raise ValueError("SparseAdam needs sparse gradients, which stage=2 cannot reduce-scatter; use stage=1 with DDP")


def log_probe(optimizer_class: type[Optimizer], verdicts: Sequence[ProbeVerdict], deciding: ProbeVerdict, kind: Kind) -> None:
    """Log at INFO what probing the class found and the sharding it chose."""
    logger.info(
        "probed %s at %d distinct group option set(s): %s -> sharding %r (a class of unknown kind gets "
        "whole tensors at most; declare it with shardoptim.register_elementwise for flat balance, or "
        "register_per_tensor to skip the probe)",
        optimizer_class.__name__,
        len(verdicts),
        deciding.reason,
        kind,
    )


#: The step strategy of each sharding kind.
_STRATEGIES: dict[Kind, type[StepSkeleton]] = {
    "flat": ShardedStep,
    "tensor": ShardedStep,
    "replicated": ReplicatedStep,
    "lbfgs": LBFGSStep,
}


def stepper_for(ctx: StepContext) -> StepSkeleton:
    """Return the step strategy of the placement's kind, working on `ctx`."""
    return _STRATEGIES[ctx.placement.kind](ctx)


def local_optimizer(
    placement: Placement, local_groups: list[dict[str, Any]], options: dict[str, Any]
) -> Optimizer:
    """Build the base optimizer over this rank's pieces; raise on every rank when any rank's refused.

    Collective: call on every rank, in the same order (one small agreement on the CPU).
    """
    cls = placement.optimizer_class
    optim: Optimizer | None = None
    failure: Exception | None = None
    try:
        if placement.kind == "lbfgs":
            from shardoptim.lbfgs import ShardedLBFGS
            optim = ShardedLBFGS(local_groups, shard=PlacementShardAccess(placement), **options)
        else:
            optim = cls(local_groups, **options)
    except Exception as err:
        failure = err
    placement.meta.raise_if_any_failed(failure, what=f"{cls.__name__} rejected the parameters")
    assert optim is not None
    return optim


def adopt_local_options(wrapper_groups: Sequence[dict[str, Any]], local_groups: Sequence[Mapping[str, Any]]) -> None:
    """Give each wrapper group the options the base class filled in for its local group (defaults)."""
    for wrapper_group, local_group in zip(wrapper_groups, local_groups):
        for key, value in local_group.items():
            if key not in STRUCTURE_KEYS:
                wrapper_group.setdefault(key, value)


def agree_on_new_group(meta: Comm, new_params: Sequence[torch.Tensor]) -> None:
    """Raise on every rank when ranks add different groups (count and elements of the new parameters).

    Collective: call on every rank, in the same order (one small all-gather on the CPU).
    """
    numel = torch.tensor([len(new_params), sum(p.numel() for p in new_params)], dtype=torch.float64)
    gathered = meta.to_host(meta.all_gather(numel.to(meta.device), what="add_param_group check"))
    if not bool((gathered == gathered[0]).all()):
        raise ValueError(
            f"{meta.prefix}add_param_group got different groups on different ranks "
            f"((num_params, numel) per rank: {gathered.tolist()}); add the same group on every rank"
        )


def settle_comm_backend(config: ShardConfig, comm: Comm) -> None:
    """Refuse comm_backend="mpi" now, on every rank, when MPI cannot serve this group.

    Collective (at construction, which is collective anyway).
    """
    if config.comm_backend != "mpi" or comm.world_size == 1:
        return
    if comm.backend != "gloo":
        warnings.warn(
            f"comm_backend='mpi' has no effect on the {comm.backend} backend: the mpi4py path serves "
            "CPU (gloo) groups only",
            stacklevel=4,
        )
        return
    comm.gathers_synchronously(torch.device("cpu"))  # opens MPI or raises on every rank


def log_layout(placement: Placement, *, replication_reason: str) -> None:
    """On rank 0: warn that a class runs replicated (unless the user chose it), log the layout at INFO."""
    comm, config = placement.comm, placement.config
    name = placement.optimizer_class.__name__
    if comm.rank != 0:
        return
    if placement.kind == "replicated" and comm.world_size > 1 and config.sharding != "replicated":
        warnings.warn(
            f"{name} is not sharded: it runs unsharded on every rank with its full state (correct, no memory "
            f"saving), because {replication_reason}. If you know its update is elementwise or per-tensor, "
            "declare it with shardoptim.register_elementwise or register_per_tensor",
            stacklevel=4,
        )
    if not logger.isEnabledFor(logging.INFO):
        return
    rank_to_numel = placement.rank_to_numel()
    total = sum(rank_to_numel)
    logger.info(
        "ShardedOptimizer(%s, %s): %d ranks, %d buckets, %s elements per rank (max), imbalance %.6f",
        name,
        placement.kind,
        comm.world_size,
        len(placement.buckets),
        f"{max(rank_to_numel):,}",
        max(rank_to_numel) * len(rank_to_numel) / total if total else 1.0,
    )


def class_default(optimizer_class: type[Optimizer], name: str) -> Any:
    """Return the default of keyword `name` in the class's constructor (None when it has none)."""
    try:
        default = inspect.signature(optimizer_class.__init__).parameters[name].default
    except (KeyError, TypeError, ValueError):
        return None
    return None if default is inspect.Parameter.empty else default
