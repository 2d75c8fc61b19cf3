"""torch.optim.LBFGS's state_dict format for the sharded LBFGS: consolidate and load.

The history vectors live sharded on the ranks; consolidation streams them vector by vector to one
rank as full flat vectors (torch's layout), and loading cuts them to this rank's pieces again, at
any world size. Used by shardoptim.state_dict. Must not import shardoptim.optimizer at run time.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from shardoptim.lbfgs import HISTORY_KEYS, VECTOR_KEYS, ShardedLBFGS

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer

__all__ = ["consolidate_lbfgs", "load_lbfgs"]


def _flat_slices(opt: ShardedOptimizer, rank: int) -> tuple[list[tuple[int, int]], int]:
    """Return rank's pieces as (start, numel) in torch's full flat vector, in local order, and its length.

    Pure: the layout is the same on every rank. Complex parameters count twice (real view), as in torch.
    """
    factors = [2 if p.is_complex() else 1 for p in opt.placement.params]
    offsets = [0]
    for p, factor in zip(opt.placement.params, factors):
        offsets.append(offsets[-1] + p.numel() * factor)
    slices = [
        (offsets[s.index] + s.in_param.start * factors[s.index], s.in_param.numel * factors[s.index])
        for s in opt.placement.layouts[0].local_slices(rank)
    ]
    return slices, offsets[-1]


def _gather_vector(opt: ShardedOptimizer, local: Tensor, *, to: int, what: str) -> Tensor | None:
    """Assemble torch's full flat vector from every rank's piece on rank `to` (CPU); None elsewhere.

    Collective (point to point into `to`): call on every rank, in the same order.
    """
    comm = opt.placement.comm
    # NOTE: the same device on both ends of every transfer (see state_dict._move).
    wire = comm.wire_device(opt.placement.params[0].device)
    full = torch.empty(_flat_slices(opt, 0)[1], dtype=local.dtype) if comm.rank == to else None
    for rank in range(comm.world_size):
        slices, _ = _flat_slices(opt, rank)
        numel = sum(n for _, n in slices)
        if numel == 0:
            continue
        if comm.rank != to:
            if rank == comm.rank:
                comm.send(local.to(wire).contiguous(), dst=to, what=what)
            continue
        assert full is not None
        if rank == to:
            part = local.detach().cpu()
        else:
            part = torch.empty(numel, dtype=local.dtype, device=wire)
            comm.recv(part, src=rank, what=what)
            part = part.cpu()
        offset = 0
        for start, n in slices:
            full[start : start + n] = part[offset : offset + n]
            offset += n
    return full


def _copy_scalar(value: Any) -> Any:
    """Return an independent CPU copy of a global state value (number, 0-dim tensor or list)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_copy_scalar(v) for v in value]
    return copy.deepcopy(value)


def consolidate_lbfgs(opt: ShardedOptimizer, *, to: int) -> dict[str, Any] | None:
    """Return torch.optim.LBFGS's state_dict for the whole model on rank `to`, None elsewhere.

    Collective: call on every rank of the group, in the same order. Vectors are streamed one at a
    time into rank `to` (point to point) and end up on the CPU, like every other state tensor.
    """
    optim = opt.optim
    assert isinstance(optim, ShardedLBFGS), type(optim)
    state = optim.state.get(optim.state_key, {})
    entry: dict[str, Any] = {}
    for key, value in state.items():
        what = f"LBFGS state_dict consolidation ({key!r})"
        if key in VECTOR_KEYS:
            entry[key] = None if value is None else _gather_vector(opt, value, to=to, what=what)
        elif key in HISTORY_KEYS:
            entry[key] = [_gather_vector(opt, v, to=to, what=what) for v in value]
        else:
            entry[key] = _copy_scalar(value)
    if opt.placement.comm.rank != to:
        return None
    group = {k: copy.deepcopy(v) for k, v in opt.param_groups[0].items() if k != "params"}
    group["params"] = list(range(len(opt.param_groups[0]["params"])))
    return {"state": {0: entry} if entry else {}, "param_groups": [group]}


def _slice_vector(
    full: Any, slices: Sequence[tuple[int, int]], total: int, device: torch.device, key: str
) -> Tensor:
    if not isinstance(full, Tensor) or full.numel() != total:
        seen = f"{full.numel()} elements" if isinstance(full, Tensor) else type(full).__name__
        raise ValueError(
            f"LBFGS state {key!r} has {seen} but the parameters have {total} elements (complex ones "
            "count twice); load a state_dict saved from the same model"
        )
    flat = full.detach().reshape(-1)
    parts = [flat[start : start + n] for start, n in slices]
    return (torch.cat(parts) if parts else flat[:0]).to(device).clone()


def load_lbfgs(opt: ShardedOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Load torch.optim.LBFGS's state_dict format (saved at any world size, or by torch itself).

    Every rank passes the full dict and keeps its own slices of the vectors. The caller's dict is not
    modified and nothing is shared with it. No communication.
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(
            "load_state_dict expects an LBFGS state_dict with 'state' and 'param_groups'; pass what "
            "opt.state_dict() (after consolidate_state_dict) or torch.optim.LBFGS.state_dict() returned"
        )
    groups = list(state_dict["param_groups"])
    num_params = len(opt.param_groups[0]["params"])
    if len(groups) != 1 or len(groups[0]["params"]) != num_params:
        raise ValueError(
            f"the state_dict has {len(groups)} param groups with {[len(g['params']) for g in groups]} "
            f"parameters; this LBFGS has one group of {num_params}: load a state_dict of the same model"
        )
    optim = opt.optim
    assert isinstance(optim, ShardedLBFGS), type(optim)
    saved = groups[0]
    entry: Mapping[str, Any] = state_dict["state"].get(saved["params"][0], {}) if num_params else {}
    slices, total = _flat_slices(opt, opt.placement.comm.rank)
    local: dict[str, Any] = {}
    for key, value in entry.items():
        if key in VECTOR_KEYS:
            local[key] = None if value is None else _slice_vector(value, slices, total, optim.device, key)
        elif key in HISTORY_KEYS:
            local[key] = [_slice_vector(v, slices, total, optim.device, key) for v in value]
        else:
            local[key] = _copy_scalar(value)
    optim.state = defaultdict(dict)
    if local:
        optim.state[optim.state_key] = local
    options = {k: copy.deepcopy(v) for k, v in saved.items() if k not in ("params", "param_names")}
    optim.param_groups[0].update(options)
    opt.param_groups[0].update(options)
