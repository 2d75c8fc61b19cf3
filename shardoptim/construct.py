"""The steps of building a ShardedOptimizer, written out apart from the facade that runs them in order.

Checks and reports: options the kind cannot honour, what the probe found, the layout logged and
the replicated warning given once, the checks of a group added later. Wiring: the groups opened
into Comms and an empty Placement (the MPI choice settled up front), the base class's options
with the flags the wrapper injects, the local optimizer over this rank's pieces, the step
strategy with its gradients and hyperparameter syncs, an added group placed or undone. The facade
keeps what these return (and documents it as its attributes). Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from shardoptim.comm import Comm
from shardoptim.compiled import CompiledUpdate
from shardoptim.config import ShardConfig
from shardoptim.grads import GradReducer
from shardoptim.hparams import STRUCTURE_KEYS, HparamSync, HparamSyncer
from shardoptim.hybrid import Replicas, resolve_groups
from shardoptim.kinds import Kind, KindChoice, check_new_group, choose_kind, resolve_impl_flags
from shardoptim.owned_grads import OwnedGrads
from shardoptim.params import as_param_groups, probe_complex_support, validate_new_params
from shardoptim.placement import Placement
from shardoptim.probe import ProbeVerdict
from shardoptim.step_lbfgs import LBFGSStep, PlacementShardAccess
from shardoptim.step_replicated import ReplicatedStep
from shardoptim.step_sharded import ShardedStep
from shardoptim.stepping import StepContext, StepSkeleton

logger = logging.getLogger("shardoptim.optimizer")


def refuse_overlap_with_ddp(overlap_with_ddp: bool) -> None:
    """Refuse ZeroRedundancyOptimizer's overlap_with_ddp=True, pointing at stage=2 instead."""
    if overlap_with_ddp is not False:
        raise ValueError(
            f"overlap_with_ddp={overlap_with_ddp!r} is not supported: ShardedOptimizer does not hook into DDP's "
            "communication. Use stage=2 without DDP instead: it reduce-scatters the gradients during backward "
            "(overlapped) and shards them too: ShardedOptimizer(params, cls, stage=2, ...)"
        )


def settle_kind(
    optimizer_class: type[Optimizer], config: ShardConfig, defaults: Mapping[str, Any], groups: list[dict[str, Any]]
) -> KindChoice:
    """Choose the sharding kind (probing a class of unknown kind), log what the probe found, and
    refuse the options that kind cannot honour (see `check_supported`)."""
    choice = choose_kind(optimizer_class, config.sharding, defaults, groups)
    if choice.deciding is not None:
        log_probe(optimizer_class, choice.verdicts, choice.deciding, choice.kind)
    check_supported(choice.kind, config, optimizer_class, replication_reason(choice), num_groups=len(groups))
    return choice


def replication_reason(choice: KindChoice) -> str:
    """Return why the class runs unsharded on every rank ("" unless the kind is "replicated")."""
    return choice.reason if choice.kind == "replicated" else ""


def base_options(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    groups: list[dict[str, Any]],
    params: list[torch.Tensor],
    kind: Kind,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the base class's options with fused/foreach chosen, and the flags the wrapper chose.

    The second dict maps each flag the wrapper injected (not in `defaults`) to the class's own
    default, which consolidated param_groups record. Refuses complex parameters the chosen
    implementation cannot update (not for LBFGS, which runs its own flat update).
    """
    options = resolve_impl_flags(optimizer_class, defaults, groups)
    injected = {k: class_default(optimizer_class, k) for k in options if k not in defaults}
    if kind != "lbfgs":
        probe_complex_support(optimizer_class, options, params)
    return options, injected


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


def open_placement(
    config: ShardConfig,
    kind: Kind,
    optimizer_class: type[Optimizer],
    process_group: dist.ProcessGroup | None,
    shard_group: dist.ProcessGroup | None,
    replicate_group: dist.ProcessGroup | None,
    device_mesh: Any,
) -> Placement:
    """Open the Comms of the groups the user named (as `hybrid.resolve_groups` takes them) and
    return the Placement on them, empty.

    The shard group's Comm, the replicate group's with hybrid sharding (shardoptim.hybrid), and
    the Comm of the step's host-read metadata; comm_backend="mpi" is settled here, before anything
    touches the parameters.

    Collective: call on every rank of the group, in the same order (at construction).
    """
    shard_pg, replicate_pg = resolve_groups(process_group, shard_group, replicate_group, device_mesh)
    comm = Comm(shard_pg, backend_choice=config.comm_backend)
    replicas = Replicas.create(comm, replicate_pg)
    # NOTE: the per-step agreements travel on a CPU group, so step() never waits for the GPU.
    meta = comm.for_metadata()
    settle_comm_backend(config, comm)  # before anything touches the parameters
    return Placement(kind=kind, comm=comm, meta=meta, replicas=replicas, config=config, optimizer_class=optimizer_class)


def grad_reducer(placement: Placement) -> GradReducer | None:
    """Return the stage-2 gradient reducer (averaging across the replicate group too), None at stage 1."""
    if placement.config.stage != 2:
        return None
    replicate = None if placement.replicas is None else placement.replicas.comm
    return GradReducer(placement.comm, placement, replicate=replicate)


def build_stepper(
    placement: Placement,
    optim: Optimizer,
    *,
    groups: Callable[[], list[dict[str, Any]]],
    hparam_sync: HparamSync,
    reducer: GradReducer | None,
    uses_rng: bool,
    update: CompiledUpdate,
    verify: Callable[[], None],
) -> StepSkeleton:
    """Return the step strategy of the placement's kind, wired to what a step works on.

    This rank's gradients (shardoptim.owned_grads), the hyperparameter sync over the metadata Comm
    and, with hybrid sharding, the one from the lead replica across the replicate group.

    Collective the first time a replicate group without a CPU backend is met (see Comm.for_metadata).
    """
    replicas = placement.replicas
    ctx = StepContext(
        placement=placement,
        optim=optim,
        groups=groups,
        hparams=HparamSyncer(placement.meta, hparam_sync),
        replica_hparams=None
        if replicas is None
        else HparamSyncer(replicas.comm.for_metadata(), hparam_sync, source=replicas.lead),
        grads=OwnedGrads(placement.comm, placement, reducer, whole_tensors=placement.kind != "flat"),
        reducer=reducer,
        uses_rng=uses_rng,
        update=update,
        verify=verify,
    )
    return _STRATEGIES[placement.kind](ctx)


def local_optimizer(
    placement: Placement,
    params: list[torch.Tensor],
    wrapper_groups: list[dict[str, Any]],
    options: dict[str, Any],
) -> Optimizer:
    """Place `params` (those of every wrapper group) and build the base optimizer over this rank's
    pieces; raise on every rank when any rank's refused them.

    Collective: call on every rank, in the same order (one small agreement on the CPU).
    """
    local_groups = placement.place_(params, list(range(len(wrapper_groups))), wrapper_groups)
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


def adopt_local_defaults(
    wrapper_defaults: dict[str, Any], wrapper_groups: Sequence[dict[str, Any]], optim: Optimizer
) -> None:
    """Give the wrapper the defaults and group options the base class filled in for the local optimizer."""
    for key, value in optim.defaults.items():
        wrapper_defaults.setdefault(key, value)
    adopt_local_options(wrapper_groups, optim.param_groups)


def adopt_local_options(wrapper_groups: Sequence[dict[str, Any]], local_groups: Sequence[Mapping[str, Any]]) -> None:
    """Give each wrapper group the options the base class filled in for its local group (defaults)."""
    for wrapper_group, local_group in zip(wrapper_groups, local_groups):
        for key, value in local_group.items():
            if key not in STRUCTURE_KEYS:
                wrapper_group.setdefault(key, value)


def checked_new_group(
    placement: Placement, param_group: dict[str, Any], *, probe_defaults: Mapping[str, Any] | None
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Return a group given to add_param_group, normalised, with its new parameters; else raise on every rank.

    Refuses a second group for LBFGS, options under which the probed class (`probe_defaults`: the
    constructor's options; None when the class was not probed) would need another layout,
    parameters the optimizer already holds, and different groups on different ranks.

    Collective: call on every rank, in the same order (one small all-gather on the CPU).
    """
    if placement.kind == "lbfgs":
        raise ValueError(
            "torch.optim.LBFGS supports one param group; pass every parameter when building the optimizer"
        )
    groups = as_param_groups([param_group])
    if probe_defaults is not None:
        check_new_group(placement.optimizer_class, probe_defaults, groups[0], placement.kind)
    new_params = validate_new_params(groups, existing=placement.params)
    agree_on_new_group(placement.meta, new_params)
    return groups[0], new_params


def place_new_group(
    placement: Placement,
    new_params: list[torch.Tensor],
    wrapper_groups: list[dict[str, Any]],
    optim: Optimizer,
    reducer: GradReducer | None,
) -> None:
    """Place the wrapper's last group (just added, holding `new_params`) and give it the local options.

    When placing fails on any rank, the group is removed from `wrapper_groups` on every rank (as
    before the call) and the error raised. Collective: call on every rank, in the same order.
    """
    try:
        placement.add_group_(new_params, wrapper_groups, optim, reducer)
    except Exception:
        del wrapper_groups[-1]  # every rank: as it was before the call
        raise
    adopt_local_options(wrapper_groups[-1:], optim.param_groups[-1:])


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
            stacklevel=5,  # NOTE: called by open_placement, one frame deeper than ShardedOptimizer.__init__
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
