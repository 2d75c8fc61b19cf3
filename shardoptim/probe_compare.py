"""The probe's runs and how two of them are compared: trajectories, scalar state, group values.

A `Run` records what one run of a class did; `coupling` and `splitting` compare a run with the
base run and say why they differ (a cross-tensor coupling, or a per-tensor statistic). Pure torch:
must not import torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shardoptim.probe_case import Case

__all__ = [
    "RTOL_UPDATE",
    "Run",
    "close_value",
    "coupling_evidence",
    "splitting_evidence",
    "trajectory_diff",
    "written_keys",
]

#: Two trajectories are "the same" when every element differs by at most this fraction of the
#: largest update of its tensor in that step, or by at most _ULPS units in the last place of the
#: parameter (elementwise classes are bitwise equal when split, up to vectorised-tail rounding of
#: transcendental functions; a norm over a different set of elements moves the update by percents).
RTOL_UPDATE = 1e-5
_ULPS = 2.0
_EPS32 = float(torch.finfo(torch.float32).eps)
#: Scalar state and param_group values written by step() are "the same" up to this relative error.
_RTOL_STATE = 1e-6


@dataclass(slots=True)
class Run:
    """One run: the trajectory (whole shapes, per step) and what step() did besides the parameters."""

    trajectory: list[list[torch.Tensor]] = field(default_factory=list)
    """Parameters after every step (and after eval() for classes with train()/eval())."""
    written_keys: set[str] = field(default_factory=set)
    """param_group keys that step() added or changed."""
    groups_after: list[dict[str, Any]] = field(default_factory=list)
    """The param_groups (without params) after the last step."""
    rng_moved: bool = False
    """A global generator moved between construction and the end (only watched when asked)."""
    scalars: list[list[dict[str, float]]] = field(default_factory=list)
    """Per whole tensor, per piece of it (one when not split): the scalar state values."""
    odd_state: list[str] = field(default_factory=list)
    """State entries that are neither scalars nor tensors of the parameter's shape."""
    moved_before_closure: bool = False
    """step() changed the parameters before it called the closure."""


def close_value(a: Any, b: Any, rtol: float = 0.0) -> bool:
    """Equal up to a relative `rtol` (group values: numbers, tensors, tuples of them); nan equals nan."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=0.0, equal_nan=True))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close_value(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return _close(float(a), float(b), rtol)
    try:
        return bool(a == b)
    except Exception:  # e.g. an object whose == raises
        return a is b


def written_keys(before: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for old, new in zip(before, groups):
        for key, value in new.items():
            if key != "params" and (key not in old or not close_value(old[key], value)):
                keys.add(key)
    return keys


def trajectory_diff(
    ref: Run, other: Run, case: Case, indices: Sequence[int], *, ulps: float = _ULPS
) -> float:
    """Largest difference of `other` from `ref` on tensors `indices`, as a fraction of the update.

    0 when equal within `ulps` units in the last place (0: bitwise); inf where only one side is nan.
    """
    worst = 0.0
    for step, (ref_now, other_now) in enumerate(zip(ref.trajectory, other.trajectory)):
        prev = ref.trajectory[step - 1] if step else case.inits
        for i in indices:
            a, b = ref_now[i].double(), other_now[i].double()
            both_nan = a.isnan() & b.isnan()
            delta = torch.where(both_nan, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=math.inf)
            allowed = ulps * _EPS32 * torch.maximum(a.abs(), b.abs()).nan_to_num(nan=0.0)
            if bool((delta <= allowed).all()):
                continue
            update = float((a - prev[i].double()).abs().nan_to_num(nan=0.0, posinf=0.0).max())
            scale = max(update, _EPS32 * float(a.abs().nan_to_num(nan=0.0, posinf=0.0).max()), 1e-30)
            worst = max(worst, float(delta.max()) / scale)
    return worst


def _close(a: float, b: float, rtol: float = _RTOL_STATE) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))


def _scalar_differs(
    ref: Mapping[str, float], other: Mapping[str, float], *, rtol: float = _RTOL_STATE
) -> str | None:
    """Return the first scalar state key whose value differs by more than `rtol` (or is missing), else None."""
    for key, value in ref.items():
        if key not in other or not _close(value, other[key], rtol):
            return key
    return None


def _group_value_differs(ref: Run, other: Run) -> list[str]:
    """Keys written by step() whose final values differ between the two runs."""
    keys = set()
    for old, new in zip(ref.groups_after, other.groups_after):
        keys |= {
            k
            for k in ref.written_keys
            if k in old and not (k in new and close_value(old[k], new[k], _RTOL_STATE))
        }
    return sorted(keys)


def coupling_evidence(
    base: Run,
    other: Run | None,
    err: str | None,
    case: Case,
    *,
    what: str = "scaling one tensor's gradient",
) -> tuple[float, str | None]:
    """How much the other tensors' runs move under a change to the first tensor, and why.

    Bitwise: the other tensors get the same inputs in both runs, so a class that does not couple
    them computes the same bits; a difference of a unit in the last place per step is a coupling
    too (Ranger21's weight decay divides by a statistic over all tensors: 1e-6 after 12 steps).
    """
    if other is None:
        return math.inf, f"{what} makes the class fail: {err}"
    others = range(1, len(case.inits))
    diff = trajectory_diff(base, other, case, others, ulps=0.0)
    if diff > 0.0:
        return diff, f"{what} moves another tensor's update by {diff:.3g}x its size"
    for i in others:
        key = _scalar_differs(base.scalars[i][0], other.scalars[i][0], rtol=0.0)
        if key is not None:
            return math.inf, f"{what} changes another tensor's state {key!r}"
    keys = _group_value_differs(base, other)
    if keys:
        return math.inf, f"{what} changes the param_group values step() writes: {keys}"
    return diff, None


def splitting_evidence(base: Run, split: Run | None, err: str | None, case: Case) -> tuple[float, str | None]:
    """How much splitting every tensor into 1-D pieces changes the run, and why."""
    if split is None:
        return math.inf, f"the class fails on 1-D pieces of the tensors: {err}"
    if base.odd_state:
        return math.inf, f"it keeps per-tensor state: {base.odd_state[0]}"
    diff = trajectory_diff(base, split, case, range(len(case.inits)))
    if diff > RTOL_UPDATE:
        return diff, f"splitting tensors into pieces changes the update by {diff:.3g}x its size"
    for whole, pieces in zip(base.scalars, split.scalars):
        for piece in pieces:
            key = _scalar_differs(whole[0], piece)
            if key is not None:
                return math.inf, f"its scalar state {key!r} is a statistic of the whole tensor"
    return diff, None
