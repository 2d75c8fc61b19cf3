"""Check that every rank holds the same parameters and hyperparameters (silent divergence guard).

Must not import shardoptim.optimizer at import time (it is imported lazily from there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardoptim.hparam_pack import pack_hparams

if TYPE_CHECKING:
    from shardoptim.comm import Comm
    from shardoptim.optimizer import ShardedOptimizer

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(tensor: torch.Tensor, *, chunk_numel: int = 1 << 20) -> int:
    """Return an exact integer checksum of `tensor`'s bits (equal bits give equal sums on every rank).

    Position-weighted int64 sum (wrapping identically everywhere), computed chunk by chunk so the
    extra memory stays bounded.
    """
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.contiguous().view(_INT_VIEW[flat.element_size()])
    total = 0
    for start in range(0, bits.numel(), chunk_numel):
        part = bits[start : start + chunk_numel].to(torch.int64)
        weights = torch.arange(start + 1, start + part.numel() + 1, dtype=torch.int64, device=part.device)
        total = (total + int((part * weights).sum().item())) & 0xFFFFFFFFFFFFFFFF
    return total - (1 << 64) if total >= 1 << 63 else total


def verify_replicas(opt: ShardedOptimizer) -> None:
    """Raise RuntimeError on every rank when any parameter or hyperparameter differs across ranks.

    With hybrid sharding the check runs in the shard group and then in the replicate group: the
    two together compare every rank of the grid with every other.

    Collective: call on every rank, in the same order. Costs one read of every parameter and one
    small all-gather per group.
    """
    sums = [checksum(p) for p in opt.placement.params]
    if opt.placement.replicas is None:
        _verify_in(opt, opt.placement.comm, sums, "")
        return
    errors: list[RuntimeError] = []
    for comm, where in ((opt.placement.comm, " of the shard group"), (opt.placement.replicas.comm, " of the replicate group")):
        try:
            _verify_in(opt, comm, sums, where)
        except RuntimeError as err:
            errors.append(err)
    # NOTE: a difference is seen only by the groups it lies in; agree over both so every rank raises.
    flag = torch.tensor([float(bool(errors))], device=opt.placement.comm.device)
    opt.placement.comm.all_reduce_(flag, op="max", what="verify_replicas agreement")
    opt.placement.replicas.comm.all_reduce_(flag, op="max", what="verify_replicas agreement")
    if errors:
        raise errors[0]
    if bool(flag.item()):
        raise RuntimeError(
            f"{opt.placement.comm.prefix}verify_replicas: the replicas diverged on other ranks (their error names the "
            "parameter). Reload the last checkpoint on every rank"
        )


def _verify_in(opt: ShardedOptimizer, comm: Comm, sums: list[int], where: str) -> None:
    """Compare the checksums `sums` and the hyperparameters across the ranks of `comm`.

    Collective: call on every rank of `comm`, in the same order.
    """
    if comm.world_size == 1:
        return
    packed, _ = pack_hparams(opt.param_groups)
    local = torch.tensor(sums, dtype=torch.int64)
    hparams = packed.view(torch.int64)
    mine = torch.cat([torch.tensor([local.numel(), hparams.numel()], dtype=torch.int64), local, hparams])
    sizes = comm.all_gather(
        torch.tensor([mine.numel()], dtype=torch.int64, device=comm.device), what="verify_replicas"
    )
    if not bool((sizes == sizes[0]).all()):
        raise RuntimeError(
            f"{comm.prefix}verify_replicas: ranks hold different numbers of parameters or options "
            f"(sizes per rank {sizes.flatten().tolist()}); build the optimizer identically on every rank"
        )
    rows = comm.all_gather(mine.to(comm.device), what="verify_replicas").cpu()
    for index in range(len(sums)):
        column = rows[:, 2 + index]
        if not bool((column == column[0]).all()):
            p = opt.placement.params[index]
            names = [n for g in opt.param_groups for n in g.get("param_names", [None] * len(g["params"]))]
            label = f"parameter {index}" + (f" ({names[index]})" if names[index] else "")
            bad = (column != column[0]).nonzero().flatten().tolist()
            raise RuntimeError(
                f"{comm.prefix}verify_replicas: {label}, shape {tuple(p.shape)}, differs between rank 0{where} "
                f"and ranks {bad}: the replicas diverged (a rank-local change to the weights, or non-deterministic "
                "gradients without averaging). Reload the last checkpoint on every rank"
            )
    options = rows[:, 2 + len(sums) :]
    if not bool((options == options[0]).all()):
        raise RuntimeError(
            f"{comm.prefix}verify_replicas: the param_group options differ across ranks; use "
            "hparam_sync='broadcast' or change options identically on every rank"
        )
