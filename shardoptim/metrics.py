"""Reduce a per-rank metric over the ranks before a scheduler that reads it (ReduceLROnPlateau).

Public as `shardoptim.all_reduce_metric`. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from shardoptim.comm import Comm

__all__ = ["all_reduce_metric"]


def all_reduce_metric(
    value: float | torch.Tensor,
    op: Literal["mean", "sum", "max", "min"] = "mean",
    *,
    process_group: Any = None,
) -> float:
    """Return `value` reduced over all ranks, e.g. before `ReduceLROnPlateau.step(metric)`.

    A validation loss computed on each rank's own data differs per rank; a plateau scheduler fed
    those values would decide differently on each rank. Reduce it first so every rank feeds the
    same number. (With hparam_sync="broadcast" the lr stays consistent anyway, because rank 0's
    decision is broadcast at the next step, but the schedulers' own state would still differ.)

    Collective: call on every rank of the group, in the same order. Same result on every rank.

    Args:
        value: a Python number or a one-element tensor.
        op: "mean" (default), "sum", "max" or "min".
        process_group: the group to reduce over; None is the default group (or no-op without one).
    """
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"op must be 'mean', 'sum', 'max' or 'min', got {op!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"value must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        value = float(value.detach().item())
    comm = Comm(process_group)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=comm.device)
    comm.all_reduce_(tensor, op=op, what="all_reduce_metric")
    return float(tensor.item())
