"""Find out what kind of update an optimizer class makes by running it on small synthetic tensors.

`probe_update_kind(cls, defaults)` runs the class at the caller's own options on three small
float32 tensors (a 20x17 weight, a 7-element bias, a 6x5 weight) through the gradient schedule of
shardoptim.probe_case: 16 steps of random gradients at three magnitudes, gradients orthogonal and
parallel to the weights, more steps than a typical warm-up, then a spike of 4 orders of magnitude
up and one down; the cross-tensor checks run again with gradients 1000x smaller (median 43 ms
on the 2-core CPU machine over 226 catalog classes, 90% under 67 ms, the slowest 6.9 s; the
earlier 3-step probe took a median of 6 ms: benchmarks/probe_time.py). Then it
compares runs:

- perturbed / subset: the first tensor's gradient scaled, or the first tensor left out. If another
  tensor's trajectory or scalar state moves by even one bit, or a param_group value written by
  step() moves, the class couples tensors ("global": a global norm, a mean over all parameters,
  an adaptive step size, a global clip or spike guard that acts only above a threshold).
- split: every tensor flattened and cut into 2-3 unequal contiguous 1-D pieces, each its own
  parameter, with the same gradient values. The same trajectory (bitwise, or within a few units
  in the last place), state tensors only of the parameter's shape, and every piece's scalar state
  equal to the whole tensor's mean say that the update looked element by element on these inputs
  ("elementwise"); otherwise it is "per_tensor". NOTE: "elementwise" is no proof (a class may
  couple a tensor's elements only under conditions these inputs lack), so shardoptim.kinds gives
  flat sharding only to classes known elementwise, never on a verdict.
- requires_grad=False: a different trajectory (or an error) means the class reads `requires_grad`.

It also records whether a global generator (torch's CPU one, Python's `random`, numpy's) moved
between construction and the end of the run, the param_group keys step() adds or changes,
whether step() needs a closure, and whether the class takes only 2-D tensors (then everything is
probed with matrices). Classes with train()/eval() (schedule-free) are put in train mode first and
compared after eval() too. shardoptim.probe_run drives each run and shardoptim.probe_compare compares
them; this module decides the verdict.

What it still cannot see: a cross-tensor coupling triggered only by something its inputs lack:
after more than 12 steps (a long warm-up, a preconditioner refreshed every 100 steps), above a
threshold beyond a 1e4 spike of gradients of norm about 1-30, by a tensor's size (beyond 20
elements per dimension), dtype, device, or a condition on several tensors at once (their
gradients all orthogonal, say, or a per-layer schedule); coupling through state kept outside
`optimizer.state` and `param_groups`; a coupling whose effect stays below float32 resolution on
these tensors (pytorch_optimizer's Ranger21: shardoptim.allowlist.KNOWN_COUPLED). Such a state is seen only when it is kept (e.g. a
preconditioner object); `shardoptim.verify` checks a class on the user's own model, and explicit
registrations stay the final word. The probe leaves every global generator as it found it and
never touches CUDA. Pure torch: must not import torch.distributed or shardoptim.optimizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch.optim import Optimizer

from shardoptim.probe_case import MATRIX_SHAPES, SHAPES, SMALL_GRADS, Case, make_case, scaled
from shardoptim.probe_compare import (
    RTOL_UPDATE,
    Run,
    coupling_evidence,
    splitting_evidence,
    trajectory_diff,
)
from shardoptim.probe_run import OptimizerBuilder, has_modes, isolated_global_state, run_case

__all__ = ["ProbeVerdict", "UpdateKind", "probe_update_kind"]

#: What the update of one parameter reads: its own elements only, its whole tensor, or other tensors
#: too. "unknown" when the probe could not run the class.
UpdateKind = Literal["elementwise", "per_tensor", "global", "unknown"]


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
    with isolated_global_state():
        verdict = _probe(optimizer_class, OptimizerBuilder(optimizer_class, options, group))
    elapsed = time.perf_counter() - start
    result = ProbeVerdict(**{**verdict, "elapsed_s": elapsed})
    if key is not None:
        _CACHE[key] = result
    return result


_CACHE: dict[tuple[type[Optimizer], str], ProbeVerdict] = {}


def _cache_key(
    optimizer_class: type[Optimizer], options: Mapping[str, Any], group: Mapping[str, Any]
) -> tuple[type[Optimizer], str] | None:
    try:
        return optimizer_class, repr((sorted(options.items()), sorted(group.items())))
    except Exception:  # an option with a failing repr or unorderable keys: do not cache
        return None


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _first_run(
    build: OptimizerBuilder,
) -> tuple[Case, Run, bool, bool] | str:
    """Find a setting the class runs in: default shapes or matrices, without or with a closure.

    Returns (case, run, matrix_only, needs_closure), or the first error when none works.
    """
    first_error: str | None = None
    for matrix_only in (False, True):
        case = make_case(MATRIX_SHAPES if matrix_only else SHAPES)
        try:
            return case, run_case(build, case, watch_rng=True), matrix_only, False
        except Exception as err:
            first_error = first_error or _describe(err)
            if "closure" not in str(err).lower():
                continue
        try:
            return case, run_case(build, case, closure=True, watch_rng=True), matrix_only, True
        except Exception as err:
            first_error = first_error or _describe(err)
    assert first_error is not None
    return first_error


def _try_run(fn: Callable[[], Run]) -> tuple[Run | None, str | None]:
    try:
        return fn(), None
    except Exception as err:
        return None, _describe(err)


def _cross_tensor(run: Callable[..., Run], base: Run, case: Case, note: str = "") -> tuple[float, str | None]:
    """Scale the first tensor's gradient, then leave it out; return (difference, evidence or None)."""
    perturbed, err = _try_run(lambda: run(case, perturb=True))
    cross_diff, coupling = coupling_evidence(
        base, perturbed, err, case, what="scaling one tensor's gradient" + note
    )
    if coupling is None:
        subset, err = _try_run(lambda: run(case, drop_first=True))
        cross_diff, coupling = coupling_evidence(
            base, subset, err, case, what="leaving one tensor out" + note
        )
    return cross_diff, coupling


def _probe(optimizer_class: type[Optimizer], build: OptimizerBuilder) -> dict[str, Any]:
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
        train_eval=has_modes(optimizer_class),
        split_diff=math.inf,
        cross_diff=math.inf,
        error=None,
    )
    found = _first_run(build)
    if isinstance(found, str):
        reason = f"could not run {optimizer_class.__name__} on the probe tensors: {found}"
        return {**verdict, "error": found, "reason": reason}
    case, base, matrix_only, closure = found

    def run(on: Case = case, **kw: Any) -> Run:
        return run_case(build, on, closure=closure, **kw)

    notes = ["consumes global random numbers"] if base.rng_moved else []
    cross_diff, coupling = _cross_tensor(run, base, case)
    if coupling is None:
        small = scaled(case, SMALL_GRADS)
        small_base, err = _try_run(lambda: run(small))
        if small_base is None:
            cross_diff, coupling = math.inf, f"gradients {SMALL_GRADS:g}x as large make the class fail: {err}"
        else:
            cross_diff, coupling = _cross_tensor(
                run, small_base, small, note=f" (gradients {SMALL_GRADS:g}x)"
            )
    split_diff, whole = math.inf, None
    if coupling is None:  # a global verdict needs no split run
        split_run, err = _try_run(lambda: run(split_=True))
        split_diff, whole = splitting_evidence(base, split_run, err, case)
    frozen, err = _try_run(lambda: run(requires_grad=False))
    moved = frozen is None or trajectory_diff(base, frozen, case, range(len(case.inits))) > RTOL_UPDATE
    reads_requires_grad = moved
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
