"""Sharded L-BFGS: torch.optim.LBFGS's algorithm with every vector split across the shard group.

Each rank keeps only its flat piece of the gradient, the direction and the 2 x history_size
history vectors. Every scalar the algorithm decides on (dot products, the L1 norm, max-abs values,
directional derivatives and the loss) is reduced over the group, so all ranks take the same
branches, call the closure the same number of times, and follow torch.optim.LBFGS on one process
up to the rounding of the cross-rank sums. Parameters are all-gathered before every closure call.
The state_dict conversion lives in shardoptim.lbfgs_state.

Must not import shardoptim.optimizer at run time: the owner hands in a `ShardAccess`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from shardoptim.comm import Comm

__all__ = ["HISTORY_KEYS", "VECTOR_KEYS", "ShardAccess", "ShardedLBFGS"]

Closure = Callable[[], Any]
"""Re-evaluates the model (forward and backward) and returns the loss as a float or a tensor."""

# Real dtypes a flat vector may have; each rank sends one presence flag per entry, once.
_FLAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# State keys holding flat vectors (sharded), and lists of them; every other key is a global scalar.
VECTOR_KEYS = ("d", "prev_flat_grad")
HISTORY_KEYS = ("old_dirs", "old_stps")


class ShardAccess(Protocol):
    """What ShardedLBFGS needs from its owner (ShardedOptimizer provides it)."""

    @property
    def comm(self) -> Comm: ...

    def local_params(self) -> list[Tensor]:
        """Return this rank's 1-D views of the parameters, in a fixed order (writes update the model)."""
        ...

    def local_grads(self) -> list[Tensor]:
        """Return the 1-D gradient slices matching `local_params()` (zeros where a grad is None)."""
        ...

    def gather_params(self) -> None:
        """Make every rank's full parameters equal to the owners' pieces (Collective)."""
        ...


Scalar = Tensor | float
"""A scalar of the algorithm: a 0-dim tensor wherever torch.optim.LBFGS has one, else a Python number.

NOTE: the types matter, not only the values: Python evaluates `float / tensor` as
`tensor.reciprocal() * float`, which rounds twice, so the scalars mirror torch's types exactly.
"""


def _div(a: Scalar, b: Scalar) -> Scalar:
    """Return a / b as Python and torch compute it, but inf or nan where two floats would raise."""
    if isinstance(a, Tensor) or isinstance(b, Tensor) or b != 0.0:
        return a / b
    if a == 0.0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _max(a: Scalar, b: Scalar) -> Scalar:
    """Return max(a, b) with Python's semantics (the first on ties and nan), typed for mypy."""
    return b if b > a else a


def _min(a: Scalar, b: Scalar) -> Scalar:
    """Return min(a, b) with Python's semantics (the first on ties and nan), typed for mypy."""
    return b if b < a else a


def _abs(a: Scalar) -> Scalar:
    """Return abs(a), typed for mypy."""
    return a.abs() if isinstance(a, Tensor) else abs(a)


def _cubic_interpolate(
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
    d1 = g1 + g2 - _div(3 * (f1 - f2), x1 - x2)
    # NOTE: torch's pow(x, 2) multiplies; float.__pow__ would call libm pow and may raise OverflowError.
    d2_square = (d1**2 if isinstance(d1, Tensor) else d1 * d1) - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt() if isinstance(d2_square, Tensor) else math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * _div(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * _div(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return _min(_max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _max_abs(v: Tensor) -> Tensor:
    """Return max(|v|) as a 0-dim tensor; 0 for an empty piece (a rank that owns nothing)."""
    return v.abs().max() if v.numel() else v.new_zeros(())


class ShardedLBFGS(Optimizer):
    """torch.optim.LBFGS over this rank's flat pieces, with global reductions.

    Same options, defaults and decisions as torch.optim.LBFGS (the strong-Wolfe line search included);
    state lives under the first local parameter (or a private key on a rank that owns nothing), with
    torch's key names, but `d`, `prev_flat_grad`, `old_dirs` and `old_stps` hold only this rank's
    elements. Partial sums travel in float64; each result becomes a 0-dim tensor of the flat dtype
    wherever torch has one, so at world size 1 a run is bitwise torch.optim.LBFGS's.

    Args:
        params: one param group whose "params" are this rank's 1-D views (from `shard.local_params()`).
        shard: the owner's pieces, gradients, parameter gather and process group.
        lr: learning rate (default 1).
        max_iter: iterations per `step` (default 20).
        max_eval: closure calls per `step` (default max_iter * 5 // 4).
        tolerance_grad: stop when max|grad| is at most this (default 1e-7).
        tolerance_change: stop when the loss or the step changes less than this (default 1e-9).
        history_size: number of (s, y) pairs kept (default 100).
        line_search_fn: None (fixed step lr) or "strong_wolfe".
    """

    def __init__(
        self,
        params: Any,
        *,
        shard: ShardAccess,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; use lr >= 0")
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got {line_search_fn!r}")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = {
            "lr": lr,
            "max_iter": max_iter,
            "max_eval": max_eval,
            "tolerance_grad": tolerance_grad,
            "tolerance_change": tolerance_change,
            "history_size": history_size,
            "line_search_fn": line_search_fn,
        }
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"LBFGS supports one param group, got {len(self.param_groups)}")
        self._shard = shard
        self._comm = shard.comm
        local = self.param_groups[0]["params"]
        self.device = local[0].device if local else self._comm.device
        """Where this rank's flat vectors live (its pieces' device)."""
        # NOTE: torch keys LBFGS's global state by its first parameter (load_state_dict casts by it);
        # a rank that owns no element still needs a stable key of its own.
        self._empty_key = torch.empty(0, device=self.device)
        self._dtype: torch.dtype | None = None
        self.num_reductions = 0
        """All-reduces issued so far (one per batch of scalars)."""
        self.num_gathers = 0
        """Parameter all-gathers issued so far (one per trial point, plus one per accepted step)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the one param group (torch.optim.LBFGS supports no more)."""
        if self.param_groups:
            raise ValueError(
                "LBFGS supports one param group (no per-parameter options); pass every parameter when "
                "building the optimizer"
            )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------------- flat pieces

    @property
    def state_key(self) -> Tensor:
        """The key of the global state in `self.state` (torch's LBFGS: the first parameter)."""
        local: list[Tensor] = self.param_groups[0]["params"]
        return local[0] if local else self._empty_key

    def _flat_dtype(self) -> torch.dtype:
        """Return the dtype of every flat vector: the promotion of all ranks' parameter dtypes.

        torch.cat promotes LBFGS's flat gradient the same way on one process. Collective (once).
        """
        if self._dtype is None:
            present = [0.0] * len(_FLAT_DTYPES)
            for p in self._shard.local_params():
                real = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
                if real not in _FLAT_DTYPES:
                    raise TypeError(
                        f"{self._comm.prefix}LBFGS needs floating-point parameters, got {p.dtype}; "
                        f"use one of {[str(d) for d in _FLAT_DTYPES]}"
                    )
                present[_FLAT_DTYPES.index(real)] = 1.0
            counts, _ = self._reduce(present, [], what="LBFGS parameter dtypes")
            used = [dtype for dtype, count in zip(_FLAT_DTYPES, counts) if count > 0]
            self._dtype = reduce(torch.promote_types, used) if used else torch.get_default_dtype()
        return self._dtype

    def _gather_flat_grad(self) -> Tensor:
        views = []
        for g in self._shard.local_grads():
            views.append(torch.view_as_real(g).view(-1) if g.is_complex() else g.view(-1))
        dtype = self._flat_dtype()
        if not views:
            return torch.zeros(0, dtype=dtype, device=self.device)
        return torch.cat([v.to(dtype) for v in views], 0)

    def _add_grad(self, step_size: Scalar, update: Tensor) -> None:
        """Add step_size * update to this rank's pieces, then all-gather the parameters (Collective)."""
        offset = 0
        for p in self._shard.local_params():
            if p.is_complex():
                p = torch.view_as_real(p)
            numel = p.numel()
            p.add_(update[offset : offset + numel].view_as(p), alpha=float(step_size))
            offset += numel
        assert offset == update.numel(), (offset, update.numel())
        self._shard.gather_params()
        self.num_gathers += 1

    def _clone_param(self) -> list[Tensor]:
        return [p.clone(memory_format=torch.contiguous_format) for p in self._shard.local_params()]

    def _set_param(self, params_data: Sequence[Tensor]) -> None:
        for p, pdata in zip(self._shard.local_params(), params_data, strict=True):
            p.copy_(pdata)

    # ------------------------------------------------------------------------------- reductions

    def _reduce(
        self, sums: Sequence[Tensor | float], maxes: Sequence[Tensor | float], *, what: str
    ) -> tuple[list[float], list[float]]:
        """Return the global sums and maxima of this rank's partial values, in one all-reduce.

        Collective: call on every rank of the group, in the same order; same result on every rank.
        Values travel as float64. Maxima propagate nan like torch's `.max()`.
        """
        num_sums, num_maxes = len(sums), len(maxes)
        world_size, rank = self._comm.world_size, self._comm.rank
        device = self._comm.device
        local = torch.cat(
            [
                v.detach().to(device=device, dtype=torch.float64).reshape(1)
                if isinstance(v, Tensor)
                else torch.tensor([v], dtype=torch.float64, device=device)
                for v in (*sums, *maxes)
            ]
        )
        # NOTE: one collective for both kinds: each rank writes its maxima into its own slots of a
        # summed vector (x + 0 is exact) and every rank takes the max locally. A MAX all-reduce
        # would cost a second collective and does not propagate nan reliably (gloo uses std::max).
        packed = local.new_zeros(num_sums + world_size * num_maxes)
        packed[:num_sums] = local[:num_sums]
        packed[num_sums + rank * num_maxes : num_sums + (rank + 1) * num_maxes] = local[num_sums:]
        self._comm.all_reduce_(packed, op="sum", what=what)
        self.num_reductions += 1
        out_sums: list[float] = packed[:num_sums].tolist()
        out_maxes: list[float] = (
            packed[num_sums:].view(world_size, num_maxes).amax(dim=0).tolist() if num_maxes else []
        )
        return out_sums, out_maxes

    def _scalar(self, value: float) -> Tensor:
        """Return a reduced value as the 0-dim tensor torch would hold (flat dtype, on the CPU)."""
        return torch.tensor(value, dtype=self._flat_dtype())

    def _dot(self, a: Tensor, b: Tensor, *, what: str) -> Tensor:
        """Return the global dot product of two flat vectors (Collective)."""
        return self._scalar(self._reduce([a.dot(b)], [], what=what)[0][0])

    def _reduce_eval(
        self, loss: float, flat_grad: Tensor, sums: Sequence[Tensor], *, what: str
    ) -> tuple[float, Tensor, list[Tensor]]:
        """Reduce a closure's loss and max|grad| with `sums`; return (loss, max|grad|, sums).

        Collective. Raises ValueError on every rank when the ranks' closures returned different losses.
        """
        out_sums, (grad_max, loss_max, neg_loss_min) = self._reduce(
            sums, [_max_abs(flat_grad), loss, -loss], what=what
        )
        loss_min = -neg_loss_min
        if loss_max != loss_min and not math.isnan(loss_max):
            raise ValueError(
                f"{self._comm.prefix}the LBFGS closure returned different losses on different ranks (from "
                f"{loss_min!r} to {loss_max!r}); every rank must evaluate the same objective. With "
                "a data-parallel closure (e.g. DDP), average the loss over ranks before returning it: "
                "dist.all_reduce(loss); loss /= world_size"
            )
        return loss_max, self._scalar(grad_max), [self._scalar(v) for v in out_sums]

    # ------------------------------------------------------------------------------- step

    def _directional_evaluate(
        self, closure: Closure, x: Sequence[Tensor], t: Scalar, d: Tensor
    ) -> tuple[float, Tensor, Tensor, Tensor]:
        """Evaluate at x + t*d; return (loss, flat grad, grad . d, max|grad|) and restore x locally.

        Collective. The other ranks' copies of this rank's piece stay at the trial point until the
        next `_add_grad` gathers again.
        """
        self._add_grad(t, d)
        loss = float(closure())
        flat_grad = self._gather_flat_grad()
        self._set_param(x)
        loss, grad_max, (gtd,) = self._reduce_eval(loss, flat_grad, [flat_grad.dot(d)], what="line search")
        return loss, flat_grad, gtd, grad_max

    @torch.no_grad()
    def step(self, closure: Closure) -> Any:  # type: ignore[override]
        """Run up to max_iter L-BFGS iterations; return the first loss the closure returned.

        Collective: call on every rank of the group, in the same order. The closure runs with grad
        enabled, the same number of times on every rank, each time after a parameter all-gather.
        """
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr: Scalar = group["lr"]
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        max_iter: int = group["max_iter"]
        max_eval: int = group["max_eval"]
        tolerance_grad: float = group["tolerance_grad"]
        tolerance_change: float = group["tolerance_change"]
        line_search_fn: str | None = group["line_search_fn"]
        history_size: int = group["history_size"]

        state = self.state[self.state_key]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss = closure()
        current_evals = 1
        state["func_evals"] += 1
        flat_grad = self._gather_flat_grad()
        loss, grad_max, _ = self._reduce_eval(float(orig_loss), flat_grad, [], what="initial loss")
        if grad_max <= tolerance_grad:
            return orig_loss

        d: Tensor | None = state.get("d")
        t: Scalar | None = state.get("t")
        old_dirs: list[Tensor] = state.get("old_dirs") or []
        old_stps: list[Tensor] = state.get("old_stps") or []
        ro: list[Scalar] = state.get("ro") or []
        h_diag: Scalar | None = state.get("H_diag")
        prev_flat_grad: Tensor | None = state.get("prev_flat_grad")
        prev_loss: float | None = state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # ---- direction: two-loop recursion, one all-reduce per history dot product
            if state["n_iter"] == 1:
                d = flat_grad.neg()
                old_dirs, old_stps, ro = [], [], []
                h_diag = 1
            else:
                assert d is not None and t is not None and prev_flat_grad is not None and h_diag is not None
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                # NOTE: y.y is needed only when ys > 1e-10 but depends on y alone: one collective for both.
                (ys_sum, yy_sum), _ = self._reduce([y.dot(s), y.dot(y)], [], what="curvature pair")
                ys, yy = self._scalar(ys_sum), self._scalar(yy_sum)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs.pop(0)
                        old_stps.pop(0)
                        ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / yy
                num_old = len(old_dirs)
                if "al" not in state:
                    state["al"] = [None] * history_size
                al: list[Any] = state["al"]
                if len(al) < num_old:  # history_size was raised since the first step
                    al.extend([None] * (num_old - len(al)))
                q = flat_grad.neg()
                for i in range(num_old - 1, -1, -1):
                    al[i] = self._dot(old_stps[i], q, what="two-loop recursion (first loop)") * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, h_diag)
                for i in range(num_old):
                    be_i = self._dot(old_dirs[i], r, what="two-loop recursion (second loop)") * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            # ---- step length: g.d, |g|_1 (first iteration only) and max|d| in one collective
            first = state["n_iter"] == 1
            sums = [flat_grad.dot(d), flat_grad.abs().sum()] if first else [flat_grad.dot(d)]
            out_sums, (d_max,) = self._reduce(sums, [_max_abs(d)], what="directional derivative")
            d_norm = self._scalar(d_max)
            gtd = self._scalar(out_sums[0])
            if first:
                inv = 1.0 / self._scalar(out_sums[1])
                t = _min(1.0, inv) * lr
            else:
                t = lr
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self._clone_param()
                loss, flat_grad, t, ls_func_evals, grad_max = self._strong_wolfe(
                    closure,
                    x_init,
                    t,
                    d,
                    loss,
                    flat_grad,
                    gtd,
                    grad_max,
                    d_norm,
                    max_ls=max_eval - current_evals,
                )
                self._add_grad(t, d)
                opt_cond = grad_max <= tolerance_grad
            else:
                self._add_grad(t, d)
                if n_iter != max_iter:
                    # NOTE: torch skips this evaluation on the last iteration (no use in a stochastic setting).
                    loss = float(closure())
                    flat_grad = self._gather_flat_grad()
                    loss, grad_max, _ = self._reduce_eval(loss, flat_grad, [], what="loss after step")
                    opt_cond = grad_max <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            # ---- stopping conditions (no collective: every input is already global)
            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            # NOTE: max|d * t| == |max|d| * t| exactly, because rounding is monotonic.
            if d_norm.mul(t).abs() <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        state["old_dirs"] = old_dirs
        state["old_stps"] = old_stps
        state["ro"] = ro
        state["H_diag"] = h_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        return orig_loss

    def _strong_wolfe(
        self,
        closure: Closure,
        x: Sequence[Tensor],
        t: Scalar,
        d: Tensor,
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

        Collective. `g_max` and `d_norm` are the global max|g| and max|d|; each point carries its
        global max|grad| so the caller's optimality test needs no further collective.

        Returns:
            (loss, flat grad, step, closure calls, max|grad|) at the accepted step.
        """
        # NOTE: tolerance_change is 1e-9 here whatever the group's option: torch does not pass it.
        f_new, g_new, gtd_new, g_max_new = self._directional_evaluate(closure, x, t, d)
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
            t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))

            # next step
            t_prev, f_prev, g_prev, gtd_prev, g_max_prev = tmp, f_new, g_new, gtd_new, g_max_new
            f_new, g_new, gtd_new, g_max_new = self._directional_evaluate(closure, x, t, d)
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
            if _abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
                break
            t = _cubic_interpolate(
                bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
            )
            # if t is too close to a bound after insufficient progress (or at a bound), move it 0.1 of
            # the bracket's length away from the nearest bound
            b_max, b_min = _max(bracket[0], bracket[1]), _min(bracket[0], bracket[1])
            eps = 0.1 * (b_max - b_min)
            if _min(b_max - t, t - b_min) < eps:
                if insuf_progress or t >= b_max or t <= b_min:
                    t = b_max - eps if _abs(t - b_max) < _abs(t - b_min) else b_min + eps
                    insuf_progress = False
                else:
                    insuf_progress = True
            else:
                insuf_progress = False

            f_new, g_new, gtd_new, g_max_new = self._directional_evaluate(closure, x, t, d)
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
