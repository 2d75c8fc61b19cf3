"""What kind of update each optimizer class makes, and so how its state may be sharded.

- "flat": the update is element by element, so any slice of a parameter can be updated alone.
- "tensor": the update looks at whole tensors (factored moments, orthogonalisation, trust ratios,
  sparse rows), so each parameter must be owned whole by one rank.
- "lbfgs": torch.optim.LBFGS, which needs global reductions (see shardoptim.lbfgs).
- "replicated": every rank runs the class over the full tensors with full state (correct, not
  sharded): for classes that couple tensors or draw random numbers (see `kind_from_verdict`).

Classes in no registry are probed on small synthetic tensors (shardoptim.probe) and
`kind_from_verdict` turns the verdict into a layout. Users declare their own classes with
`register_elementwise` or `register_per_tensor`, which take precedence over the probe. Also
resolves the fused/foreach implementation flag. Must not import torch.distributed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from shardoptim.layout import muon_cost
from shardoptim.probe import ProbeVerdict

logger = logging.getLogger(__name__)

Sharding = Literal["auto", "flat", "tensor"]
SHARDING_MODES: tuple[Sharding, ...] = ("auto", "flat", "tensor")
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
    scalar options): a per-tensor norm or a factored moment makes flat sharding silently wrong.
    Usable as a class decorator; returns the class.
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

    Raises:
        ValueError: unknown `sharding`, or "flat" forced on a class known to need whole tensors.
    """
    _check_class(optimizer_class)
    if sharding not in SHARDING_MODES:
        raise ValueError(f"sharding must be one of {SHARDING_MODES}, got {sharding!r}")
    if optimizer_class is torch.optim.LBFGS:
        return "lbfgs"
    if sharding == "flat":
        if optimizer_class in _PER_TENSOR:
            raise ValueError(
                f"sharding='flat' would silently compute wrong updates for {optimizer_class.__name__}, whose "
                "update reads whole tensors; use sharding='tensor' or 'auto'"
            )
        return "flat"
    if sharding == "tensor":
        return "tensor"
    if optimizer_class in _ELEMENTWISE:
        return "flat"
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
    """Return the layout for a class from what `shardoptim.probe.probe_update_kind` found out.

    "flat" for an elementwise update, "tensor" for a per-tensor one, and "replicated" (every rank
    runs the class over the full tensors) whenever sharding could change the result: the update
    couples tensors ("global"), draws global random numbers (each rank would draw for its own part
    only, and the user's generator would drift apart across ranks), reads `requires_grad` (the
    local pieces do not require grad), moves the parameters before it calls the closure (the
    closure would see the user's unmoved parameters, not the pieces), or the probe could not run
    the class ("unknown": nothing shows that its tensors are independent). The registries
    (`register_elementwise`, `register_per_tensor`, torch's own classes) take precedence.
    """
    if verdict.update in ("global", "unknown") or verdict.uses_rng or verdict.reads_requires_grad:
        return "replicated"
    if verdict.moves_params_before_closure:
        return "replicated"
    if verdict.update == "elementwise":
        return "flat"
    return "tensor"


def kind_from_verdicts(verdicts: Iterable[ProbeVerdict]) -> Kind:
    """Return the most restrictive layout over several verdicts (e.g. one per distinct param group).

    "replicated" over "tensor" over "flat"; "flat" when `verdicts` is empty.
    """
    order: tuple[Kind, ...] = ("flat", "tensor", "replicated")
    return max((kind_from_verdict(v) for v in verdicts), key=order.index, default="flat")


def is_registered(optimizer_class: type[Optimizer]) -> bool:
    """Return whether the kind of `optimizer_class` is known without probing it."""
    return (
        optimizer_class in _ELEMENTWISE
        or optimizer_class in _PER_TENSOR
        or optimizer_class is torch.optim.LBFGS
    )
