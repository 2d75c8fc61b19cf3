"""Sharded checkpoints through torch.distributed.checkpoint: parallel, atomic, any world size.

Each rank writes only the state it owns (one chunk per owned piece, keyed by parameter name and
offset), in parallel. The write goes to `<path>.partial` and becomes `<path>` by a rename on
rank 0 once every rank is done, so a crash mid-save leaves the previous checkpoint in place.
Loading reads only the chunks that overlap the loading rank's pieces, so it works at any world
size and under either layout. Nothing is unpickled with `weights_only=False`.

Offline: `shardoptim-consolidate DIR OUT.pt` (shardoptim.cli, over `consolidate_dir`) writes the
base optimizer's own single-file format without any process group.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from shardoptim.buffers import from_flat, memory_perm, to_flat
from shardoptim.state_dict import load_pieces

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_COMPLETE = "COMPLETE"
_META = "optim.meta"
_EXTRA = "extra"


def _to_bytes_tensor(obj: object) -> torch.Tensor:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _from_bytes_tensor(tensor: torch.Tensor, what: str, path: Path) -> Any:
    try:
        return torch.load(io.BytesIO(bytes(tensor.contiguous().untyped_storage())), weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {path}: cannot read {what} ({err}); the file is corrupt or truncated"
        ) from err


def _plain(value: Any) -> bool:
    """True for values torch.load(weights_only=True) can read back: numbers, strings, tensors, containers."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return False


def _names(opt: ShardedOptimizer, model: torch.nn.Module | None) -> list[str]:
    if model is None:
        return [f"p{index}" for index in range(len(opt.placement.params))]
    id_to_name = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(opt.placement.params) if id(p) not in id_to_name]
    if missing:
        raise ValueError(
            f"optimizer parameters {missing[:5]} are not parameters of the given model; pass the model whose "
            "parameters the optimizer holds, or model=None to key the state by index"
        )
    return [id_to_name[id(p)] for p in opt.placement.params]


def _state_key(name: str, key: str, start: int | None = None) -> str:
    return f"optim.state/{name}/{key}" + ("" if start is None else f"@{start}")


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
    names = _names(optimizer, model)
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
                tensors[_state_key(name, key, piece.in_param.start)] = value
                entry.setdefault(key, []).append((piece.in_param.start, piece.in_param.numel))
            elif piece.in_param.start == 0:
                if isinstance(value, torch.Tensor):
                    tensors[_state_key(name, key)] = value
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
    tensors[_META] = _to_bytes_tensor(meta)
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
        tensors[_EXTRA] = _to_bytes_tensor(payload)
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
    marker = partial / _COMPLETE
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


def _resolve(path: str | os.PathLike[str]) -> Path:
    final = Path(path)
    if (final / _COMPLETE).exists():
        return final
    previous = final.with_name(final.name + ".prev")
    if not final.exists() and (previous / _COMPLETE).exists():
        logger.warning(
            "checkpoint %s is missing; a save was interrupted while publishing. Loading %s", final, previous
        )
        return previous
    if final.exists():
        raise ValueError(
            f"checkpoint {final} is incomplete (no {_COMPLETE} marker): a save was interrupted or this is not a "
            "shardoptim checkpoint directory; load the previous checkpoint"
        )
    partial = final.with_name(final.name + ".partial")
    hint = f" ({partial} holds an interrupted save, which cannot be loaded)" if partial.exists() else ""
    raise FileNotFoundError(f"no checkpoint at {final}{hint}")


def _read(path: Path, keys: Mapping[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
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


def _read_meta(path: Path) -> tuple[dict[str, Any], dict[str, TensorStorageMetadata]]:
    try:
        storage = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:
        raise ValueError(
            f"checkpoint {path}: cannot read its metadata ({err}); it is corrupt or truncated"
        ) from err
    tensors = {k: v for k, v in storage.items() if isinstance(v, TensorStorageMetadata)}
    if _META not in tensors:
        raise ValueError(
            f"checkpoint {path} has no {_META!r} entry; it was not written by shardoptim.checkpoint.save"
        )
    meta = _from_bytes_tensor(_read(path, {_META: tensors[_META]})[_META], "its metadata", path)
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
    where = _resolve(path)
    meta, tensors = _read_meta(where)
    cls_name = optimizer.placement.optimizer_class.__name__
    if meta["optimizer_class"] != cls_name:
        raise ValueError(
            f"checkpoint {where} holds {meta['optimizer_class']} state, but this optimizer is {cls_name}; build the "
            "ShardedOptimizer with the same optimizer class"
        )
    names = _names(optimizer, model)
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
    if _EXTRA in tensors:
        payload = _from_bytes_tensor(_read(where, {_EXTRA: tensors[_EXTRA]})[_EXTRA], "its extras", where)
    absent = sorted(k for k in (extra or {}) if k not in payload)
    if absent:
        raise ValueError(f"checkpoint {where} has no extras {absent} (it has {sorted(payload)})")
    index_to_values = _read_pieces(optimizer, where, meta, tensors, names)
    loaded = _read(where, {k: tensors[k] for k in model_keys})
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


def _memory_orders(optimizer: ShardedOptimizer, names: list[str]) -> dict[str, list[int]]:
    """Return parameter name -> memory order for the parameters that are not row-major."""
    orders = {}
    for name, param in zip(names, optimizer.placement.params):
        perm = memory_perm(param)
        if perm is not None:
            orders[name] = list(perm)
    return orders


def _saved_order(meta: Mapping[str, Any], name: str) -> tuple[int, ...] | None:
    order = meta.get("memory_orders", {}).get(name)
    return None if order is None else tuple(order)


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
        piece.index: (_saved_order(meta, names[piece.index]), memory_perm(optimizer.placement.params[piece.index]))
        for piece in optimizer.placement.pieces
    }
    wanted: dict[str, TensorStorageMetadata] = {}
    for piece in optimizer.placement.pieces:
        saved_order, order = index_to_reorder[piece.index]
        for key, spec in meta["chunks"].get(names[piece.index], {}).items():
            if spec == "whole":
                wanted[_state_key(names[piece.index], key)] = tensors[_state_key(names[piece.index], key)]
            elif isinstance(spec, list):
                for start, numel in spec:
                    overlaps = start < piece.in_param.end and piece.in_param.start < start + numel
                    if overlaps or saved_order != order:
                        chunk_key = _state_key(names[piece.index], key, start)
                        wanted[chunk_key] = tensors[chunk_key]
    loaded = _read(where, wanted)
    out: dict[int, dict[str, Any]] = {}
    for piece in optimizer.placement.pieces:
        name = names[piece.index]
        values: dict[str, Any] = {}
        for key, spec in meta["chunks"].get(name, {}).items():
            saved_order, order = index_to_reorder[piece.index]
            if spec == "whole":
                value = loaded[_state_key(name, key)]
                if flat and value.dim() > 0:
                    perm = order if order is not None and value.dim() == len(order) else None
                    value = to_flat(value, perm).narrow(0, piece.in_param.start, piece.in_param.numel).clone()
                values[key] = value
            elif isinstance(spec, list) and saved_order != order:
                full = torch.cat([loaded[_state_key(name, key, start)] for start, _ in sorted(spec)])
                shape = optimizer.placement.params[piece.index].shape
                reordered = to_flat(from_flat(full, shape, saved_order), order)
                values[key] = reordered.narrow(0, piece.in_param.start, piece.in_param.numel).clone()
            elif isinstance(spec, list):
                dtype = tensors[_state_key(name, key, spec[0][0])].properties.dtype
                assembled = torch.empty(piece.in_param.numel, dtype=dtype)
                for start, numel in spec:
                    lo, hi = max(start, piece.in_param.start), min(start + numel, piece.in_param.end)
                    if lo < hi:
                        chunk = loaded[_state_key(name, key, start)]
                        assembled[lo - piece.in_param.start : hi - piece.in_param.start] = chunk[
                            lo - start : hi - start
                        ]
                values[key] = assembled if flat else assembled.view(optimizer.placement.params[piece.index].shape)
            else:
                values[key] = spec[1]
        if values:
            out[piece.index] = values
    return out


def consolidate_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a sharded checkpoint in this process and return the base optimizer's format.

    No process group is needed. State tensors are full-shape, keyed by parameter index.
    """
    where = _resolve(path)
    meta, tensors = _read_meta(where)
    loaded = _read(where, {k: v for k, v in tensors.items() if k.startswith("optim.state/")})
    state: dict[int, dict[str, Any]] = {}
    for index, (name, shape) in enumerate(zip(meta["names"], meta["shapes"])):
        entry: dict[str, Any] = {}
        for key, spec in meta["chunks"].get(name, {}).items():
            if spec == "whole":
                entry[key] = loaded[_state_key(name, key)]
            elif isinstance(spec, list):
                parts = sorted(spec)
                full = torch.cat([loaded[_state_key(name, key, start)] for start, _ in parts])
                entry[key] = from_flat(full, shape, _saved_order(meta, name))
            else:
                entry[key] = spec[1]
        if entry:
            state[index] = entry
    name_to_index = {name: i for i, name in enumerate(meta["names"])}
    groups = [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _main(argv: list[str]) -> int:
    """Serve the older `python -m shardoptim.checkpoint consolidate DIR OUT.pt` through shardoptim.cli."""
    from shardoptim.cli import main

    return main(argv[1:] if argv[:1] == ["consolidate"] else argv)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
