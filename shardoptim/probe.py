"""Find out what kind of update an optimizer class makes by running it on small synthetic tensors.

`probe_update_kind(cls, defaults)` runs the class 3 steps (about 10-50 ms on CPU for most classes)
on three small float32 tensors (a 20x17 weight, a 7-element bias, a 6x5 weight) with fixed, varied
gradients: a moderate step, one 10x larger (above typical clip thresholds) and a sudden drop
(below thresholds and running norms). Then it compares runs:

- perturbed / subset: the first tensor's gradient scaled, or the first tensor left out. If another
  tensor's trajectory, scalar state, or a param_group value written by step() moves, the class
  couples tensors ("global": a global norm, a mean over all parameters, an adaptive step size).
- split: every tensor flattened and cut into 2-3 unequal contiguous 1-D pieces, each its own
  parameter, with the same gradient values. The same trajectory (bitwise, or within a few units
  in the last place), state tensors only of the parameter's shape, and every piece's scalar state
  equal to the whole tensor's mean that the update is element by element ("elementwise"): flat
  sharding is exact. Otherwise it is "per_tensor": each tensor's update reads that whole tensor.
- requires_grad=False: a different trajectory (or an error) means the class reads `requires_grad`.

It also records whether a global generator (torch's CPU one, Python's `random`, numpy's) moved
between construction and the end of the run, the param_group keys step() adds or changes,
whether step() needs a closure, and whether the class takes only 2-D tensors (then everything is
probed with matrices). Classes with train()/eval() (schedule-free) are put in train mode first and
compared after eval() too. Behaviour that starts only after many steps or on larger tensors
(beyond 20 elements per dimension) is seen only through the state it keeps (e.g. a preconditioner
object), so explicit registrations stay the final word. The probe leaves every global generator as
it found it and never touches CUDA. Pure torch: must not import torch.distributed or
shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch.optim import Optimizer

__all__ = ["ProbeVerdict", "UpdateKind", "probe_update_kind"]

#: What the update of one parameter reads: its own elements only, its whole tensor, or other tensors
#: too. "unknown" when the probe could not run the class.
UpdateKind = Literal["elementwise", "per_tensor", "global", "unknown"]

#: Shapes probed by default: a weight, a bias (not divisible by 2 or 3) and another weight.
#: NOTE: both sides of the first weight are >= 16, where size-triggered behaviour such as timm's
#: AdafactorBigVision factoring its second moment (min_dim_size_to_factor=16) starts.
_SHAPES: tuple[tuple[int, ...], ...] = ((20, 17), (7,), (6, 5))
#: Shapes for classes that take only matrices (e.g. Muon).
_MATRIX_SHAPES: tuple[tuple[int, ...], ...] = ((20, 17), (6, 5), (5, 7))
#: Gradient scale per step: moderate, 10x larger (above typical clip thresholds of norm or RMS 1),
#: then a sudden drop (below the thresholds and below running norms, as AdaNorm compares).
_GRAD_SCALES: tuple[float, ...] = (1.0, 10.0, 0.05)
#: The perturbed run multiplies the first tensor's gradients by this.
_PERTURB = 4.0
#: Two trajectories are "the same" when every element differs by at most this fraction of the
#: largest update of its tensor in that step, or by at most _ULPS units in the last place of the
#: parameter (elementwise classes are bitwise equal when split, up to vectorised-tail rounding of
#: transcendental functions; a norm over a different set of elements moves the update by percents).
_RTOL_UPDATE = 1e-5
_ULPS = 2.0
_EPS32 = float(torch.finfo(torch.float32).eps)
#: Scalar state and param_group values written by step() are "the same" up to this relative error.
_RTOL_STATE = 1e-6
_SEED = 1234


@dataclass(frozen=True, kw_only=True, slots=True)
class ProbeVerdict:
    """What `probe_update_kind` found out about an optimizer class, for the layout choice and logs."""

    optimizer_class: str
    """Qualified name of the probed class (module.Class)."""
    update: UpdateKind
    """"elementwise" (any slice of a tensor can be updated alone), "per_tensor" (needs whole
    tensors, tensors independent), "global" (a tensor's update reads other tensors), or "unknown"
    (the class could not be run on the probe tensors; see `error`)."""
    uses_rng: bool
    """The class consumes global random numbers (torch's CPU generator, Python's or numpy's): a
    generator's state moved between construction and the end of the run."""
    writes_group_keys: tuple[str, ...]
    """param_group keys that step() adds or whose values it changes (e.g. D-Adaptation's "d"),
    sorted; empty when none."""
    needs_closure: bool
    """step() without a closure raised an error that mentions the closure; probed with one."""
    moves_params_before_closure: bool
    """step() changes the parameters before it calls the closure (schedule-free's closure variants
    evaluate at an extrapolated point, SAM at a perturbed one): the closure must see the full,
    moved parameters, which a rank's pieces are not."""
    reads_requires_grad: bool
    """The result changes (or step() fails) when the parameters have requires_grad=False: the class
    filters on it, or needs an autograd graph."""
    matrix_only: bool
    """The class rejected the default shapes (a 1-D bias) and was probed with 2-D tensors only."""
    train_eval: bool
    """The class has train()/eval() (schedule-free): probed after train(), and compared after eval()."""
    split_diff: float
    """Largest difference between the split and the whole run, as a fraction of the update (0 when
    bitwise equal; inf when the split run failed or was not needed (global), or per-tensor state
    or statistics were found)."""
    cross_diff: float
    """Largest change of another tensor's trajectory when the first tensor's gradient is scaled or
    the first tensor left out, as a fraction of the update (inf when such a run failed, or another
    tensor's state or a param_group value written by step() moved)."""
    error: str | None
    """Why the class could not be probed ("TypeName: message"), else None."""
    reason: str
    """One line for logs: the verdict and the evidence."""
    elapsed_s: float
    """Wall time of the probe, in seconds."""


@dataclass(frozen=True, slots=True)
class _Case:
    """Fixed synthetic inputs: initial tensors and per-step gradients (whole shapes)."""

    inits: list[torch.Tensor]
    grads: list[list[torch.Tensor]]  # [step][tensor]


@dataclass(slots=True)
class _Run:
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


def probe_update_kind(
    optimizer_class: type[Optimizer],
    defaults: Mapping[str, Any] | None = None,
    *,
    group_options: Mapping[str, Any] | None = None,
) -> ProbeVerdict:
    """Run `optimizer_class(params, **defaults)` on small synthetic tensors; say what its update reads.

    Deterministic and side-effect free: the global random generators (torch CPU, Python `random`,
    numpy's when loaded) are restored afterwards, warnings raised by the class are swallowed, and
    nothing runs on CUDA. Failures of the class are reported in the verdict (`update="unknown"`,
    `error`), never raised. Results are cached per (class, defaults, group_options), by repr.

    Args:
        optimizer_class: an Optimizer subclass taking (params, **defaults).
        defaults: the options the caller will construct it with (lr, betas, ...). Flags that pick
            an implementation (fused, foreach) are passed through as given.
        group_options: options of one param group (without "params"), set on the probe's group
            instead of the constructor: for classes whose groups carry flags of their own
            (pytorch_optimizer's Muon: use_muon). Probe each distinct group once and combine.

    Returns:
        A ProbeVerdict; see its fields.
    """
    options = dict(defaults or {})
    group = dict(group_options or {})
    group.pop("params", None)
    key = _cache_key(optimizer_class, options, group)
    if key is not None and key in _CACHE:
        return _CACHE[key]
    start = time.perf_counter()
    with _isolated_global_state():
        verdict = _probe(optimizer_class, _Build(optimizer_class, options, group))
    elapsed = time.perf_counter() - start
    result = ProbeVerdict(**{**verdict, "elapsed_s": elapsed})
    if key is not None:
        _CACHE[key] = result
    return result


_CACHE: dict[tuple[type[Optimizer], str], ProbeVerdict] = {}


@dataclass(frozen=True, slots=True)
class _Build:
    """Builds the probed optimizer over a list of tensors, as the caller would."""

    optimizer_class: type[Optimizer]
    options: Mapping[str, Any]
    group: Mapping[str, Any]

    def __call__(self, params: list[torch.Tensor]) -> Optimizer:
        plist: list[Any] = [{**self.group, "params": params}] if self.group else params
        return self.optimizer_class(plist, **self.options)


def _cache_key(
    optimizer_class: type[Optimizer], options: Mapping[str, Any], group: Mapping[str, Any]
) -> tuple[type[Optimizer], str] | None:
    try:
        return optimizer_class, repr((sorted(options.items()), sorted(group.items())))
    except Exception:  # an option with a failing repr or unorderable keys: do not cache
        return None


@contextlib.contextmanager
def _isolated_global_state() -> Iterator[None]:
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


def _make_case(shapes: Sequence[tuple[int, ...]]) -> _Case:
    """Varied, non-iid values: a ramp along each tensor makes its pieces' norms differ from the whole's."""
    gen = torch.Generator().manual_seed(_SEED)
    inits: list[torch.Tensor] = []
    ramps: list[torch.Tensor] = []
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        ramp = torch.linspace(0.25, 2.0, numel).reshape(shape) * (1.0 + 0.5 * i)
        inits.append(torch.randn(shape, generator=gen) * ramp + 0.1)
        ramps.append(ramp.flip(-1) if len(shape) > 0 else ramp)
    grads = [
        [torch.randn(ramp.shape, generator=gen) * ramp * scale for ramp in ramps] for scale in _GRAD_SCALES
    ]
    return _Case(inits=inits, grads=grads)


def _split_points(numel: int) -> list[int]:
    """Cut points into 2-3 unequal contiguous pieces (like flat shards crossing a tensor)."""
    cuts = sorted({max(1, numel * 2 // 7), max(1, numel * 3 // 5)} - {numel})
    return [c for c in cuts if 0 < c < numel]


def _split(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pieces: list[torch.Tensor] = []
    for t in tensors:
        flat = t.reshape(-1)
        bounds = [0, *_split_points(flat.numel()), flat.numel()]
        pieces.extend(flat[a:b].clone() for a, b in zip(bounds, bounds[1:]))
    return pieces


def _join(pieces: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    at = 0
    for shape in shapes:
        count = len(_split_points(math.prod(shape))) + 1
        out.append(torch.cat([p.detach().reshape(-1) for p in pieces[at : at + count]]).reshape(shape))
        at += count
    return out


def _snapshot(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in g.items() if k != "params"}
        for g in groups
    ]


def _close_value(a: Any, b: Any, rtol: float = 0.0) -> bool:
    """Equal up to a relative `rtol` (group values: numbers, tensors, tuples of them); nan equals nan."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=0.0, equal_nan=True))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close_value(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return _close(float(a), float(b), rtol)
    try:
        return bool(a == b)
    except Exception:  # e.g. an object whose == raises
        return a is b


def _written_keys(before: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]]) -> set[str]:
    keys: set[str] = set()
    for old, new in zip(before, groups):
        for key, value in new.items():
            if key != "params" and (key not in old or not _close_value(old[key], value)):
                keys.add(key)
    return keys


def _has_modes(optimizer_class: type[Optimizer]) -> bool:
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
    run: _Run, optimizer: Optimizer, params: Sequence[torch.Tensor], counts: Sequence[int]
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


def _closure(run: _Run, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> Callable[[], float]:
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


def _run(
    build: _Build,
    case: _Case,
    *,
    split: bool = False,
    perturb: bool = False,
    requires_grad: bool = True,
    closure: bool = False,
    drop_first: bool = False,
    watch_rng: bool = False,
) -> _Run:
    """Run the class over the case's tensors; may raise.

    split: every tensor as 1-D pieces; perturb: the first tensor's gradient scaled; drop_first:
    without the first tensor (its trajectory and state then repeat the initial values, unused).
    """
    _seed_all(_SEED)
    rng_start = _global_rng_state() if watch_rng else None
    shapes = [t.shape for t in case.inits]
    inits = _split(case.inits) if split else [t.clone() for t in case.inits]
    params = [t.requires_grad_(requires_grad) for t in inits]
    optimizer = build(params[1:] if drop_first else params)
    modes = _has_modes(build.optimizer_class)
    if modes:
        optimizer.train()  # type: ignore[attr-defined]
    run = _Run()
    for step_grads in case.grads:
        grads = [g * _PERTURB if perturb and i == 0 else g for i, g in enumerate(step_grads)]
        grads = _split(grads) if split else [g.clone() for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = _snapshot(optimizer.param_groups)
        if closure:
            optimizer.step(_closure(run, params, grads))
        else:
            optimizer.step()
        run.written_keys |= _written_keys(before, optimizer.param_groups)
        run.trajectory.append(_join(params, shapes) if split else [p.detach().clone() for p in params])
    run.groups_after = _snapshot(optimizer.param_groups)
    counts = [len(_split_points(math.prod(shape))) + 1 if split else 1 for shape in shapes]
    _record_state(run, optimizer, params, counts)
    if modes:
        optimizer.eval()  # type: ignore[attr-defined]
        run.trajectory.append(_join(params, shapes) if split else [p.detach().clone() for p in params])
    if rng_start is not None:
        run.rng_moved = _rng_moved(rng_start, _global_rng_state())
    return run


def _diff(ref: _Run, other: _Run, case: _Case, indices: Sequence[int]) -> float:
    """Largest difference of `other` from `ref` on tensors `indices`, as a fraction of the update.

    0 when equal within _ULPS units in the last place; inf where only one side is nan.
    """
    worst = 0.0
    for step, (ref_now, other_now) in enumerate(zip(ref.trajectory, other.trajectory)):
        prev = ref.trajectory[step - 1] if step else case.inits
        for i in indices:
            a, b = ref_now[i].double(), other_now[i].double()
            both_nan = a.isnan() & b.isnan()
            delta = torch.where(both_nan, torch.zeros_like(a), (a - b).abs()).nan_to_num(nan=math.inf)
            allowed = _ULPS * _EPS32 * torch.maximum(a.abs(), b.abs()).nan_to_num(nan=0.0)
            if bool((delta <= allowed).all()):
                continue
            update = float((a - prev[i].double()).abs().nan_to_num(nan=0.0, posinf=0.0).max())
            scale = max(update, _EPS32 * float(a.abs().nan_to_num(nan=0.0, posinf=0.0).max()), 1e-30)
            worst = max(worst, float(delta.max()) / scale)
    return worst


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _first_run(
    build: _Build,
) -> tuple[_Case, _Run, bool, bool] | str:
    """Find a setting the class runs in: default shapes or matrices, without or with a closure.

    Returns (case, run, matrix_only, needs_closure), or the first error when none works.
    """
    first_error: str | None = None
    for matrix_only in (False, True):
        case = _make_case(_MATRIX_SHAPES if matrix_only else _SHAPES)
        try:
            return case, _run(build, case, watch_rng=True), matrix_only, False
        except Exception as err:
            first_error = first_error or _describe(err)
            if "closure" not in str(err).lower():
                continue
        try:
            return case, _run(build, case, closure=True, watch_rng=True), matrix_only, True
        except Exception as err:
            first_error = first_error or _describe(err)
    assert first_error is not None
    return first_error


def _try_run(fn: Callable[[], _Run]) -> tuple[_Run | None, str | None]:
    try:
        return fn(), None
    except Exception as err:
        return None, _describe(err)


def _close(a: float, b: float, rtol: float = _RTOL_STATE) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))


def _scalar_differs(ref: Mapping[str, float], other: Mapping[str, float]) -> str | None:
    """Return the first scalar state key whose value differs (or is missing), else None."""
    for key, value in ref.items():
        if key not in other or not _close(value, other[key]):
            return key
    return None


def _group_value_differs(ref: _Run, other: _Run) -> list[str]:
    """Keys written by step() whose final values differ between the two runs."""
    keys = set()
    for old, new in zip(ref.groups_after, other.groups_after):
        keys |= {
            k
            for k in ref.written_keys
            if k in old and not (k in new and _close_value(old[k], new[k], _RTOL_STATE))
        }
    return sorted(keys)


def _coupling(
    base: _Run,
    other: _Run | None,
    err: str | None,
    case: _Case,
    *,
    what: str = "scaling one tensor's gradient",
) -> tuple[float, str | None]:
    """How much the other tensors' runs move under a change to the first tensor, and why."""
    if other is None:
        return math.inf, f"{what} makes the class fail: {err}"
    others = range(1, len(case.inits))
    diff = _diff(base, other, case, others)
    if diff > _RTOL_UPDATE:
        return diff, f"{what} moves another tensor's update by {diff:.3g}x its size"
    for i in others:
        key = _scalar_differs(base.scalars[i][0], other.scalars[i][0])
        if key is not None:
            return math.inf, f"{what} changes another tensor's state {key!r}"
    keys = _group_value_differs(base, other)
    if keys:
        return math.inf, f"{what} changes the param_group values step() writes: {keys}"
    return diff, None


def _splitting(base: _Run, split: _Run | None, err: str | None, case: _Case) -> tuple[float, str | None]:
    """How much splitting every tensor into 1-D pieces changes the run, and why."""
    if split is None:
        return math.inf, f"the class fails on 1-D pieces of the tensors: {err}"
    if base.odd_state:
        return math.inf, f"it keeps per-tensor state: {base.odd_state[0]}"
    diff = _diff(base, split, case, range(len(case.inits)))
    if diff > _RTOL_UPDATE:
        return diff, f"splitting tensors into pieces changes the update by {diff:.3g}x its size"
    for whole, pieces in zip(base.scalars, split.scalars):
        for piece in pieces:
            key = _scalar_differs(whole[0], piece)
            if key is not None:
                return math.inf, f"its scalar state {key!r} is a statistic of the whole tensor"
    return diff, None


def _probe(optimizer_class: type[Optimizer], build: _Build) -> dict[str, Any]:
    """Return the fields of the ProbeVerdict (all but elapsed_s)."""
    verdict: dict[str, Any] = dict(
        optimizer_class=f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
        update="unknown",
        uses_rng=False,
        writes_group_keys=(),
        needs_closure=False,
        moves_params_before_closure=False,
        reads_requires_grad=False,
        matrix_only=False,
        train_eval=_has_modes(optimizer_class),
        split_diff=math.inf,
        cross_diff=math.inf,
        error=None,
    )
    found = _first_run(build)
    if isinstance(found, str):
        reason = f"could not run {optimizer_class.__name__} on the probe tensors: {found}"
        return {**verdict, "error": found, "reason": reason}
    case, base, matrix_only, closure = found

    def run(**kw: Any) -> _Run:
        return _run(build, case, closure=closure, **kw)

    notes = ["consumes global random numbers"] if base.rng_moved else []
    perturbed, err = _try_run(lambda: run(perturb=True))
    cross_diff, coupling = _coupling(base, perturbed, err, case)
    if coupling is None:
        subset, err = _try_run(lambda: run(drop_first=True))
        cross_diff, coupling = _coupling(base, subset, err, case, what="leaving one tensor out")
    split_diff, whole = math.inf, None
    if coupling is None:  # a global verdict needs no split run
        split, err = _try_run(lambda: run(split=True))
        split_diff, whole = _splitting(base, split, err, case)
    frozen, err = _try_run(lambda: run(requires_grad=False))
    reads_requires_grad = frozen is None or _diff(base, frozen, case, range(len(case.inits))) > _RTOL_UPDATE
    if reads_requires_grad:
        notes.append("reads requires_grad" + (f" (fails without it: {err})" if err else ""))

    update: UpdateKind
    if coupling is not None:
        update, evidence = "global", coupling
    elif whole is not None:
        update, evidence = "per_tensor", whole
    else:
        update, evidence = "elementwise", "splitting tensors into pieces gives the same update"
    written = tuple(sorted(base.written_keys))
    notes += [f"step() writes param_group keys {list(written)}"] if written else []
    notes += ["step() needs a closure"] if closure else []
    notes += ["step() moves the parameters before calling the closure"] if base.moved_before_closure else []
    notes += ["takes 2-D tensors only"] if matrix_only else []
    notes += ["probed in train() mode, then eval()"] if verdict["train_eval"] else []
    reason = f"{optimizer_class.__name__}: {update} ({evidence})" + "".join(f"; {n}" for n in notes)
    return {
        **verdict,
        "update": update,
        "uses_rng": base.rng_moved,
        "writes_group_keys": written,
        "needs_closure": closure,
        "moves_params_before_closure": base.moved_before_closure,
        "reads_requires_grad": reads_requires_grad,
        "matrix_only": matrix_only,
        "split_diff": split_diff,
        "cross_diff": cross_diff,
        "reason": reason,
    }
