"""What kind of update each optimizer class makes, and so how its state may be sharded.

- "flat": the update is element by element, so any slice of a parameter can be updated alone.
- "tensor": the update looks at whole tensors (factored moments, orthogonalisation, trust ratios,
  sparse rows), so each parameter must be owned whole by one rank.
- "lbfgs": torch.optim.LBFGS, which needs global reductions (see shardoptim.lbfgs).

Unknown classes are "tensor": always correct, still sharded. Users declare their own classes with
`register_elementwise` or `register_per_tensor`. Also resolves the fused/foreach implementation
flag. Must not import torch.distributed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch.optim import Optimizer

from shardoptim.layout import muon_cost

logger = logging.getLogger(__name__)

Sharding = Literal["auto", "flat", "tensor"]
SHARDING_MODES: tuple[Sharding, ...] = ("auto", "flat", "tensor")
Kind = Literal["flat", "tensor", "lbfgs"]

#: Cost of updating one whole tensor, from its shape (used to balance whole-tensor ownership).
CostFn = Callable[[torch.Size], float]


def _numel_cost(shape: torch.Size) -> float:
    return float(shape.numel())


def _muon_shape_cost(shape: torch.Size) -> float:
    return muon_cost(tuple(shape))


_ELEMENTWISE: set[type[Optimizer]] = {
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
}

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
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
        raise TypeError(
            f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}; pass the "
            "class itself (e.g. torch.optim.AdamW), not an instance"
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
    if optimizer_class not in _PER_TENSOR:
        logger.info(
            "shardoptim does not know whether %s is elementwise; sharding it whole-tensor (always correct). "
            "Call shardoptim.register_elementwise(%s) to shard it element by element",
            optimizer_class.__name__,
            optimizer_class.__name__,
        )
    return "tensor"


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

    devices = _FUSED_DEVICE_TYPES.get(optimizer_class, frozenset(_get_fused_kernels_supported_devices()))
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def resolve_impl_flags(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any],
    groups: Iterable[Mapping[str, Any]],
) -> dict[str, Any]:
    """Return `defaults` plus fused=True or foreach=True when the user chose neither.

    fused is picked when the class takes it and every parameter has a floating dtype on a device
    with fused kernels (on CPU fused AdamW is about 5x faster than foreach); else foreach when the
    class takes it. An explicit user choice (in the defaults or in any group) is kept as given.
    """
    out = dict(defaults)
    groups = list(groups)
    chosen = any(out.get(k) is not None for k in ("fused", "foreach"))
    chosen = chosen or any(g.get(k) is not None for g in groups for k in ("fused", "foreach"))
    if chosen or out.get("differentiable"):
        return out
    params = [p for g in groups for p in g["params"]]
    if _accepts(optimizer_class, "fused") and _fused_supported(optimizer_class, params):
        out["fused"] = True
    elif _accepts(optimizer_class, "foreach"):
        out["foreach"] = True
    return out
