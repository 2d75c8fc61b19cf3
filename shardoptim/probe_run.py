"""Drive one probe run: build the probed class over a case's tensors, step it, record what it did.

`run_case` runs an optimizer class through the gradient schedule of shardoptim.probe_case (whole,
split into 1-D pieces, with the first tensor's gradient scaled or the tensor left out, frozen, with
a closure) and returns a `Run` (shardoptim.probe_compare) holding its trajectory, scalar state, the
param_group keys step() wrote and whether it moved a global random generator.
`isolated_global_state` restores the global generators, grad mode and warnings around a probe.
shardoptim.probe compares the runs and gives the verdict. Pure torch: must not import
torch.distributed or shardoptim.optimizer, and never touches CUDA.
"""

from __future__ import annotations

import contextlib
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.optim import Optimizer

from shardoptim.probe_case import Case, join, piece_counts, split
from shardoptim.probe_compare import Run, written_keys

__all__ = ["OptimizerBuilder", "has_modes", "isolated_global_state", "run_case"]

#: The perturbed run multiplies the first tensor's gradients by this.
_PERTURB = 4.0
_SEED = 1234  # NOTE: the seed the class sees (global generators), not the case's


@dataclass(frozen=True, slots=True)
class OptimizerBuilder:
    """Builds the probed optimizer over a list of tensors, as the caller would."""

    optimizer_class: type[Optimizer]
    options: Mapping[str, Any]
    group: Mapping[str, Any]

    def __call__(self, params: list[torch.Tensor]) -> Optimizer:
        plist: list[Any] = [{**self.group, "params": params}] if self.group else params
        return self.optimizer_class(plist, **self.options)


@contextlib.contextmanager
def isolated_global_state() -> Iterator[None]:
    """Restore torch's CPU generator, Python's and numpy's global generators, grad mode, warnings."""
    py_state = random.getstate()
    np_random = _numpy_random()
    np_state = np_random.get_state() if np_random is not None else None
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        random.setstate(py_state)
        if np_random is not None:
            np_random.set_state(np_state)


def _numpy_random() -> Any:
    """Return numpy.random when numpy is already imported (the probe never imports it)."""
    numpy = sys.modules.get("numpy")
    return getattr(numpy, "random", None) if numpy is not None else None


def _seed_all(seed: int) -> None:
    # NOTE: not torch.manual_seed, which also queues a seed for CUDA (and other accelerators) that
    # would run when they initialise later, changing the user's accelerator generators.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np_random = _numpy_random()
    if np_random is not None:
        np_random.seed(seed)


def _global_rng_state() -> tuple[torch.Tensor, Any, Any]:
    np_random = _numpy_random()
    np_state = np_random.get_state()[1].copy() if np_random is not None else None
    return torch.get_rng_state(), random.getstate(), np_state


def _rng_moved(before: tuple[torch.Tensor, Any, Any], after: tuple[torch.Tensor, Any, Any]) -> bool:
    numpy_moved = before[2] is not None and after[2] is not None and bool((before[2] != after[2]).any())
    return not torch.equal(before[0], after[0]) or before[1] != after[1] or numpy_moved


def _snapshot(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"}
        for g in groups
    ]


def has_modes(optimizer_class: type[Optimizer]) -> bool:
    """Whether the class has train()/eval() (schedule-free classes), which torch.optim's lack."""
    return all(callable(getattr(optimizer_class, name, None)) for name in ("train", "eval"))


def _summarise(name: str, value: Any, shape: torch.Size, scalars: dict[str, float], odd: list[str]) -> None:
    """Sort one state entry into a scalar (any 1-element value) or an odd entry (another shape, an object)."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            scalars[name] = float(value.detach().reshape(()).real.double())
        elif value.numel() and value.shape != shape:
            odd.append(
                f"state {name!r} of shape {tuple(value.shape)} for a parameter of shape {tuple(shape)}"
            )
    elif isinstance(value, (bool, int, float)):
        scalars[name] = float(value)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _summarise(f"{name}[{i}]", item, shape, scalars, odd)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _summarise(f"{name}.{key}", item, shape, scalars, odd)
    elif value is not None and not isinstance(value, (str, torch.dtype, torch.device)):
        odd.append(f"state {name!r} holding a {type(value).__name__}")


def _record_state(
    run: Run, optimizer: Optimizer, params: Sequence[torch.Tensor], counts: Sequence[int]
) -> None:
    """Fill run.scalars (grouped by whole tensor, `counts` pieces each) and run.odd_state."""
    at = 0
    for count in counts:
        pieces = []
        for p in params[at : at + count]:
            scalars: dict[str, float] = {}
            for key, value in optimizer.state.get(p, {}).items():
                _summarise(str(key), value, p.shape, scalars, run.odd_state)
            pieces.append(scalars)
        run.scalars.append(pieces)
        at += count


def _closure(run: Run, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> Callable[[], float]:
    """Return a closure that sets the step's gradients and returns 1 + sum(p * g) (whose gradient is g).

    It notes in `run.moved_before_closure` whether step() changed the parameters before calling it.
    """
    before = [p.detach().clone() for p in params]

    def closure() -> torch.Tensor:
        if not run.moved_before_closure:
            run.moved_before_closure = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with torch.no_grad():
            return sum(((p * g).sum() for p, g in zip(params, grads)), torch.ones(()))

    # NOTE: a 0-dim tensor, as a training loop's closure returns, though torch types it as float.
    return cast(Callable[[], float], closure)


def run_case(
    build: OptimizerBuilder,
    case: Case,
    *,
    split_: bool = False,
    perturb: bool = False,
    requires_grad: bool = True,
    closure: bool = False,
    drop_first: bool = False,
    watch_rng: bool = False,
) -> Run:
    """Run the class over the case's tensors; may raise.

    split_: every tensor as 1-D pieces; perturb: the first tensor's gradient scaled; drop_first:
    without the first tensor (its trajectory and state then repeat the initial values, unused).
    """
    _seed_all(_SEED)
    rng_start = _global_rng_state() if watch_rng else None
    shapes = [t.shape for t in case.inits]
    inits = split(case.inits) if split_ else [t.clone() for t in case.inits]
    params = [t.requires_grad_(requires_grad) for t in inits]
    optimizer = build(params[1:] if drop_first else params)
    modes = has_modes(build.optimizer_class)
    if modes:
        optimizer.train()  # type: ignore[attr-defined]
    run = Run()
    for step in range(case.num_steps):
        wholes = join(params, shapes) if split_ else [p.detach() for p in params]
        grads = [
            case.grad(step, i, w) * (_PERTURB if perturb and i == 0 else 1.0) for i, w in enumerate(wholes)
        ]
        grads = split(grads) if split_ else grads
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = _snapshot(optimizer.param_groups)
        if closure:
            optimizer.step(_closure(run, params, grads))
        else:
            optimizer.step()
        run.written_keys |= written_keys(before, optimizer.param_groups)
        run.trajectory.append(join(params, shapes) if split_ else [p.detach().clone() for p in params])
    run.groups_after = _snapshot(optimizer.param_groups)
    counts = piece_counts(shapes) if split_ else [1] * len(shapes)
    _record_state(run, optimizer, params, counts)
    if modes:
        optimizer.eval()  # type: ignore[attr-defined]
        run.trajectory.append(join(params, shapes) if split_ else [p.detach().clone() for p in params])
    if rng_start is not None:
        run.rng_moved = _rng_moved(rng_start, _global_rng_state())
    return run
