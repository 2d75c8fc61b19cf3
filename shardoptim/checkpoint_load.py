"""Read a sharded checkpoint: find the complete directory, read its metadata, load this rank's pieces.

Loading reads only the chunks that overlap the loading rank's pieces (reassembling a parameter
saved in another memory order), so it works at any world size and under either layout. Each rank
reads its own chunks alone; nothing is unpickled with `weights_only=False`. The format is
described in shardoptim.checkpoint_format; writing is shardoptim.checkpoint_save.

Must not import shardoptim.optimizer at run time, nor the writer.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from shardoptim.buffers import from_flat, memory_perm, to_flat
from shardoptim.checkpoint_format import (
    COMPLETE,
    EXTRA,
    FORMAT_VERSION,
    META,
    from_bytes_tensor,
    param_names,
    saved_memory_order,
    state_key,
)
from shardoptim.state_dict import load_pieces

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer

__all__ = ["load", "read_meta", "read_tensors", "resolve"]

logger = logging.getLogger(__name__)


def resolve(path: str | os.PathLike[str]) -> Path:
    final = Path(path)
    if (final / COMPLETE).exists():
        return final
    previous = final.with_name(final.name + ".prev")
    if not final.exists() and (previous / COMPLETE).exists():
        logger.warning(
            "checkpoint %s is missing; a save was interrupted while publishing. Loading %s", final, previous
        )
        return previous
    if final.exists():
        raise ValueError(
            f"checkpoint {final} is incomplete (no {COMPLETE} marker): a save was interrupted or this is not a "
            "shardoptim checkpoint directory; load the previous checkpoint"
        )
    partial = final.with_name(final.name + ".partial")
    hint = f" ({partial} holds an interrupted save, which cannot be loaded)" if partial.exists() else ""
    raise FileNotFoundError(f"no checkpoint at {final}{hint}")


def read_tensors(path: Path, keys: Mapping[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """Load the named tensors from the checkpoint in this process alone (no collectives)."""
    out = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in keys.items()}
    if not out:
        return out
    try:
        with warnings.catch_warnings():
            # NOTE: each rank reads its own chunks alone on purpose (no_dist); DCP warns about that.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(out, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as err:  # NOTE: CheckpointException is a BaseException
        raise ValueError(f"checkpoint {path} is corrupt or truncated: {err}") from err
    return out


def read_meta(path: Path) -> tuple[dict[str, Any], dict[str, TensorStorageMetadata]]:
    try:
        storage = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:
        raise ValueError(
            f"checkpoint {path}: cannot read its metadata ({err}); it is corrupt or truncated"
        ) from err
    tensors = {k: v for k, v in storage.items() if isinstance(v, TensorStorageMetadata)}
    if META not in tensors:
        raise ValueError(
            f"checkpoint {path} has no {META!r} entry; it was not written by shardoptim.checkpoint.save"
        )
    meta = from_bytes_tensor(read_tensors(path, {META: tensors[META]})[META], "its metadata", path)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path} has format version {version!r}, newer than this shardoptim reads ({FORMAT_VERSION}); "
            "upgrade shardoptim"
        )
    return meta, tensors


def load(
    path: str | os.PathLike[str],
    optimizer: ShardedOptimizer,
    *,
    model: torch.nn.Module | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by `save` at any world size into `optimizer` (and `model`).

    Collective: call on every rank of the group, in the same order. Each rank reads only the
    chunks that overlap the pieces it owns now.

    Args:
        path: the checkpoint directory.
        optimizer: a ShardedOptimizer over the same parameters (any world size, any layout).
        model: if given, its parameters and buffers are loaded in place, and names are matched.
        extra: objects with `load_state_dict` (schedulers, ...) to restore from the saved extras.

    Returns:
        The saved extras (state dicts for the stateful objects), {} when none were saved.
    """
    comm = optimizer.placement.comm
    optimizer.placement.enter("shardoptim.checkpoint.load", lone_rank=0)
    comm.barrier(what="checkpoint.load (start)")
    where = resolve(path)
    meta, tensors = read_meta(where)
    cls_name = optimizer.placement.optimizer_class.__name__
    if meta["optimizer_class"] != cls_name:
        raise ValueError(
            f"checkpoint {where} holds {meta['optimizer_class']} state, but this optimizer is {cls_name}; build the "
            "ShardedOptimizer with the same optimizer class"
        )
    names = param_names(optimizer, model)
    shapes = [tuple(p.shape) for p in optimizer.placement.params]
    saved_shapes = [tuple(s) for s in meta["shapes"]]
    if meta["names"] != names or saved_shapes != shapes:
        raise ValueError(
            f"checkpoint {where} is of another model: it has {len(meta['names'])} parameters, this optimizer "
            f"{len(names)}; first difference: {_first_difference(meta['names'], saved_shapes, names, shapes)}"
        )
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint {where} has {len(meta['param_groups'])} param groups but this optimizer has "
            f"{len(optimizer.param_groups)}; build the optimizer with the same groups"
        )
    # Everything that can fail is read and checked before anything is changed.
    model_keys = {} if model is None else {f"model/{k}": v for k, v in model.state_dict().items()}
    missing = sorted(k for k in model_keys if k not in tensors)
    if missing:
        raise ValueError(
            f"checkpoint {where} lacks model entries {missing[:5]}; was it saved with model=...?"
        )
    payload: dict[str, Any] = {}
    if EXTRA in tensors:
        payload = from_bytes_tensor(read_tensors(where, {EXTRA: tensors[EXTRA]})[EXTRA], "its extras", where)
    absent = sorted(k for k in (extra or {}) if k not in payload)
    if absent:
        raise ValueError(f"checkpoint {where} has no extras {absent} (it has {sorted(payload)})")
    index_to_values = _read_pieces(optimizer, where, meta, tensors, names)
    loaded = read_tensors(where, {k: tensors[k] for k in model_keys})
    with torch.no_grad():
        for key, target in model_keys.items():
            target.copy_(loaded[key])
    # NOTE: the model first: loading master weights afterwards keeps them (a model write after
    # them would re-read the rounded weights into the masters).
    load_pieces(optimizer, meta["param_groups"], index_to_values)
    # NOTE: the same on every rank (the metadata is), so state_dict() can still decide without talking.
    optimizer.placement.mark_loaded(bool(meta["chunks"]))
    for key, obj in (extra or {}).items():
        if hasattr(obj, "load_state_dict"):
            obj.load_state_dict(payload[key])
    return payload


def _first_difference(
    saved_names: list[str],
    saved_shapes: list[tuple[int, ...]],
    names: list[str],
    shapes: list[tuple[int, ...]],
) -> str:
    for i, (a, b) in enumerate(zip(zip(saved_names, saved_shapes), zip(names, shapes))):
        if a != b:
            return f"parameter {i} is {a[0]} {a[1]} in the checkpoint, {b[0]} {b[1]} here"
    return "the parameter counts differ"


def _read_pieces(
    optimizer: ShardedOptimizer,
    where: Path,
    meta: Mapping[str, Any],
    tensors: Mapping[str, TensorStorageMetadata],
    names: list[str],
) -> dict[int, dict[str, Any]]:
    """Assemble this rank's piece of every saved state entry from the overlapping chunks."""
    flat = optimizer.sharding == "flat"
    # A parameter laid out otherwise than when saved (channels_last then, row-major now, ...)
    # reads every chunk: its piece is not one range of the saved order.
    index_to_reorder = {
        piece.index: (
            saved_memory_order(meta, names[piece.index]),
            memory_perm(optimizer.placement.params[piece.index]),
        )
        for piece in optimizer.placement.pieces
    }
    wanted: dict[str, TensorStorageMetadata] = {}
    for piece in optimizer.placement.pieces:
        saved_order, order = index_to_reorder[piece.index]
        for key, spec in meta["chunks"].get(names[piece.index], {}).items():
            if spec == "whole":
                wanted[state_key(names[piece.index], key)] = tensors[state_key(names[piece.index], key)]
            elif isinstance(spec, list):
                for start, numel in spec:
                    overlaps = start < piece.in_param.end and piece.in_param.start < start + numel
                    if overlaps or saved_order != order:
                        chunk_key = state_key(names[piece.index], key, start)
                        wanted[chunk_key] = tensors[chunk_key]
    loaded = read_tensors(where, wanted)
    out: dict[int, dict[str, Any]] = {}
    for piece in optimizer.placement.pieces:
        name = names[piece.index]
        values: dict[str, Any] = {}
        for key, spec in meta["chunks"].get(name, {}).items():
            saved_order, order = index_to_reorder[piece.index]
            if spec == "whole":
                value = loaded[state_key(name, key)]
                if flat and value.dim() > 0:
                    perm = order if order is not None and value.dim() == len(order) else None
                    value = to_flat(value, perm).narrow(0, piece.in_param.start, piece.in_param.numel).clone()
                values[key] = value
            elif isinstance(spec, list) and saved_order != order:
                full = torch.cat([loaded[state_key(name, key, start)] for start, _ in sorted(spec)])
                shape = optimizer.placement.params[piece.index].shape
                reordered = to_flat(from_flat(full, shape, saved_order), order)
                values[key] = reordered.narrow(0, piece.in_param.start, piece.in_param.numel).clone()
            elif isinstance(spec, list):
                dtype = tensors[state_key(name, key, spec[0][0])].properties.dtype
                assembled = torch.empty(piece.in_param.numel, dtype=dtype)
                for start, numel in spec:
                    lo, hi = max(start, piece.in_param.start), min(start + numel, piece.in_param.end)
                    if lo < hi:
                        chunk = loaded[state_key(name, key, start)]
                        assembled[lo - piece.in_param.start : hi - piece.in_param.start] = chunk[
                            lo - start : hi - start
                        ]
                values[key] = (
                    assembled if flat else assembled.view(optimizer.placement.params[piece.index].shape)
                )
            else:
                values[key] = spec[1]
        if values:
            out[piece.index] = values
    return out
