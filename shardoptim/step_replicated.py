"""The step of the replicated kind: the unsharded base optimizer on every rank (see shardoptim.replicated).

The options and flags are agreed like every kind's; the update is the base step over every
parameter, its success agreed across ranks for third-party classes. A base class whose step
takes a closure gets the user's closure itself. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardoptim.stepping import StepSkeleton, run_closure, takes_closure


class ReplicatedStep(StepSkeleton):
    """Step the unsharded base optimizer on every rank (kind "replicated")."""

    def _through(self, closure: Callable[[], float] | None) -> bool:
        """Whether the closure goes to the base step (which evaluates it) rather than run here."""
        return closure is not None and takes_closure(self.optim)

    def prepare(self, closure: Callable[[], float] | None, kwargs: dict[str, Any]) -> Any:
        through = self._through(closure)
        if through and self.placement.config.skip_nonfinite:
            raise ValueError(
                f"skip_nonfinite=True needs the gradients before the step, but "
                f"{self.placement.optimizer_class.__name__} evaluates the closure inside its step; compute the "
                "loss and backward before opt.step() instead"
            )
        return None if closure is None or through else run_closure(closure)

    def update(
        self, closure: Callable[[], float] | None, loss: Any, has_grad: list[bool] | None, kwargs: dict[str, Any]
    ) -> Any:
        through = self._through(closure)
        if through:
            kwargs = {**kwargs, "closure": closure}
        result, failure = self.run_base_step(kwargs)
        self.agree_on_step(failure)
        return result if through else loss
