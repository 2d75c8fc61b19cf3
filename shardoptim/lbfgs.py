"""Sharded L-BFGS: torch.optim.LBFGS's algorithm with every vector split across the shard group.

Each rank keeps only its flat piece of the gradient, the direction and the 2 x history_size
history vectors. Every scalar the algorithm decides on (dot products, the L1 norm, max-abs values,
directional derivatives and the loss) is reduced over the group, so all ranks take the same
branches, call the closure the same number of times, and follow torch.optim.LBFGS on one process
up to the rounding of the cross-rank sums. Parameters are all-gathered before every closure call.

This module holds the iteration (direction, step length, stopping tests). The flat pieces and the
reductions are in shardoptim.lbfgs_flat, the strong-Wolfe line search in shardoptim.lbfgs_line_search,
the state_dict conversion in shardoptim.lbfgs_state.

Must not import shardoptim.optimizer at run time: the owner hands in a `ShardAccess`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from shardoptim.lbfgs_flat import FlatPieces, ShardAccess, max_abs
from shardoptim.lbfgs_line_search import Scalar, scalar_min, strong_wolfe

__all__ = ["HISTORY_KEYS", "VECTOR_KEYS", "ShardAccess", "ShardedLBFGS"]

Closure = Callable[[], Any]
"""Re-evaluates the model (forward and backward) and returns the loss as a float or a tensor."""

# State keys holding flat vectors (sharded), and lists of them; every other key is a global scalar.
VECTOR_KEYS = ("d", "prev_flat_grad")
HISTORY_KEYS = ("old_dirs", "old_stps")


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
        local = self.param_groups[0]["params"]
        self.device = local[0].device if local else shard.comm.device
        """Where this rank's flat vectors live (its pieces' device)."""
        self._flat = FlatPieces(shard, self.device)
        # NOTE: torch keys LBFGS's global state by its first parameter (load_state_dict casts by it);
        # a rank that owns no element still needs a stable key of its own.
        self._empty_key = torch.empty(0, device=self.device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the one param group (torch.optim.LBFGS supports no more)."""
        if self.param_groups:
            raise ValueError(
                "LBFGS supports one param group (no per-parameter options); pass every parameter when "
                "building the optimizer"
            )
        super().add_param_group(param_group)

    @property
    def num_reductions(self) -> int:
        """All-reduces issued so far (one per batch of scalars)."""
        return self._flat.num_reductions

    @property
    def num_gathers(self) -> int:
        """Parameter all-gathers issued so far (one per trial point, plus one per accepted step)."""
        return self._flat.num_gathers

    @property
    def state_key(self) -> Tensor:
        """The key of the global state in `self.state` (torch's LBFGS: the first parameter)."""
        local: list[Tensor] = self.param_groups[0]["params"]
        return local[0] if local else self._empty_key

    # ------------------------------------------------------------------------------- step

    def _directional_evaluate(
        self, closure: Closure, x: Sequence[Tensor], t: Scalar, d: Tensor
    ) -> tuple[float, Tensor, Tensor, Tensor]:
        """Evaluate at x + t*d; return (loss, flat grad, grad . d, max|grad|) and restore x locally.

        Collective. The other ranks' copies of this rank's piece stay at the trial point until the
        next `add_` gathers again.
        """
        self._flat.add_(t, d)
        loss = float(closure())
        flat_grad = self._flat.flat_grad()
        self._flat.set_params_(x)
        loss, grad_max, (gtd,) = self._flat.reduce_eval(
            loss, flat_grad, [flat_grad.dot(d)], what="line search"
        )
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
        flat_grad = self._flat.flat_grad()
        loss, grad_max, _ = self._flat.reduce_eval(float(orig_loss), flat_grad, [], what="initial loss")
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
                (ys_sum, yy_sum), _ = self._flat.reduce([y.dot(s), y.dot(y)], [], what="curvature pair")
                ys, yy = self._flat.scalar(ys_sum), self._flat.scalar(yy_sum)
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
                    al[i] = self._flat.dot(old_stps[i], q, what="two-loop recursion (first loop)") * ro[i]
                    q.add_(old_dirs[i], alpha=-al[i])
                d = r = torch.mul(q, h_diag)
                for i in range(num_old):
                    be_i = self._flat.dot(old_dirs[i], r, what="two-loop recursion (second loop)") * ro[i]
                    r.add_(old_stps[i], alpha=al[i] - be_i)

            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss

            # ---- step length: g.d, |g|_1 (first iteration only) and max|d| in one collective
            first = state["n_iter"] == 1
            sums = [flat_grad.dot(d), flat_grad.abs().sum()] if first else [flat_grad.dot(d)]
            out_sums, (d_max,) = self._flat.reduce(sums, [max_abs(d)], what="directional derivative")
            d_norm = self._flat.scalar(d_max)
            gtd = self._flat.scalar(out_sums[0])
            if first:
                inv = 1.0 / self._flat.scalar(out_sums[1])
                t = scalar_min(1.0, inv) * lr
            else:
                t = lr
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                if line_search_fn != "strong_wolfe":
                    raise RuntimeError("only 'strong_wolfe' is supported")
                x_init = self._flat.clone_params()
                evaluate = partial(self._directional_evaluate, closure, x_init, d=d)
                loss, flat_grad, t, ls_func_evals, grad_max = strong_wolfe(
                    evaluate, t, loss, flat_grad, gtd, grad_max, d_norm, max_ls=max_eval - current_evals
                )
                self._flat.add_(t, d)
                opt_cond = grad_max <= tolerance_grad
            else:
                self._flat.add_(t, d)
                if n_iter != max_iter:
                    # NOTE: torch skips this evaluation on the last iteration (no use in a stochastic setting).
                    loss = float(closure())
                    flat_grad = self._flat.flat_grad()
                    loss, grad_max, _ = self._flat.reduce_eval(loss, flat_grad, [], what="loss after step")
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
