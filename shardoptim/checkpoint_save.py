"""Write a sharded checkpoint: each rank its own chunks, in parallel, published atomically.

Each rank writes only the state it owns (one chunk per owned piece, keyed by parameter name and
offset) through torch.distributed.checkpoint; the ranks' manifests are gathered into the metadata.
The write goes to `<path>.partial` and becomes `<path>` by a rename on rank 0 once every rank is
done, so a crash mid-save leaves the previous checkpoint in place. The format is described in
shardoptim.checkpoint_format; reading is shardoptim.checkpoint_load.

Must not import shardoptim.optimizer at run time, nor the readers.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from shardoptim.buffers import memory_perm
from shardoptim.checkpoint_format import (
    COMPLETE,
    EXTRA,
    FORMAT_VERSION,
    META,
    param_names,
    state_key,
    to_bytes_tensor,
)

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer

__all__ = ["save"]

logger = logging.getLogger(__name__)


def _plain(value: Any) -> bool:
    """True for values torch.load(weights_only=True) can read back: numbers, strings, tensors, containers."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def save(
    path: str | os.PathLike[str],
    optimizer: ShardedOptimizer,
    *,
    model: torch.nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a sharded checkpoint of `optimizer` (and `model`, and `extra`) to the directory `path`.

    Collective: call on every rank of the group, in the same order. Each rank writes its own
    pieces in parallel; the directory appears atomically when all are written. With hybrid
    sharding only the lead replica writes, and every rank returns once it is published.

    Args:
        path: the checkpoint directory; an existing checkpoint there is replaced only once the new
            one is complete.
        optimizer: the ShardedOptimizer to save.
        model: if given, its state_dict is saved too and the optimizer state is keyed by parameter
            name (else by index).
        extra: plain values (numbers, strings, tensors, containers) and objects with `state_dict()`
            (schedulers, GradScaler, ...), saved by key and restored by `load(..., extra=...)`.
    """
    if optimizer.sharding == "lbfgs":
        raise ValueError(
            "sharded checkpoints of LBFGS are not supported; use consolidate_state_dict() + state_dict()"
        )
    optimizer.placement.enter("shardoptim.checkpoint.save", lone_rank=0)
    replicas = optimizer.placement.replicas
    if replicas is None:
        _save(path, optimizer, model=model, extra=extra)
        return
    # Hybrid sharding: the lead replica writes; the flag all-reduce doubles as the barrier that
    # holds the other replicas until the checkpoint is published (or tells them it failed).
    failure: Exception | None = None
    if replicas.is_lead:
        try:
            _save(path, optimizer, model=model, extra=extra)
        except Exception as err:
            failure = err
    replicas.comm.raise_if_any_failed(failure, what="checkpoint.save (by the lead replica)")


def _save(
    path: str | os.PathLike[str],
    optimizer: ShardedOptimizer,
    *,
    model: torch.nn.Module | None,
    extra: Mapping[str, Any] | None,
) -> None:
    """Write the checkpoint from the shard group. Collective: call on every rank of the shard group."""
    comm = optimizer.placement.comm
    final = Path(path)
    partial = final.with_name(final.name + ".partial")
    names = param_names(optimizer, model)
    flat = optimizer.sharding == "flat"
    tensors: dict[str, Any] = {}
    manifest: dict[str, dict[str, Any]] = {}
    for piece in optimizer.placement.pieces:
        state = optimizer.optim.state.get(piece.local)
        if not state:
            continue
        name = names[piece.index]
        entry = manifest.setdefault(name, {})
        for key, value in state.items():
            if (
                isinstance(value, torch.Tensor)
                and flat
                and value.dim() > 0
                and value.shape == piece.local.shape
            ):
                tensors[state_key(name, key, piece.in_param.start)] = value
                entry.setdefault(key, []).append((piece.in_param.start, piece.in_param.numel))
            elif piece.in_param.start == 0:
                if isinstance(value, torch.Tensor):
                    tensors[state_key(name, key)] = value
                    entry[key] = "whole"
                else:
                    entry[key] = ("value", value)
    rank_to_manifest = comm.all_gather_object(manifest, what="checkpoint manifest gather")
    merged: dict[str, dict[str, Any]] = {}
    for part in rank_to_manifest:
        assert isinstance(part, dict)
        for name, entry in part.items():
            for key, spec in entry.items():
                if isinstance(spec, list):
                    merged.setdefault(name, {}).setdefault(key, []).extend(spec)
                else:
                    merged.setdefault(name, {})[key] = spec
    id_to_name = {id(p): names[i] for i, p in enumerate(optimizer.placement.params)}
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        kept = {k: v for k, v in group.items() if k != "params" and _plain(v)}
        dropped = sorted(k for k in group if k != "params" and k not in kept)
        if dropped:
            logger.warning(
                "checkpoint: param group %d options %s are not plain values; not saved", index, dropped
            )
        kept.update(optimizer.injected_flags)  # the class defaults, not the wrapper's own kernel choice
        kept["params"] = [id_to_name[id(p)] for p in group["params"]]
        groups.append(kept)
    meta = {
        "format_version": FORMAT_VERSION,
        "optimizer_class": optimizer.placement.optimizer_class.__name__,
        "sharding": optimizer.sharding,
        "world_size": comm.world_size,
        "replicas": optimizer.num_replicas,
        "names": names,
        "shapes": [tuple(p.shape) for p in optimizer.placement.params],
        # Flat chunks hold a parameter's elements in its memory order (channels_last, ...): the
        # order per parameter name, absent for row-major ones (and in older checkpoints).
        "memory_orders": _memory_orders(optimizer, names),
        "param_groups": groups,
        "chunks": merged,
    }
    tensors[META] = to_bytes_tensor(meta)
    if model is not None:
        for key, value in model.state_dict().items():
            tensors[f"model/{key}"] = value
    if extra is not None:
        payload = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in extra.items()}
        bad = sorted(k for k, v in payload.items() if not _plain(v))
        if bad:
            raise TypeError(
                f"extra values {bad} are neither plain values nor objects with state_dict(); a checkpoint holds "
                "only tensors and plain Python values so that it loads with weights_only=True"
            )
        tensors[EXTRA] = to_bytes_tensor(payload)
    if comm.rank == 0 and partial.exists():
        shutil.rmtree(partial)
    comm.barrier(what="checkpoint.save (start)")
    try:
        with warnings.catch_warnings():
            # NOTE: at world size 1 DCP warns that torch.distributed is disabled: that is the point.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_save(
                tensors,
                checkpoint_id=str(partial),
                process_group=comm.group,
                no_dist=not comm.is_distributed or comm.world_size == 1,
            )
    except (Exception, CheckpointException) as err:  # NOTE: CheckpointException is a BaseException
        raise RuntimeError(
            f"{comm.prefix}checkpoint.save (writing {partial}) failed: {err}. A peer rank may have died; "
            f"{final} is untouched"
        ) from err
    comm.barrier(what="checkpoint.save (all written)")
    if comm.rank == 0:
        _publish(partial, final)
    comm.barrier(what="checkpoint.save (published)")


def _publish(partial: Path, final: Path) -> None:
    """Mark `partial` complete and swap it in for `final` by renames (rank 0 only)."""
    marker = partial / COMPLETE
    with open(marker, "w") as handle:
        handle.write(f"{FORMAT_VERSION}\n")
        handle.flush()
        os.fsync(handle.fileno())
    previous = final.with_name(final.name + ".prev")
    if previous.exists():
        shutil.rmtree(previous)
    if final.exists():
        os.replace(final, previous)
    os.replace(partial, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if previous.exists():
        shutil.rmtree(previous)


def _memory_orders(optimizer: ShardedOptimizer, names: list[str]) -> dict[str, list[int]]:
    """Return parameter name -> memory order for the parameters that are not row-major."""
    orders = {}
    for name, param in zip(names, optimizer.placement.params):
        perm = memory_perm(param)
        if perm is not None:
            orders[name] = list(perm)
    return orders
