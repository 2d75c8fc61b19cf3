"""What kind of update each optimizer class makes, and so how its state may be sharded.

- "flat": the update is element by element, so any slice of a parameter can be updated alone.
- "tensor": the update looks at whole tensors (factored moments, orthogonalisation, trust ratios,
  sparse rows), so each parameter must be owned whole by one rank.
- "lbfgs": torch.optim.LBFGS, which needs global reductions (see shardoptim.lbfgs).
- "replicated": every rank runs the class over the full tensors with full state (correct, not
  sharded): for classes that couple tensors or draw random numbers (see `kind_from_verdict`), or
  when the user asks for it (`sharding="replicated"`).

"flat" is a claim about the class's code under every input, which no run on test data can prove
(a class may couple a tensor's elements only when its gradient is orthogonal to it, after a
warm-up, or above a threshold). So `sharding="auto"` gives it only to classes known elementwise:
torch.optim's own, those registered with `register_elementwise`, and the read third-party classes
of shardoptim.allowlist (within their version ranges). Any other class is probed on synthetic
tensors (shardoptim.probe), which decides only between "tensor" and "replicated"
(`kind_from_verdict`). Also resolves the fused/foreach implementation flag. Must not import
torch.distributed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from shardoptim.allowlist import allowlisted, known_coupled
from shardoptim.layout import muon_cost
from shardoptim.probe import ProbeVerdict, probe_update_kind

logger = logging.getLogger(__name__)

Sharding = Literal["auto", "flat", "tensor", "replicated"]
SHARDING_MODES: tuple[Sharding, ...] = ("auto", "flat", "tensor", "replicated")
Kind = Literal["flat", "tensor", "lbfgs", "replicated"]

#: Cost of updating one whole tensor, from its shape (used to balance whole-tensor ownership).
CostFn = Callable[[torch.Size], float]


def _numel_cost(shape: torch.Size) -> float:
    return float(shape.numel())


def _muon_shape_cost(shape: torch.Size) -> float:
    return muon_cost(tuple(shape))


#: torch.optim's own elementwise classes (their step keeps no per-call state beyond each parameter's).
TORCH_ELEMENTWISE: tuple[type[Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
)

_ELEMENTWISE: set[type[Optimizer]] = set(TORCH_ELEMENTWISE)

_PER_TENSOR: dict[type[Optimizer], CostFn] = {torch.optim.SparseAdam: _numel_cost}
for _name, _cost in (("Adafactor", _numel_cost), ("Muon", _muon_shape_cost)):
    _cls = getattr(torch.optim, _name, None)
    if _cls is not None:
        _PER_TENSOR[_cls] = _cost


def register_elementwise(optimizer_class: type[Optimizer]) -> type[Optimizer]:
    """Declare that `optimizer_class` updates every element independently of the others.

    Its state is then sharded flat (element-granular, perfectly balanced). Only do this when the
    update of an element reads nothing but that element's parameter, gradient and state (and
    scalar options): a per-tensor norm or a factored moment makes flat sharding silently wrong,
    also when it acts only sometimes (above a threshold, after a warm-up, for orthogonal
    gradients). `shardoptim.verify` checks a class on your model. Usable as a class decorator;
    returns the class.
    """
    _check_class(optimizer_class)
    _PER_TENSOR.pop(optimizer_class, None)
    _ELEMENTWISE.add(optimizer_class)
    return optimizer_class


def register_per_tensor(optimizer_class: type[Optimizer], *, cost: CostFn | None = None) -> type[Optimizer]:
    """Declare that `optimizer_class` needs whole tensors; `cost(shape)` weighs a tensor's update.

    The default cost is the tensor's element count. Returns the class.
    """
    _check_class(optimizer_class)
    _ELEMENTWISE.discard(optimizer_class)
    _PER_TENSOR[optimizer_class] = cost or _numel_cost
    return optimizer_class


def _check_class(optimizer_class: object) -> None:
    """Raise TypeError unless `optimizer_class` is a torch.optim.Optimizer subclass.

    The message names what was passed without its repr: an optimizer instance's repr lists every
    option of every group.
    """
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer):
        return
    if isinstance(optimizer_class, Optimizer):
        name = type(optimizer_class).__name__
        module = type(optimizer_class).__module__
        qualified = f"torch.optim.{name}" if module.startswith("torch.optim") else name
        raise TypeError(
            f"optimizer_class must be a torch.optim.Optimizer subclass (the class, not an instance), got an "
            f"instance of {name}; pass the class itself: ShardedOptimizer(params, {qualified}, lr=...)"
        )
    if isinstance(optimizer_class, type):
        got = f"the class {optimizer_class.__qualname__}"
    elif isinstance(optimizer_class, str) and len(optimizer_class) <= 40:
        got = f"the string {optimizer_class!r}"
    else:
        got = f"an object of type {type(optimizer_class).__name__}"
    raise TypeError(
        f"optimizer_class must be a torch.optim.Optimizer subclass, got {got}; pass an optimizer class, "
        "e.g. ShardedOptimizer(params, torch.optim.AdamW, lr=...)"
    )


def resolve_kind(optimizer_class: type[Optimizer], sharding: str) -> Kind:
    """Return how to shard `optimizer_class` given the user's `sharding` choice.

    "replicated" is honoured for every class (LBFGS included); "auto" gives "flat" only to classes
    known elementwise (`is_known_elementwise`) and "tensor" to the rest, which the caller probes
    when `is_registered` is False.

    Raises:
        ValueError: unknown `sharding`, or "flat" forced on a class known to need whole tensors.
    """
    _check_class(optimizer_class)
    if sharding not in SHARDING_MODES:
        raise ValueError(
            f"sharding must be one of {SHARDING_MODES}, got {sharding!r}; 'replicated' runs the class "
            "unsharded on every rank (for updates that couple tensors)"
        )
    if sharding == "replicated":
        return "replicated"
    if optimizer_class is torch.optim.LBFGS:
        return "lbfgs"
    if sharding == "flat":
        if optimizer_class in _PER_TENSOR:
            raise ValueError(
                f"sharding='flat' would silently compute wrong updates for {optimizer_class.__name__}, whose "
                "update reads whole tensors; use sharding='tensor' or 'auto'"
            )
        return "flat"
    if sharding in ("tensor", "replicated"):
        return "tensor" if sharding == "tensor" else "replicated"
    if is_known_elementwise(optimizer_class):
        return "flat"
    if optimizer_class not in _PER_TENSOR and known_coupled(optimizer_class) is not None:
        return "replicated"
    return "tensor"  # NOTE: for a class of unknown kind ShardedOptimizer probes it instead


def tensor_cost(optimizer_class: type[Optimizer]) -> CostFn:
    """Return the per-tensor cost function used to balance whole-tensor ownership."""
    return _PER_TENSOR.get(optimizer_class, _numel_cost)


def _accepts(optimizer_class: type[Optimizer], name: str) -> bool:
    try:
        return name in inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):
        return False


# NOTE: torch documents fused Adagrad as CPU-only; the other fused classes follow torch's list.
_FUSED_DEVICE_TYPES: dict[type[Optimizer], frozenset[str]] = {torch.optim.Adagrad: frozenset({"cpu"})}


def _fused_supported(optimizer_class: type[Optimizer], params: Iterable[torch.Tensor]) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if optimizer_class is torch.optim.Adagrad:
        # NOTE: torch 2.13's CPU fused Adagrad differs from its for-loop and foreach versions (which
        # agree bitwise) by 1.15e-5 relative after 12 steps with a 1e3 gradient spike (lr=0.01,
        # benchmarks/catalog_sweep.py, issue 21): the user's plain Adagrad would compute something
        # else, so the wrapper does not pick fused for it (an explicit fused=True is kept).
        return False
    params = list(params)
    devices = _FUSED_DEVICE_TYPES.get(optimizer_class, frozenset(_get_fused_kernels_supported_devices()))
    if optimizer_class is torch.optim.SGD and any(
        p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) for p in params
    ):
        # NOTE: torch 2.12-2.13's CPU fused SGD updates only the last numel % 16 elements of
        # bf16/fp16 tensors (pytorch/pytorch#191763): silently wrong, so foreach is used there.
        return False
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def resolve_impl_flags(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    groups: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """Return `defaults` plus fused=True or foreach=True when the user chose neither (torch.optim only).

    fused is picked when the class takes it and every parameter has a floating dtype on a device
    with fused kernels (on CPU fused AdamW is about 5x faster than foreach); else foreach when the
    class takes it. An explicit user choice (in the defaults or in any group) is kept as given,
    None included: `fused=None` leaves the choice to the class, as a plain `AdamW(params)` does.
    """
    out = dict(defaults)
    groups = list(groups)
    flags = ("fused", "foreach")
    chosen = any(k in out for k in flags) or any(k in g for g in groups for k in flags)
    if chosen or out.get("differentiable"):
        return out
    if not optimizer_class.__module__.startswith("torch.optim"):
        return out  # NOTE: a third-party class's own default may compute something else (AdaMuon)
    params = [p for g in groups for p in g["params"]]
    if _accepts(optimizer_class, "fused") and _fused_supported(optimizer_class, params):
        out["fused"] = True
    elif _accepts(optimizer_class, "foreach"):
        out["foreach"] = True
    return out


def kind_from_verdict(verdict: ProbeVerdict) -> Kind:
    """Return the layout for a class of unknown kind from what `probe_update_kind` found out.

    "replicated" (every rank runs the class over the full tensors) whenever sharding could change
    the result: the update couples tensors ("global"), draws global random numbers (each rank
    would draw for its own part only, and the user's generator would drift apart across ranks),
    reads `requires_grad` (the local pieces do not require grad), moves the parameters before it
    calls the closure (the closure would see the user's unmoved parameters, not the pieces), or the
    probe could not run the class ("unknown": nothing shows that its tensors are independent).
    Otherwise "tensor", also for an "elementwise" verdict: a probe can show a coupling, never its
    absence, and whole tensors keep every per-tensor coupling exact whatever triggers it. Flat
    sharding comes only from the registries (`register_elementwise`, torch's own classes,
    shardoptim.allowlist), which take precedence.
    """
    if verdict.update in ("global", "unknown") or verdict.uses_rng or verdict.reads_requires_grad:
        return "replicated"
    if verdict.moves_params_before_closure:
        return "replicated"
    return "tensor"


def most_restrictive(kinds: Iterable[Kind]) -> Kind:
    """Return "replicated" over "tensor" over "flat" among `kinds` ("tensor" when empty; no "lbfgs")."""
    order: tuple[Kind, ...] = ("flat", "tensor", "replicated")
    return max(kinds, key=order.index, default="tensor")


def is_known_elementwise(optimizer_class: type[Optimizer]) -> bool:
    """Return whether `optimizer_class` is known elementwise under every condition.

    True for torch.optim's elementwise classes, classes given to `register_elementwise`, and the
    classes of shardoptim.allowlist when their package's installed version is in the entry's range.
    """
    if optimizer_class in _PER_TENSOR:
        return False  # NOTE: a user's register_per_tensor overrides the allowlist
    return optimizer_class in _ELEMENTWISE or allowlisted(optimizer_class) is not None


def is_registered(optimizer_class: type[Optimizer]) -> bool:
    """Return whether the kind of `optimizer_class` is known without probing it."""
    return (
        is_known_elementwise(optimizer_class)
        or optimizer_class in _PER_TENSOR
        or optimizer_class is torch.optim.LBFGS
        or known_coupled(optimizer_class) is not None
    )


#: Keys of a param group that are not options (the structure torch.optim adds).
_STRUCTURE_KEYS = ("params", "param_names")


@dataclass(frozen=True, kw_only=True, slots=True)
class KindChoice:
    """The layout `choose_kind` picked, with the probe verdicts it rests on."""

    kind: Kind
    """The layout: "flat", "tensor", "lbfgs" or "replicated"."""
    verdicts: tuple[ProbeVerdict, ...]
    """One per distinct set of group options probed, in group order; empty when nothing was probed
    (a class of known kind, or a sharding the user chose)."""
    deciding: ProbeVerdict | None
    """The verdict that decided the layout (the most restrictive one), else None."""
    reason: str
    """Why this layout, in one line (for logs and `replication_reason`)."""


def group_options(group: Mapping[str, Any]) -> dict[str, Any]:
    """Return a param group's own options: every key but the structure (params, param_names)."""
    return {k: v for k, v in group.items() if k not in _STRUCTURE_KEYS}


def distinct_group_options(groups: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return each distinct set of group options once, in first-seen order (compared by repr)."""
    seen: dict[str, dict[str, Any]] = {}
    for group in groups:
        options = group_options(group)
        try:
            key = repr(sorted(options.items()))
        except Exception:  # unorderable or failing repr: keep it apart
            key = f"#{len(seen)}"
        seen.setdefault(key, options)
    return list(seen.values())


def probe_groups(
    optimizer_class: type[Optimizer], defaults: Mapping[str, Any], groups: Sequence[Mapping[str, Any]]
) -> tuple[ProbeVerdict, ...]:
    """Probe `optimizer_class` once per distinct set of group options (each with `defaults`).

    A group's options are set on the probe's group as the user sets them (pytorch_optimizer's Muon
    takes use_muon per group), so a flag or hyperparameter given only in one group is exercised.
    Identical option sets are probed once (and shardoptim.probe caches across calls).
    """
    return tuple(
        probe_update_kind(optimizer_class, defaults, group_options=options or None)
        for options in distinct_group_options(groups)
    )


def choose_kind(
    optimizer_class: type[Optimizer],
    sharding: str,
    defaults: Mapping[str, Any],
    groups: Sequence[Mapping[str, Any]],
) -> KindChoice:
    """Return the layout for `optimizer_class` given the user's `sharding`, probing unknown classes.

    A class of known kind (`is_registered`) or a sharding other than "auto" is decided without
    running the class; any other class is probed at each distinct set of its group options and
    gets the most restrictive layout over them ("tensor" or "replicated", never "flat").

    Raises:
        ValueError: as `resolve_kind`.
    """
    kind = resolve_kind(optimizer_class, sharding)
    if sharding != "auto":
        return KindChoice(kind=kind, verdicts=(), deciding=None, reason=f"sharding={sharding!r} was asked for")
    if is_registered(optimizer_class):
        coupled = known_coupled(optimizer_class)
        reason = f"known to couple tensors (shardoptim.allowlist): {coupled.why}" if coupled else "known class"
        return KindChoice(kind=kind, verdicts=(), deciding=None, reason=reason)
    verdicts = probe_groups(optimizer_class, defaults, groups)
    order: tuple[Kind, ...] = ("tensor", "replicated")
    deciding = max(verdicts, key=lambda v: order.index(kind_from_verdict(v)))
    return KindChoice(kind=kind_from_verdict(deciding), verdicts=verdicts, deciding=deciding, reason=deciding.reason)


def check_new_group(
    optimizer_class: type[Optimizer], defaults: Mapping[str, Any], group: Mapping[str, Any], kind: Kind
) -> None:
    """Probe an added param group's options; raise when they need a more restrictive layout than `kind`.

    For a class that was probed at construction (the layout cannot change once the state is laid
    out). A no-op for option sets probed before (cached).

    Raises:
        ValueError: the new group's options make the class couple tensors (or otherwise need
            "replicated") while the optimizer shards it as `kind`.
    """
    (verdict,) = probe_groups(optimizer_class, defaults, [group])
    needed = kind_from_verdict(verdict)
    if most_restrictive([needed, kind]) != kind:
        raise ValueError(
            f"add_param_group: with this group's options ({sorted(group_options(group))}) "
            f"{optimizer_class.__name__} needs sharding {needed!r} but the optimizer was built with {kind!r} "
            f"({verdict.reason}); build the optimizer with every group at once, or pass sharding={needed!r}"
        )
