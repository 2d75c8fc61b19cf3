"""Global gradient checks over sharded gradients: the total norm, clipping, and inf/nan detection.

Each rank reduces the part of the gradients it owns to one partial statistic; one small
all-reduce combines them, so every rank gets the same total and takes the same decision.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from shardoptim.comm import Comm


def _norm_dtype(grads: Sequence[torch.Tensor]) -> torch.dtype:
    """fp64 when any gradient is fp64, else fp32 (bf16/fp16 norms are summed in fp32)."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def check_norm_type(norm_type: float) -> float:
    """Return `norm_type` as a float, or raise ValueError unless it is > 0 (inf allowed)."""
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number (2.0, 1.0, inf, ...), got {norm_type!r}") from None
    if not value > 0:
        raise ValueError(
            f"norm_type must be > 0 or inf for a sharded total norm, got {norm_type!r}; use 2.0 (the default), "
            "1.0 or float('inf')"
        )
    return value


def total_norm(
    comm: Comm, owned: Sequence[torch.Tensor], norm_type: float, *, device: torch.device
) -> torch.Tensor:
    """Return the `norm_type`-norm of every rank's `owned` gradients together (0-dim tensor).

    Computed as torch.nn.utils.clip_grad_norm_ does (the norm of the per-tensor norms), with one
    more level: each rank's partial norm is all-gathered and the norm of those is the total. At
    world size 1 the result is bitwise torch's.

    Collective: call on every rank of the group, in the same order. Same result on every rank.

    Args:
        comm: the shard group.
        owned: the gradient pieces this rank owns (disjoint across ranks, together all of them).
        norm_type: p > 0, or inf for the largest magnitude.
        device: where the result lives.

    Returns:
        fp32 (fp64 when any gradient is fp64); bf16/fp16 pieces are normed in fp32.
    """
    dtype = _norm_dtype(owned)
    grads = [g for g in owned if g.numel()]
    partial = torch.zeros((), dtype=dtype, device=device)
    if grads:
        # NOTE: either list may be empty (all-bf16 grads at stage 1, say), and the foreach kernel
        # refuses an empty list, so each one is normed only when it has members.
        wide = [g for g in grads if g.dtype in (torch.float32, torch.float64)]
        low = [g for g in grads if g.dtype not in (torch.float32, torch.float64)]
        norms: list[torch.Tensor] = list(torch._foreach_norm(wide, norm_type)) if wide else []
        if low:
            norms += list(torch._foreach_norm(low, norm_type, dtype=torch.float32))
        partial = torch.linalg.vector_norm(
            torch.stack([n.to(device=device, dtype=dtype) for n in norms]), norm_type
        )
    # NOTE: on the gradients' own device when the group has a backend for it (no host sync).
    partials = comm.all_gather(partial.to(comm.wire_device(partial.device)), what="gradient norm").to(device)
    total: torch.Tensor = torch.linalg.vector_norm(partials.reshape(-1), norm_type)
    return total


def clip_coef(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Return torch's clipping factor min(1, max_norm / (total + 1e-6)) as a 0-dim tensor."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def _by_device_and_dtype(
    grads: Sequence[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Group the non-empty gradients for the foreach kernels, which take one device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if g.numel():
            groups.setdefault((g.device, g.dtype), []).append(g)
    return groups


def scale_(grads: Sequence[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply every gradient in place by the 0-dim `factor`."""
    for (device, _dtype), members in _by_device_and_dtype(grads).items():
        torch._foreach_mul_(members, factor.to(device))


def local_nonfinite(grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Return a 1-element fp64 flag: 1 when any of this rank's gradients holds an inf or nan (no communication).

    The flag stays on the gradients' device (no host read: the caller sends it with the step's
    one small collective); None when there are no gradients.
    """
    flags = []
    for (device, _dtype), members in _by_device_and_dtype(grads).items():
        peaks = torch._foreach_norm(members, math.inf)
        flags.append((~torch.isfinite(torch.stack(peaks))).any().to(device, torch.float64).reshape(1))
    if not flags:
        return None
    first = flags[0]
    return torch.stack([f.to(first.device) for f in flags]).amax().reshape(1)


def unscale_and_check_(
    comm: Comm, grads: Sequence[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor
) -> None:
    """Multiply `grads` by `inv_scale` and set `found_inf` to 1 on every rank if any rank saw inf/nan.

    The GradScaler contract (torch._amp_foreach_non_finite_check_and_unscale_), made global.

    Collective: call on every rank of the group, in the same order.
    """
    for (device, _dtype), members in _by_device_and_dtype(grads).items():
        local = torch.zeros_like(found_inf, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(members, local, inv_scale.to(device))
        found_inf.copy_(torch.maximum(found_inf, local.to(found_inf.device)))
    flag = found_inf.to(comm.wire_device(found_inf.device), dtype=torch.float32).reshape(1)
    comm.all_reduce_(flag, op="max", what="GradScaler inf/nan check")
    found_inf.copy_(flag.reshape(()).to(found_inf.device, found_inf.dtype))
