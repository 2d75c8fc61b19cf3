"""Move param-group options between the wrapper's groups and the local optimizer's, both ways.

Before the base step every option but the structure keys is copied from the wrapper's groups (the
source of truth: schedulers and users write there) into the local optimizer's (`copy_hparams_`).
After it, the options the base step wrote itself (D-Adaptation's `d`, counters, an adapted lr)
flow back into the wrapper's groups (`snapshot_hparams` before the step, `flow_back_hparams_`
after it), so they are not overwritten by the next copy. A device tensor option is compared by
its version counter, never read back.

No communication. Must not import torch.distributed or shardoptim.optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["STRUCTURE_KEYS", "copy_hparams_", "flow_back_hparams_", "snapshot_hparams"]

#: Group keys that describe which parameters a group holds, not how to update them: never
#: packed, synced or copied between the wrapper's groups and the local optimizer's.
STRUCTURE_KEYS = ("params", "param_names")


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
