"""The strong-Wolfe line search of L-BFGS, and the scalar arithmetic it shares with the step.

torch.optim.lbfgs's `_strong_wolfe` and `_cubic_interpolate`, with the trial points evaluated by a
callable the caller hands in (ShardedLBFGS evaluates them over the shard group, with global
reductions). The scalars keep torch's exact types, so the decisions match torch.optim.LBFGS.

Pure: no communication of its own. Must not import torch.distributed or shardoptim.optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

__all__ = [
    "Evaluate",
    "Scalar",
    "cubic_interpolate",
    "scalar_abs",
    "scalar_div",
    "scalar_max",
    "scalar_min",
    "strong_wolfe",
]

Scalar = Tensor | float
"""A scalar of the algorithm: a 0-dim tensor wherever torch.optim.LBFGS has one, else a Python number.

NOTE: the types matter, not only the values: Python evaluates `float / tensor` as
`tensor.reciprocal() * float`, which rounds twice, so the scalars mirror torch's types exactly.
"""

Evaluate = Callable[[Scalar], tuple[float, Tensor, Tensor, Tensor]]
"""Evaluate the objective at step t along the direction: return (loss, flat grad, grad . d, max|grad|)."""


def scalar_div(a: Scalar, b: Scalar) -> Scalar:
    """Return a / b as Python and torch compute it, but inf or nan where two floats would raise."""
    if isinstance(a, Tensor) or isinstance(b, Tensor) or b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def scalar_max(a: Scalar, b: Scalar) -> Scalar:
    """Return max(a, b) with Python's semantics (the first on ties and nan), typed for mypy."""
    return b if b > a else a


def scalar_min(a: Scalar, b: Scalar) -> Scalar:
    """Return min(a, b) with Python's semantics (the first on ties and nan), typed for mypy."""
    return b if b < a else a


def scalar_abs(a: Scalar) -> Scalar:
    """Return abs(a), typed for mypy."""
    return a.abs() if isinstance(a, Tensor) else abs(a)


def cubic_interpolate(
    x1: Scalar,
    f1: float,
    g1: Scalar,
    x2: Scalar,
    f2: float,
    g2: Scalar,
    bounds: tuple[Scalar, Scalar] | None = None,
) -> Scalar:
    """Return the minimiser of the cubic through two points with slopes (torch.optim.lbfgs's)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - scalar_div(3 * (f1 - f2), x1 - x2)
    # NOTE: torch's pow(x, 2) multiplies; float.__pow__ would call libm pow and may raise OverflowError.
    d2_square = (d1**2 if isinstance(d1, Tensor) else d1 * d1) - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt() if isinstance(d2_square, Tensor) else math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * scalar_div(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * scalar_div(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return scalar_min(scalar_max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def strong_wolfe(
    evaluate: Evaluate,
    t: Scalar,
    f: float,
    g: Tensor,
    gtd: Tensor,
    g_max: Tensor,
    d_norm: Tensor,
    *,
    max_ls: int,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
) -> tuple[float, Tensor, Scalar, int, Tensor]:
    """Find a step satisfying the strong Wolfe conditions (torch.optim.lbfgs._strong_wolfe).

    `evaluate(t)` is called once per trial point (the closure calls of the search); with
    ShardedLBFGS it is a collective, so every rank calls this the same number of times as long
    as every input is the same on every rank. `g_max` and `d_norm` are the global max|g| and
    max|d|; each point carries its global max|grad| so the caller's optimality test needs no
    further collective.

    Returns:
        (loss, flat grad, step, closure calls, max|grad|) at the accepted step.
    """
    # NOTE: tolerance_change is 1e-9 here whatever the group's option: torch does not pass it.
    f_new, g_new, gtd_new, g_max_new = evaluate(t)
    ls_func_evals = 1

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev: Scalar = 0
    f_prev, g_prev, gtd_prev, g_max_prev = f, g, gtd, g_max
    done = False
    ls_iter = 0
    bracket: list[Scalar] = []
    bracket_f: list[float] = []
    bracket_g: list[Tensor] = []
    bracket_gtd: list[Tensor] = []
    bracket_g_max: list[Tensor] = []
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, f_new], [g_prev, g_new]
            bracket_gtd, bracket_g_max = [gtd_prev, gtd_new], [g_max_prev, g_max_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g, bracket_g_max = [t], [f_new], [g_new], [g_max_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_g = [t_prev, t], [f_prev, f_new], [g_prev, g_new]
            bracket_gtd, bracket_g_max = [gtd_prev, gtd_new], [g_max_prev, g_max_new]
            break

        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))

        # next step
        t_prev, f_prev, g_prev, gtd_prev, g_max_prev = tmp, f_new, g_new, gtd_new, g_max_new
        f_new, g_new, gtd_new, g_max_new = evaluate(t)
        ls_func_evals += 1
        ls_iter += 1

    # reached max number of iterations? (>=, not ==: torch fails on an unbound name when max_ls < 0)
    if ls_iter >= max_ls:
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]
        bracket_g_max = [g_max, g_max_new]

    # zoom phase: refine the bracket until a point satisfies the criteria
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if scalar_abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        # if t is too close to a bound after insufficient progress (or at a bound), move it 0.1 of
        # the bracket's length away from the nearest bound
        b_max, b_min = scalar_max(bracket[0], bracket[1]), scalar_min(bracket[0], bracket[1])
        eps = 0.1 * (b_max - b_min)
        if scalar_min(b_max - t, t - b_min) < eps:
            if insuf_progress or t >= b_max or t <= b_min:
                t = b_max - eps if scalar_abs(t - b_max) < scalar_abs(t - b_min) else b_min + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new, gtd_new, g_max_new = evaluate(t)
        ls_func_evals += 1
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than the lowest point
            bracket[high_pos], bracket_f[high_pos], bracket_g[high_pos] = t, f_new, g_new
            bracket_gtd[high_pos], bracket_g_max[high_pos] = gtd_new, g_max_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True  # Wolfe conditions satisfied
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # old high becomes new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
                bracket_g_max[high_pos] = bracket_g_max[low_pos]
            # new point becomes new low
            bracket[low_pos], bracket_f[low_pos], bracket_g[low_pos] = t, f_new, g_new
            bracket_gtd[low_pos], bracket_g_max[low_pos] = gtd_new, g_max_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals, bracket_g_max[low_pos]
