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
from dataclasses import dataclass
from typing import Any, Literal

import torch

from shardoptim.comm import Comm

HparamSync = Literal["broadcast", "check", "off"]
HPARAM_SYNC_MODES: tuple[HparamSync, ...] = ("broadcast", "check", "off")

#: Group keys that describe which parameters a group holds, not how to update them: never
#: packed, synced or copied between the wrapper's groups and the local optimizer's.
STRUCTURE_KEYS = ("params", "param_names")

# One packed entry: (group index, key, kind, number of floats). Kinds: "bool", "int", "float",
# "tensor", "tuple:<kinds of the elements>".
_Entry = tuple[int, str, str, int]

_MIN_CAPACITY = 64
# Marks a packed vector whose values did not fit the agreed capacity (fingerprints are >= 0).
_OVERFLOW = -1.0
#: How a NaN option enters the agreement all-reduce (which has no max for NaN).
_NAN_KEY = 1.5e308


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


def _fingerprint(entries: Sequence[_Entry]) -> float:
    return float(zlib.crc32(repr([(g, k, kind, n) for g, k, kind, n in entries]).encode()))


def pack_hparams(
    groups: Sequence[Mapping[str, Any]], *, capacity: int | None = None
) -> tuple[torch.Tensor, list[_Entry]]:
    """Pack the numeric options of `groups` into one float64 vector.

    The vector is [schema fingerprint, number of values, values..., zero padding]. Its length is
    `capacity` (default: the next power of two >= 64 that fits); when the values do not fit in
    `capacity`, it is [_OVERFLOW, the capacity needed, zeros...] so that every rank still enters
    a collective of the same size and learns what size to agree on.

    Returns:
        The vector (on CPU) and the schema that `unpack_hparams_` needs.
    """
    entries = _schema(groups)
    flat: list[float] = []
    for index, key, _kind_name, _length in entries:
        flat.extend(_values(groups[index][key]))
    needed = max(_MIN_CAPACITY, 1 << math.ceil(math.log2(len(flat) + 2)))
    packed = torch.zeros(needed if capacity is None else capacity, dtype=torch.float64)
    if capacity is not None and needed > capacity:
        packed[0], packed[1] = _OVERFLOW, needed
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
    groups: Sequence[dict[str, Any]], packed: torch.Tensor, entries: Sequence[_Entry]
) -> None:
    """Write the values in `packed` back into `groups` (tensors are updated in place)."""
    values = packed[2 : 2 + int(packed[1].item())].tolist()
    offset = 0
    for index, key, kind, length in entries:
        groups[index][key] = _restore(groups[index][key], kind, values[offset : offset + length])
        offset += length


def _same(rows: torch.Tensor) -> bool:
    """True when every row equals the first (NaN equal to NaN)."""
    equal = (rows == rows[0]) | (torch.isnan(rows) & torch.isnan(rows[0]))
    return bool(equal.all())


def _describe_mismatch(gathered: torch.Tensor, entries: Sequence[_Entry]) -> str:
    """Name the first (group, key) whose values differ across the rows of `gathered`."""
    offset = 2
    for index, key, _kind_name, length in entries:
        rows = gathered[:, offset : offset + length]
        if not _same(rows):
            per_rank = ", ".join(
                f"rank {r}: {row.tolist() if length > 1 else row.item()}" for r, row in enumerate(rows)
            )
            return f"param_groups[{index}][{key!r}] differs across ranks ({per_rank})"
        offset += length
    return "the packed hyperparameters differ across ranks"


class HparamSyncer:
    """Keeps the agreed size of the packed vector between steps and runs the per-step sync.

    Args:
        comm: the shard group (or the replicate group of hybrid sharding).
        mode: "broadcast", "check" or "off" (see `sync_`).
        source: the rank whose values "broadcast" gives every rank.
    """

    def __init__(self, comm: Comm, mode: HparamSync, *, source: int = 0) -> None:
        if mode not in HPARAM_SYNC_MODES:
            raise ValueError(f"hparam_sync must be one of {HPARAM_SYNC_MODES}, got {mode!r}")
        self.comm = comm
        self.mode: HparamSync = mode
        self.source = source
        self.capacity = _MIN_CAPACITY

    def sync_(
        self, groups: Sequence[dict[str, Any]], *, extra: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Make the numeric options of `groups` identical on every rank, or check that they are.

        `extra` (a small 1-D tensor of flags, the same length on every rank) rides along; the
        result is a (rows, len) float64 tensor whose maximum over its rows is the maximum over
        ranks (one row when the options agreed, every rank's row otherwise; None without
        `extra`). With mode "off" it gets an all-reduce of its own.

        "broadcast" overwrites every rank's values with rank `source`'s (0 by default); "check"
        raises RuntimeError on every rank when any value differs, naming the group, the key and
        the value on each rank; "off" does nothing. Both other modes first all-reduce (max) the
        small float64 vector of values and of their negations: when every rank holds the same
        values (the usual case) that is all, and its size does not grow with the ranks. Only a
        difference brings an all-gather of every rank's vector (a second one when the options
        outgrow the agreed size), so a rank whose groups differ in structure makes every rank
        raise the same error instead of leaving rank 0 waiting.

        Collective: call on every rank of the group, in the same order (except with mode "off").
        """
        comm = self.comm
        # NOTE: `extra` may live on the gradients' device (the inf/nan flag): it joins the probe
        # there and comes back with its one host read, never read on its own.
        extra64 = None if extra is None else extra.detach().to(torch.float64).reshape(-1)
        if comm.world_size == 1:
            return None if extra64 is None else comm.to_host(extra64).unsqueeze(0)
        if self.mode == "off":
            if extra64 is None:
                return None
            if extra64.device.type == "cpu":
                flags = _to_comm(extra64, comm)
            else:  # a device flag on a CPU group: its one host read
                flags = comm.to_host(extra64) if comm.device.type == "cpu" else extra64.to(comm.device)
            comm.all_reduce_(flags, op="max", what="step flags")
            return comm.to_host(flags).unsqueeze(0)
        packed = pack_hparams(groups, capacity=self.capacity)[0]
        same, extras = self._all_equal(packed, extra64)
        if same and packed[0] != _OVERFLOW:  # all overflowing alike is not agreeing: grow below
            return extras
        if extra64 is not None:
            extra64 = comm.to_host(extra64)  # read only on a mismatch (the rare path below)

        def gather() -> tuple[torch.Tensor, list[Any]]:
            packed, entries = pack_hparams(groups, capacity=self.capacity)
            if extra64 is not None:
                packed = torch.cat([packed, extra64])
            what = f"hyperparameter {self.mode}"
            return comm.to_host(comm.all_gather(_to_comm(packed, comm), what=what)), entries

        gathered, entries = gather()
        overflow = gathered[:, 0] == _OVERFLOW
        if bool(overflow.any()):
            self.capacity = int(gathered[overflow, 1].max().item())
            gathered, entries = gather()
        extras = None if extra64 is None else gathered[:, gathered.shape[1] - extra64.numel() :]
        gathered = gathered[:, : gathered.shape[1] - (0 if extra64 is None else extra64.numel())]
        fingerprints = gathered[:, 0]
        if not bool((fingerprints == fingerprints[0]).all()):
            mine = [sorted(k for k in g if k not in STRUCTURE_KEYS) for g in groups]
            raise RuntimeError(
                f"{comm.prefix}param_groups differ in structure across ranks (groups, keys or value types; "
                f"ranks with rank 0's structure: {(fingerprints == fingerprints[0]).nonzero().flatten().tolist()}; "
                f"this rank has {len(groups)} groups with keys {mine}). Make the same param_group changes "
                "(add_param_group, new keys, schedulers) on every rank"
            )
        if self.mode == "broadcast":
            unpack_hparams_(groups, gathered[self.source], entries)
            return extras
        if not _same(gathered):
            raise RuntimeError(
                f"{comm.prefix}hparam_sync='check': {_describe_mismatch(gathered, entries)}. Change "
                "hyperparameters identically on every rank (e.g. reduce a ReduceLROnPlateau metric with "
                "shardoptim.all_reduce_metric), or use hparam_sync='broadcast'"
            )
        return extras

    def _all_equal(self, packed: torch.Tensor, extra64: torch.Tensor | None) -> tuple[bool, torch.Tensor | None]:
        """Return (whether `packed` is the same on every rank, the max over ranks of `extra64` as one row).

        Collective: one all-reduce (max) of [packed, -packed, extra64] on every rank.
        """
        comm = self.comm
        # NOTE: NaN has no max; a NaN option compares as this sentinel (infinities stay themselves).
        key = torch.nan_to_num(packed, nan=_NAN_KEY, posinf=math.inf, neginf=-math.inf)
        probe = _to_comm(torch.cat([key, -key]), comm)
        if extra64 is not None:
            # a device flag meeting a CPU probe ("cpu:gloo,cuda:nccl") costs the step's one host read
            extra = comm.to_host(extra64) if probe.device.type == "cpu" else extra64.to(probe.device)
            probe = torch.cat([probe, extra])
        comm.all_reduce_(probe, op="max", what=f"hyperparameter {self.mode}")
        probe = comm.to_host(probe)
        n = key.numel()
        same = bool(torch.equal(probe[:n], -probe[n : 2 * n]))
        return same, None if extra64 is None else probe[2 * n :].unsqueeze(0)


def _to_comm(host: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Copy a small CPU vector to the group's device (from pinned memory, so the copy does not wait for the stream)."""
    device = comm.device
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def sync_hparams_(groups: Sequence[dict[str, Any]], comm: Comm, *, mode: HparamSync) -> None:
    """Run one `HparamSyncer(comm, mode).sync_(groups)` (for callers that keep no syncer).

    Collective: call on every rank of the group, in the same order (except with mode "off").
    """
    HparamSyncer(comm, mode).sync_(groups)


def copy_hparams_(src: Sequence[Mapping[str, Any]], dst: Sequence[dict[str, Any]]) -> None:
    """Copy every option but the STRUCTURE_KEYS from each group of `src` into the same group of `dst`."""
    if len(src) != len(dst):
        raise RuntimeError(f"cannot copy hyperparameters of {len(src)} groups into {len(dst)} groups")
    for s, d in zip(src, dst):
        for key, value in s.items():
            if key not in STRUCTURE_KEYS:
                d[key] = value


@dataclass(frozen=True)
class _TensorMark:
    """A device tensor option in a snapshot: the object and its version counter (no copy, no read)."""

    tensor: torch.Tensor
    version: int


def _snapshot_value(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type != "cpu":
        return _TensorMark(value, value._version)
    return value.detach().clone()


def snapshot_hparams(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return a copy of every option of `groups` (CPU tensors cloned), to compare with after a step.

    A device tensor is marked with its version counter instead: comparing a clone would read it
    back (a host-device sync) after every step. It counts as written when replaced or written in place.
    """
    return [{k: _snapshot_value(v) for k, v in g.items() if k not in STRUCTURE_KEYS} for g in groups]


def _differs(before: Any, after: Any) -> bool:
    if before is after:
        return False
    if isinstance(before, _TensorMark):
        return not (after is before.tensor and after._version == before.version)
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        return not (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.shape == after.shape
            and bool(torch.equal(before, after.to(before.device)))
        )
    try:
        return not bool(before == after)
    except Exception:  # values without a usable ==: treat as written
        return True


def flow_back_hparams_(
    local: Sequence[Mapping[str, Any]], wrapper: Sequence[dict[str, Any]], before: Sequence[Mapping[str, Any]]
) -> list[tuple[int, str]]:
    """Copy the options the base optimizer wrote during its step from `local` into `wrapper`.

    An option counts as written when it is new or its value differs from `before` (the snapshot
    taken just before the step). D-Adaptation's and Prodigy's `d`, counters such as `k`, and any
    lr a class adapts itself then reach the wrapper's `param_groups` (schedulers and checkpoints
    see them) instead of being overwritten by the wrapper's copy at the next step.

    Returns:
        The (group index, key) pairs copied.
    """
    copied = []
    for index, (loc, wrap, old) in enumerate(zip(local, wrapper, before)):
        for key, value in loc.items():
            if key in STRUCTURE_KEYS:
                continue
            if key not in old or _differs(old[key], value):
                wrap[key] = value
                copied.append((index, key))
    return copied


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
