"""Pack the numeric options of param groups into one float64 vector, and write such a vector back.

The per-step hyperparameter sync (shardoptim.hparams) sends this vector in one collective. Numeric
options (floats, ints, bools, tuples and lists of numbers, small real tensors) are packed, in a
fixed order with a schema fingerprint; every other option (strings, None, callables) is left out.
A device tensor option is read on the host only after it changed in place (its version counter).

Pure: no communication. Must not import torch.distributed or shardoptim.optimizer.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["MIN_CAPACITY", "OVERFLOW", "HparamEntry", "pack_hparams", "unpack_hparams_"]

#: One packed entry: (group index, key, kind, number of floats). Kinds: "bool", "int", "float",
#: "tensor", "tuple:<kinds of the elements>" (or "list:...").
HparamEntry = tuple[int, str, str, int]

#: The smallest packed vector (its length is a power of two at least this).
MIN_CAPACITY = 64
#: Marks a packed vector whose values did not fit the agreed capacity (fingerprints are >= 0).
OVERFLOW = -1.0


def _scalar_kind(value: object) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return None


def _kind(value: object) -> str | None:
    """Return how `value` is packed, or None when it is copied, not sent."""
    scalar = _scalar_kind(value)
    if scalar is not None:
        return scalar
    if isinstance(value, torch.Tensor) and not value.is_complex() and value.numel() <= 64:
        return "tensor"
    if isinstance(value, (tuple, list)) and value:
        inner = [_scalar_kind(v) for v in value]
        if all(k is not None for k in inner):
            return f"{type(value).__name__}:" + ",".join(k for k in inner if k is not None)
    return None


def _schema(groups: Sequence[Mapping[str, Any]]) -> list[HparamEntry]:
    entries: list[HparamEntry] = []
    for index, group in enumerate(groups):
        for key in sorted(k for k in group if k != "params"):
            kind = _kind(group[key])
            if kind is None:
                continue
            value = group[key]
            if isinstance(value, torch.Tensor):
                length = value.numel()
            elif isinstance(value, (tuple, list)):
                length = len(value)
            else:
                length = 1
            entries.append((index, key, kind, length))
    return entries


#: The attribute under which a device tensor option keeps its host values: (version counter, values).
_HOST_ATTR = "_shardoptim_host_values"


def _host_values(tensor: torch.Tensor) -> list[float]:
    """Return a tensor option's values as floats, reading a device tensor once per in-place change.

    A CPU tensor is read every time (no sync). A device tensor (a CUDA lr) is read when its
    version counter moved since the last read (a host-device sync), else the values cached on
    the tensor are returned: the per-step hyperparameter sync does not sync the device.
    """
    if tensor.device.type == "cpu":
        return [float(v) for v in tensor.detach().reshape(-1).tolist()]
    cached = getattr(tensor, _HOST_ATTR, None)
    if cached is not None and cached[0] == tensor._version:
        return list(cached[1])
    values = _read_device(tensor)
    setattr(tensor, _HOST_ATTR, (tensor._version, values))
    return list(values)


def _read_device(tensor: torch.Tensor) -> list[float]:
    """Read a device tensor's values on the host (a host-device sync)."""
    return [float(v) for v in tensor.detach().reshape(-1).tolist()]


def _values(value: object) -> list[float]:
    if isinstance(value, torch.Tensor):
        return _host_values(value)
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    assert isinstance(value, (bool, int, float))
    return [float(value)]


def _fingerprint(entries: Sequence[HparamEntry]) -> float:
    return float(zlib.crc32(repr([(g, k, kind, n) for g, k, kind, n in entries]).encode()))


def pack_hparams(
    groups: Sequence[Mapping[str, Any]], *, capacity: int | None = None
) -> tuple[torch.Tensor, list[HparamEntry]]:
    """Pack the numeric options of `groups` into one float64 vector.

    The vector is [schema fingerprint, number of values, values..., zero padding]. Its length is
    `capacity` (default: the next power of two >= 64 that fits); when the values do not fit in
    `capacity`, it is [OVERFLOW, the capacity needed, zeros...] so that every rank still enters
    a collective of the same size and learns what size to agree on.

    Returns:
        The vector (on CPU) and the schema that `unpack_hparams_` needs.
    """
    entries = _schema(groups)
    flat: list[float] = []
    for index, key, _kind_name, _length in entries:
        flat.extend(_values(groups[index][key]))
    needed = max(MIN_CAPACITY, 1 << math.ceil(math.log2(len(flat) + 2)))
    packed = torch.zeros(needed if capacity is None else capacity, dtype=torch.float64)
    if capacity is not None and needed > capacity:
        packed[0], packed[1] = OVERFLOW, needed
        return packed, entries
    packed[0] = _fingerprint(entries)
    packed[1] = len(flat)
    if flat:
        packed[2 : 2 + len(flat)] = torch.tensor(flat, dtype=torch.float64)
    return packed, entries


def _restore(old: object, kind: str, values: list[float]) -> object:
    if kind == "bool":
        return bool(values[0])
    if kind == "int":
        return int(values[0])
    if kind == "float":
        return values[0]
    if kind == "tensor":
        assert isinstance(old, torch.Tensor)
        if old.device.type != "cpu":  # compared on the host, with the cached values: no sync
            held = torch.tensor(values, dtype=old.dtype)
            rounded = [float(v) for v in held.tolist()]
            if _host_values(old) != rounded:
                with torch.no_grad():
                    old.copy_(held.reshape(old.shape))
                setattr(old, _HOST_ATTR, (old._version, rounded))
            return old
        new = torch.tensor(values, dtype=old.dtype, device=old.device).reshape(old.shape)
        if not torch.equal(new, old):
            with torch.no_grad():
                old.copy_(new)
        return old
    container, _, inner = kind.partition(":")
    items = [_restore(None, k, [v]) for k, v in zip(inner.split(","), values)]
    return tuple(items) if container == "tuple" else items


def unpack_hparams_(
    groups: Sequence[dict[str, Any]], packed: torch.Tensor, entries: Sequence[HparamEntry]
) -> None:
    """Write the values in `packed` back into `groups` (tensors are updated in place)."""
    values = packed[2 : 2 + int(packed[1].item())].tolist()
    offset = 0
    for index, key, kind, length in entries:
        groups[index][key] = _restore(groups[index][key], kind, values[offset : offset + length])
        offset += length
