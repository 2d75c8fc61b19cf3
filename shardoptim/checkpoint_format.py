"""The on-disk format of a sharded checkpoint: version, entry names, keys and the metadata encoding.

A checkpoint directory is one torch.distributed.checkpoint store plus a `COMPLETE` marker file.
It holds one tensor entry per chunk of optimizer state (`optim.state/<name>/<key>@<start>` for a
flat chunk, `optim.state/<name>/<key>` for a whole tensor), `model/<key>` entries when a model was
saved, and two byte tensors: the metadata (`optim.meta`) and the extras (`extra`), both written
with torch.save and read with weights_only=True. Shared by the writer (shardoptim.checkpoint_save)
and the readers (shardoptim.checkpoint_load, shardoptim.checkpoint).

Pure: no file or process-group access. Must not import torch.distributed or shardoptim.optimizer
at run time.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer

__all__ = [
    "COMPLETE",
    "EXTRA",
    "FORMAT_VERSION",
    "META",
    "from_bytes_tensor",
    "param_names",
    "saved_memory_order",
    "state_key",
    "to_bytes_tensor",
]

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
"""The marker file that makes a checkpoint directory complete (written last, before the rename)."""
META = "optim.meta"
"""The entry holding the metadata (class, names, shapes, param groups, chunk manifest)."""
EXTRA = "extra"
"""The entry holding the saved extras (plain values and state dicts)."""


def to_bytes_tensor(obj: object) -> torch.Tensor:
    """Return `obj` as torch.save writes it, in a uint8 tensor (a DCP entry)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def from_bytes_tensor(tensor: torch.Tensor, what: str, path: Path) -> Any:
    """Return the object in a `to_bytes_tensor` tensor, read with weights_only=True.

    Raises:
        ValueError: the bytes cannot be read (`what` of the checkpoint at `path` is corrupt).
    """
    try:
        return torch.load(io.BytesIO(bytes(tensor.contiguous().untyped_storage())), weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {path}: cannot read {what} ({err}); the file is corrupt or truncated"
        ) from err


def param_names(opt: ShardedOptimizer, model: torch.nn.Module | None) -> list[str]:
    """Return the name that keys each parameter's state: its name in `model`, else `p<index>`.

    Raises:
        ValueError: a parameter of the optimizer is not a parameter of `model`.
    """
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


def state_key(name: str, key: str, start: int | None = None) -> str:
    """Return the entry of state `key` of parameter `name`: the flat chunk at `start`, or the whole tensor."""
    return f"optim.state/{name}/{key}" + ("" if start is None else f"@{start}")


def saved_memory_order(meta: Mapping[str, Any], name: str) -> tuple[int, ...] | None:
    """Return the memory order parameter `name` was flattened in when saved (None: row-major)."""
    order = meta.get("memory_orders", {}).get(name)
    return None if order is None else tuple(order)
