"""Param-group hyperparameters: make the numeric options identical across ranks before every step.

The wrapper's `param_groups` are the source of truth: schedulers and users write there. Before
every local step the numeric options of every group are packed into one float64 vector
(shardoptim.hparam_pack) and either broadcast from rank 0 ("broadcast") or compared across ranks
("check") in a single collective; non-numeric options (strings, None, callables) are copied
locally, never sent. Copying into the local optimizer and back is shardoptim.hparam_flow (its
names are re-exported here for shardoptim.stepping and shardoptim.construct).

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from shardoptim.comm import Comm
from shardoptim.hparam_flow import STRUCTURE_KEYS, copy_hparams_, flow_back_hparams_, snapshot_hparams
from shardoptim.hparam_pack import MIN_CAPACITY, OVERFLOW, HparamEntry, pack_hparams, unpack_hparams_

__all__ = [
    "HPARAM_SYNC_MODES",
    "STRUCTURE_KEYS",
    "HparamSync",
    "HparamSyncer",
    "copy_hparams_",
    "flow_back_hparams_",
    "snapshot_hparams",
]

HparamSync = Literal["broadcast", "check", "off"]
HPARAM_SYNC_MODES: tuple[HparamSync, ...] = ("broadcast", "check", "off")

#: How a NaN option enters the agreement all-reduce (which has no max for NaN).
_NAN_KEY = 1.5e308


def _same(rows: torch.Tensor) -> bool:
    """True when every row equals the first (NaN equal to NaN)."""
    equal = (rows == rows[0]) | (torch.isnan(rows) & torch.isnan(rows[0]))
    return bool(equal.all())


def _describe_mismatch(gathered: torch.Tensor, entries: Sequence[HparamEntry]) -> str:
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
        self.capacity = MIN_CAPACITY

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
        if same and packed[0] != OVERFLOW:  # all overflowing alike is not agreeing: grow below
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
        overflow = gathered[:, 0] == OVERFLOW
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

    def _all_equal(
        self, packed: torch.Tensor, extra64: torch.Tensor | None
    ) -> tuple[bool, torch.Tensor | None]:
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
