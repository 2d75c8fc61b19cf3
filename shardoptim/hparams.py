"""Param-group hyperparameters: pack, broadcast or check across ranks, copy into the local optimizer.

The wrapper's `param_groups` are the source of truth: schedulers and users write there. Before
every local step the numeric options of every group (floats, ints, bools, tuples of numbers,
tensors) are packed into one float64 vector and either broadcast from rank 0 ("broadcast") or
compared across ranks ("check") in a single collective; non-numeric options (strings, None,
callables) are copied locally, never sent. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from shardoptim.comm import Comm

HparamSync = Literal["broadcast", "check", "off"]
HPARAM_SYNC_MODES: tuple[HparamSync, ...] = ("broadcast", "check", "off")

# One packed entry: (group index, key, kind, number of floats). Kinds: "bool", "int", "float",
# "tensor", "tuple:<kinds of the elements>".
_Entry = tuple[int, str, str, int]

_MIN_CAPACITY = 64


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


def _schema(groups: Sequence[Mapping[str, Any]]) -> list[_Entry]:
    entries: list[_Entry] = []
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


def _values(value: object) -> list[float]:
    if isinstance(value, torch.Tensor):
        return [float(v) for v in value.detach().reshape(-1).tolist()]
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    assert isinstance(value, (bool, int, float))
    return [float(value)]


def _fingerprint(entries: Sequence[_Entry]) -> float:
    return float(zlib.crc32(repr([(g, k, kind, n) for g, k, kind, n in entries]).encode()))


def pack_hparams(groups: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, list[_Entry]]:
    """Pack the numeric options of `groups` into one float64 vector.

    The vector is [schema fingerprint, number of values, values..., zero padding]; its length is a
    power of two (at least 64) so ranks whose schemas differ slightly still enter a collective of
    the same size and can report the difference instead of hanging.

    Returns:
        The vector (on CPU) and the schema that `unpack_hparams_` needs.
    """
    entries = _schema(groups)
    flat: list[float] = []
    for index, key, _kind_name, _length in entries:
        flat.extend(_values(groups[index][key]))
    capacity = max(_MIN_CAPACITY, 1 << math.ceil(math.log2(len(flat) + 2)))
    packed = torch.zeros(capacity, dtype=torch.float64)
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
        new = torch.tensor(values, dtype=old.dtype, device=old.device).reshape(old.shape)
        if not torch.equal(new, old):
            with torch.no_grad():
                old.copy_(new)
        return old
    container, _, inner = kind.partition(":")
    items = [_restore(None, k, [v]) for k, v in zip(inner.split(","), values)]
    return tuple(items) if container == "tuple" else items


def unpack_hparams_(
    groups: Sequence[dict[str, Any]], packed: torch.Tensor, entries: Sequence[_Entry]
) -> None:
    """Write the values in `packed` back into `groups` (tensors are updated in place)."""
    values = packed[2 : 2 + int(packed[1].item())].tolist()
    offset = 0
    for index, key, kind, length in entries:
        groups[index][key] = _restore(groups[index][key], kind, values[offset : offset + length])
        offset += length


def _describe_mismatch(gathered: torch.Tensor, entries: Sequence[_Entry]) -> str:
    """Name the first (group, key) whose values differ across the rows of `gathered`."""
    offset = 2
    for index, key, _kind_name, length in entries:
        rows = gathered[:, offset : offset + length]
        if not bool((rows == rows[0]).all()):
            per_rank = ", ".join(
                f"rank {r}: {row.tolist() if length > 1 else row.item()}" for r, row in enumerate(rows)
            )
            return f"param_groups[{index}][{key!r}] differs across ranks ({per_rank})"
        offset += length
    return "the packed hyperparameters differ across ranks"


def sync_hparams_(groups: Sequence[dict[str, Any]], comm: Comm, *, mode: HparamSync) -> None:
    """Make the numeric options of `groups` identical on every rank, or check that they are.

    "broadcast" overwrites every rank's values with rank 0's; "check" raises RuntimeError on every
    rank when any value differs, naming the group, the key and the value on each rank; "off" does
    nothing.

    Collective: call on every rank of the group, in the same order (except with mode "off").
    """
    if mode == "off" or comm.world_size == 1:
        return
    packed, entries = pack_hparams(groups)
    packed = packed.to(comm.device)
    if mode == "broadcast":
        fingerprint = packed[0].item()
        comm.broadcast_(packed, src=0, what="hyperparameter broadcast")
        if packed[0].item() != fingerprint:
            raise RuntimeError(
                f"{comm.prefix}param_groups differ in structure from rank 0 (different groups, keys or "
                f"value types; this rank has {len(groups)} groups with keys "
                f"{[sorted(k for k in g if k != 'params') for g in groups]}). Make the same "
                "param_group changes (add_param_group, new keys) on every rank"
            )
        unpack_hparams_(groups, packed.cpu(), entries)
        return
    gathered = comm.all_gather(packed, what="hyperparameter check").cpu()
    if not bool((gathered == gathered[0]).all()):
        if not bool((gathered[:, 0] == gathered[0, 0]).all()):
            raise RuntimeError(
                f"{comm.prefix}param_groups differ in structure across ranks (groups, keys or value "
                "types); make the same param_group changes on every rank"
            )
        raise RuntimeError(
            f"{comm.prefix}hparam_sync='check': {_describe_mismatch(gathered, entries)}. Change "
            "hyperparameters identically on every rank (e.g. reduce a ReduceLROnPlateau metric with "
            "shardoptim.all_reduce_metric), or use hparam_sync='broadcast'"
        )


def copy_hparams_(src: Sequence[Mapping[str, Any]], dst: Sequence[dict[str, Any]]) -> None:
    """Copy every option but "params" from each group of `src` into the matching group of `dst`."""
    if len(src) != len(dst):
        raise RuntimeError(f"cannot copy hyperparameters of {len(src)} groups into {len(dst)} groups")
    for s, d in zip(src, dst):
        for key, value in s.items():
            if key != "params":
                d[key] = value


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
