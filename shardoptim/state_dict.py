"""Consolidate sharded state into the base optimizer's own format, and load that format back.

The consolidated form is exactly what `torch.optim.<Base>.state_dict()` returns for the same
parameters on one process: `{"state": {index: {key: full-shape tensor or value}}, "param_groups":
[{options..., "params": [indices]}]}`. It does not depend on the world size, so a run can resume
on any number of ranks, and a plain torch.optim optimizer loads it.

Consolidation streams tensor by tensor with point-to-point sends (no shard is ever pickled): the
extra memory on a sending rank is nil (its state tensors are sent as they are), and only small
per-parameter metadata goes through `all_gather_object`. When the full state is made, where it is
kept and what `state_dict()` returns on each rank is shardoptim.consolidated's part.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch

from shardoptim.buffers import from_flat, memory_perm, to_flat
from shardoptim.hparam_flow import STRUCTURE_KEYS
from shardoptim.master import MASTER_KEY

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer

# A state entry's description: ("elem", dtype) for per-element state of a flat piece, ("tensor",
# shape, dtype) for a tensor sent whole from the first owner, ("value", python value).
_Spec = tuple[Any, ...]

#: Keys that schedulers and wrappers add to param groups; never a sign of another optimizer class.
_SCHEDULER_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum", "swa_lr", "param_names"}
)


@functools.cache
def _all_optimizer_option_names() -> frozenset[str]:
    names: set[str] = set()
    for obj in vars(torch.optim).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        ):
            try:
                names.update(inspect.signature(obj.__init__).parameters)
            except (TypeError, ValueError):
                continue
    return frozenset(names - {"self", "params"})


def _local_meta(opt: ShardedOptimizer) -> dict[int, tuple[int, int, dict[str, _Spec]]]:
    """Describe this rank's state: param index -> (start_in_param, end_in_param, key -> spec)."""
    flat = opt.sharding == "flat"
    meta: dict[int, tuple[int, int, dict[str, _Spec]]] = {}
    for piece in opt.placement.pieces:
        state = opt.optim.state.get(piece.local)
        if not state:
            continue
        specs: dict[str, _Spec] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if flat and value.dim() > 0 and value.shape == piece.local.shape:
                    specs[key] = ("elem", value.dtype)
                else:
                    specs[key] = ("tensor", tuple(value.shape), value.dtype)
            else:
                specs[key] = ("value", value)
        meta[piece.index] = (piece.in_param.start, piece.in_param.end, specs)
    return meta


def consolidate(opt: ShardedOptimizer, *, to: int) -> dict[str, Any] | None:
    """Gather the full state onto rank `to` in the base optimizer's format.

    Collective: call on every rank of the group, in the same order. Returns the dict on rank `to`
    (a rank of the group: shardoptim.consolidated checks it) and None elsewhere.
    State tensors of the result live on the CPU.
    """
    comm = opt.placement.comm
    if opt.sharding == "lbfgs":
        from shardoptim.lbfgs_state import consolidate_lbfgs

        return consolidate_lbfgs(opt, to=to)
    mine = _local_meta(opt)
    rank_to_meta = cast(
        list[dict[int, tuple[int, int, dict[str, _Spec]]]],
        comm.all_gather_object(mine, what="state_dict metadata gather"),
    )
    index_to_local = {
        piece.index: opt.optim.state[piece.local] for piece in opt.placement.pieces if piece.local in opt.optim.state
    }
    state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(opt.placement.params):
        owners = sorted(
            (meta[index][0], meta[index][1], rank) for rank, meta in enumerate(rank_to_meta) if index in meta
        )
        if not owners:
            continue
        first_rank = owners[0][2]
        specs = rank_to_meta[first_rank][index][2]
        entry: dict[str, Any] = {}
        for key, spec in specs.items():
            what = f"state_dict consolidation (parameter {index}, {key!r})"
            if spec[0] == "value":
                entry[key] = copy.deepcopy(spec[1])
                continue
            if spec[0] == "tensor":
                full = torch.empty(spec[1], dtype=spec[2]) if comm.rank == to else None
                _move(opt, full, index_to_local, index, key, src=first_rank, to=to, what=what)
                entry[key] = full
                continue
            full = torch.empty(param.numel(), dtype=spec[1]) if comm.rank == to else None
            for start, end, rank in owners:
                part = None if full is None else full.narrow(0, start, end - start)
                _move(opt, part, index_to_local, index, key, src=rank, to=to, what=what)
            # NOTE: pieces are in the parameter's memory order: the full tensor keeps its layout.
            entry[key] = None if full is None else from_flat(full, param.shape, memory_perm(param))
        state[index] = entry
    if comm.rank != to:
        return None
    return {"state": state, "param_groups": groups_with_indices(opt)}


def _move(
    opt: ShardedOptimizer,
    out: torch.Tensor | None,
    index_to_local: Mapping[int, Mapping[str, Any]],
    index: int,
    key: str,
    *,
    src: int,
    to: int,
    what: str,
) -> None:
    """Copy rank `src`'s state tensor `key` of parameter `index` into `out` on rank `to`.

    The tensor travels on `comm.wire_device(parameter's device)`, the same on both ranks: the
    parameter's own device when the group has a backend for it (CUDA state over NCCL), else the
    group's device. The sender moves a state tensor living elsewhere there first (torch keeps
    `step`, and NAdam's `mu_product`, as CPU scalars beside CUDA parameters without fused
    kernels); the receiver receives there and copies into `out` (CPU).
    """
    comm = opt.placement.comm
    wire = comm.wire_device(opt.placement.params[index].device)
    if comm.rank == src == to:
        assert out is not None
        out.copy_(index_to_local[index][key].reshape(out.shape))
    elif comm.rank == src:
        comm.send(index_to_local[index][key].to(wire).contiguous(), dst=to, what=what)
    elif comm.rank == to:
        assert out is not None
        if out.device == wire:
            comm.recv(out, src=src, what=what)
        else:
            staging = torch.empty(out.shape, dtype=out.dtype, device=wire)
            comm.recv(staging, src=src, what=what)
            out.copy_(staging)


def groups_with_indices(opt: ShardedOptimizer) -> list[dict[str, Any]]:
    """Return the param groups as a torch.optim state_dict holds them: options and parameter indices.

    Implementation flags that the wrapper chose itself (fused/foreach) are saved with the class's
    default value, as the user's own unsharded optimizer would have saved them.
    """
    groups, next_index = [], 0
    for group in opt.param_groups:
        saved = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        saved.update(opt.injected_flags)
        saved["params"] = list(range(next_index, next_index + len(group["params"])))
        next_index += len(group["params"])
        groups.append(saved)
    return groups


def validate(opt: ShardedOptimizer, state_dict: Any) -> list[Mapping[str, Any]]:
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(
            f"load_state_dict expects an optimizer state_dict with 'state' and 'param_groups', got {keys}; pass "
            "what opt.state_dict() (after consolidate_state_dict) or a torch.optim optimizer returned"
        )
    if not isinstance(state_dict["state"], Mapping) or not isinstance(
        state_dict["param_groups"], (list, tuple)
    ):
        raise TypeError(
            f"state_dict['state'] must be a dict and state_dict['param_groups'] a list, got "
            f"{type(state_dict['state']).__name__} and {type(state_dict['param_groups']).__name__}"
        )
    saved_groups = list(state_dict["param_groups"])
    bad = [
        g for g, saved in enumerate(saved_groups) if not isinstance(saved, Mapping) or "params" not in saved
    ]
    if bad:
        raise ValueError(
            f"state_dict param groups {bad} are not dicts with a 'params' list; the state_dict is damaged or "
            "not an optimizer state_dict"
        )
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups but this optimizer has {len(opt.param_groups)}; "
            "build the optimizer with the same groups before loading"
        )
    for g, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {g}: state_dict has {len(saved['params'])} parameters, this optimizer "
                f"{len(group['params'])}; the state_dict is from another model or grouping"
            )
        foreign = (set(saved) - set(group) - _SCHEDULER_KEYS) & _all_optimizer_option_names()
        if foreign:
            raise ValueError(
                f"param group {g} of the state_dict has options {sorted(foreign)} that "
                f"{opt.optim.__class__.__name__} does not take: it was saved from a different optimizer class"
            )
    return saved_groups


def load(opt: ShardedOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Load the base optimizer's format (from any world size, or a plain torch.optim optimizer).

    Every rank passes the full dict; each keeps the slices it owns. The caller's dict is not
    modified and nothing is shared with it. No communication.
    """
    if opt.sharding == "lbfgs":
        from shardoptim.lbfgs_state import load_lbfgs

        load_lbfgs(opt, state_dict)
        return
    saved_groups = validate(opt, state_dict)
    saved_state: Mapping[Any, Mapping[str, Any]] = state_dict["state"]
    index_to_saved_id = [pid for saved in saved_groups for pid in saved["params"]]
    flat = opt.sharding == "flat"
    for index, pid in enumerate(index_to_saved_id):
        param = opt.placement.params[index]
        for key, value in saved_state.get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and not _fits(value, param, flat=flat):
                raise ValueError(
                    f"state of parameter {index} key {key!r} has shape {tuple(value.shape)} but the parameter has "
                    f"shape {tuple(param.shape)}; the state_dict is from another model"
                )
    index_to_values: dict[int, dict[str, Any]] = {}
    for piece in opt.placement.pieces:
        entry = saved_state.get(index_to_saved_id[piece.index])
        if entry:
            perm = memory_perm(opt.placement.params[piece.index])
            index_to_values[piece.index] = {key: _slice(value, piece, flat, perm) for key, value in entry.items()}
    load_pieces(opt, saved_groups, index_to_values)


def load_pieces(
    opt: ShardedOptimizer,
    saved_groups: list[Mapping[str, Any]],
    index_to_values: Mapping[int, Mapping[str, Any]],
) -> None:
    """Load this rank's own state values (already cut to its pieces) and the groups' options.

    Args:
        opt: the optimizer to load into.
        saved_groups: the saved param groups (options; their "params" are ignored).
        index_to_values: parameter index -> state key -> value for this rank's piece of it
            (shaped like the piece), for the parameters that have state.
    """
    opt.placement.settle_()  # weights written since the last step reach the buckets before masters are restored
    piece_of = {id(piece.local): piece for piece in opt.placement.pieces}
    local_state: dict[int, dict[str, Any]] = {}
    local_groups: list[dict[str, Any]] = []
    local_index = 0
    for saved, group in zip(saved_groups, opt.optim.param_groups):
        indices = []
        for local in group["params"]:
            values = index_to_values.get(piece_of[id(local)].index)
            if values:
                local_state[local_index] = dict(values)
            indices.append(local_index)
            local_index += 1
        options = _options(opt, saved)
        local_groups.append({**options, "params": indices})
    opt.optim.load_state_dict({"state": local_state, "param_groups": local_groups})
    _restore_masters(opt)
    for saved, group in zip(saved_groups, opt.param_groups):
        group.update(_options(opt, saved))


def _options(opt: ShardedOptimizer, saved: Mapping[str, Any]) -> dict[str, Any]:
    """Return a saved group's options, less implementation flags left at the class default.

    A saved fused=None (nobody chose) keeps the kernel this optimizer picked; an explicit
    choice in the checkpoint is taken.
    """
    return {
        k: copy.deepcopy(v)
        for k, v in saved.items()
        if k not in STRUCTURE_KEYS and not (k in opt.injected_flags and v == opt.injected_flags[k])
    }


def _restore_masters(opt: ShardedOptimizer) -> None:
    """Copy loaded master pieces into the master shards (or re-read them from the parameters).

    A piece loaded with a master copy takes it (the checkpoint's fp32 weights win over the
    model's rounded ones); one without takes the parameter's current value. Pieces without
    master copies drop a saved one (the parameters belong to the model's own state_dict).
    """
    unsaved = set()
    for piece in opt.placement.pieces:
        state = opt.optim.state.get(piece.local)
        saved = state.pop(MASTER_KEY, None) if state else None
        if not opt.placement.masters.has(piece.bucket):
            continue
        if isinstance(saved, torch.Tensor):
            with torch.no_grad():
                piece.local.copy_(saved.reshape(piece.local.shape))
        else:
            unsaved.add(piece.index)
        if state:
            state[MASTER_KEY] = piece.local
    with torch.no_grad():
        opt.placement.masters.reread_(unsaved)
    opt.placement.storage.remember_(opt.placement.params, range(len(opt.placement.params)))


def _fits(value: torch.Tensor, param: torch.Tensor, *, flat: bool) -> bool:
    """True when a saved state tensor can belong to `param`.

    Flat sharding slices per-element state, so it must have the parameter's shape. Whole-tensor
    optimizers also keep factored state (Adafactor's row and column variances): a tensor of the
    parameter's rank whose every dimension is the parameter's or 1 is accepted; any other shape is
    another model's.
    """
    if value.shape == param.shape:
        return True
    if flat:
        return False
    return value.dim() == param.dim() and all(v in (p, 1) for v, p in zip(value.shape, param.shape))


def _slice(value: Any, piece: Any, flat: bool, perm: tuple[int, ...] | None = None) -> Any:
    """Return this piece's own copy of one saved state value (flat pieces in the memory order `perm`)."""
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if flat and value.dim() > 0:
        return to_flat(value.detach(), perm).narrow(0, piece.in_param.start, piece.in_param.numel).clone()
    return value.detach().clone()
