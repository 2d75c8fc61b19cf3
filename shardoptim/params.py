"""Normalise and check what the user passes as parameters, before any layout is built.

Pure checks on tensors: must not import torch.distributed or the rest of shardoptim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer


def as_param_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise what torch.optim accepts (tensors, (name, tensor) pairs or dicts) into group dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of Tensors or of param-group dicts, got a single Tensor; "
            "pass [tensor] or model.parameters()"
        )
    if isinstance(params, Mapping):
        raise TypeError("params must be an iterable of param-group dicts, got one dict; wrap it in a list")
    items = list(params)
    if not items:
        raise ValueError("ShardedOptimizer got an empty parameter list; pass model.parameters() or groups")
    if all(isinstance(item, Mapping) for item in items):
        groups = [dict(item) for item in items]
    elif any(isinstance(item, Mapping) for item in items):
        raise TypeError("params mixes tensors and param-group dicts; pass either tensors or dicts")
    else:
        groups = [{"params": items}]
    for index, group in enumerate(groups):
        if "params" not in group:
            raise ValueError(f"param group {index} has no 'params' key (keys: {sorted(group)}); add one")
        plist = group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        if plist and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in plist):
            group["param_names"] = [name for name, _ in plist]
            plist = [p for _, p in plist]
        group["params"] = plist
    return groups


def validate_params(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Return every parameter of `groups` in order; reject non-leaves, sparse, duplicates, mixed devices."""
    params: list[torch.Tensor] = []
    seen: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            where = f"param_groups[{g}]['params'][{i}]"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where} is a {type(p).__name__}, not a Tensor; pass model.parameters()")
            if not p.is_leaf:
                raise ValueError(
                    f"{where} (shape {tuple(p.shape)}) is not a leaf tensor; optimize the leaf (e.g. the "
                    "nn.Parameter), not a result computed from it"
                )
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(
                    f"{where} has layout {p.layout}; only dense (strided) parameters are supported"
                )
            if id(p) in seen:
                raise ValueError(
                    f"{where} is the same tensor as param_groups[{seen[id(p)][0]}]['params'][{seen[id(p)][1]}]; "
                    "list every parameter once (tied weights appear once in model.parameters())"
                )
            seen[id(p)] = (g, i)
            params.append(p)
    device_types = sorted({p.device.type for p in params})
    if len(device_types) > 1:
        raise ValueError(
            f"parameters are on different device types {device_types}; move the model to one device "
            "(e.g. model.to(device)) before building the optimizer"
        )
    return params


def probe_complex_support(
    optimizer_class: type[Optimizer], defaults: dict[str, Any], params: list[torch.Tensor]
) -> None:
    """Raise torch's own error now if `optimizer_class` cannot step complex parameters.

    Many optimizers only reject complex tensors inside `step`, which under sharding would fail on
    the owning rank only, after other buckets were already updated. A 2x2 probe per complex dtype
    surfaces the same error at construction, on every rank.
    """
    for dtype in sorted({p.dtype for p in params if p.is_complex()}, key=str):
        device = next(p.device for p in params if p.dtype == dtype)
        probe = torch.zeros(2, 2, dtype=dtype, device=device, requires_grad=True)
        grad = torch.zeros_like(probe)
        probe.grad = grad.to_sparse() if optimizer_class is torch.optim.SparseAdam else grad
        optimizer_class([probe], **defaults).step()


def validate_new_params(groups: list[dict[str, Any]], *, existing: list[torch.Tensor]) -> list[torch.Tensor]:
    """Return the parameters of a group being added; reject other device types and repeats."""
    new_params = validate_params(groups)
    types = sorted({p.device.type for p in new_params} | {existing[0].device.type})
    if len(types) > 1:
        raise ValueError(
            f"add_param_group: the new parameters' device types {types} differ from this optimizer's "
            f"({existing[0].device.type}); move them to the same device first"
        )
    known = {id(p) for p in existing}
    clash = [i for i, p in enumerate(new_params) if id(p) in known]
    if clash:
        raise ValueError(
            f"add_param_group: params {clash} of the new group are already in this optimizer; "
            "each parameter may belong to one group only"
        )
    return new_params
