"""The step of the sharded LBFGS (kind "lbfgs"), and what ShardedLBFGS reads of the placement.

The options are agreed like every kind's; the update is ShardedLBFGS's own step, which calls the
closure (with every rank's parameters gathered before each call) as often as its line search
needs. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shardoptim.buffers import memory_perm, to_flat
from shardoptim.comm import Comm
from shardoptim.gather_queue import gather_all
from shardoptim.placement import Placement
from shardoptim.stepping import StepSkeleton


class LBFGSStep(StepSkeleton):
    """Step the sharded LBFGS (it needs a closure and takes nothing else)."""

    def prepare(self, closure: Callable[[], float] | None, kwargs: dict[str, Any]) -> Any:
        if kwargs:
            raise TypeError(f"the sharded LBFGS step takes only a closure, got keyword arguments {sorted(kwargs)}")
        if closure is None:
            raise ValueError(
                "LBFGS needs a closure that re-evaluates the model and returns the loss: "
                "opt.step(closure); see examples/lbfgs_fit.py"
            )
        self.placement.settle_()
        return None

    def local_flags(self) -> torch.Tensor | None:
        return None  # no stage 2, no skip_nonfinite: nothing to agree beyond the options

    def update(
        self, closure: Callable[[], float] | None, loss: Any, has_grad: list[bool] | None, kwargs: dict[str, Any]
    ) -> Any:
        # NOTE: before the step, not only after it (count_step): the step creates its state before
        # it first calls the closure, so a closure that raises leaves state that state_dict() must
        # consolidate rather than report empty.
        self.placement.mark_stepped()
        return self.optim.step(closure)


class PlacementShardAccess:
    """What the sharded LBFGS needs of the placement: this rank's pieces and the gather (a ShardAccess)."""

    def __init__(self, placement: Placement) -> None:
        self._placement = placement

    @property
    def comm(self) -> Comm:
        return self._placement.comm

    def local_params(self) -> list[torch.Tensor]:
        """Return this rank's 1-D views of the parameters (writes go straight into the buckets)."""
        return [piece.local for piece in self._placement.pieces]

    def local_grads(self) -> list[torch.Tensor]:
        """Return this rank's 1-D slices of the full gradients (zeros where a grad is None)."""
        out = []
        params = self._placement.params
        for piece in self._placement.pieces:
            grad = params[piece.index].grad
            if grad is None:
                out.append(torch.zeros_like(piece.local))
            else:
                flat = to_flat(grad, memory_perm(params[piece.index]))
                out.append(flat.narrow(0, piece.in_param.start, piece.in_param.numel))
        return out

    def gather_params(self) -> None:
        """Make every rank's full parameters equal to the owners' pieces.

        Collective: call on every rank of the group, in the same order.
        """
        gather_all(self._placement)
