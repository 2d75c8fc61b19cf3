"""Hugging Face Trainer: consolidate a ShardedOptimizer's state on every rank before each save.

Trainer saves a checkpoint by calling `optimizer.state_dict()` on rank 0 only. A ShardedOptimizer
can only answer that once `consolidate_state_dict()` ran on every rank, so this callback runs it
right before each save: in `on_step_end` and `on_epoch_end`, which Trainer calls on every rank
after the default flow callback has set `control.should_save` and before `_save_checkpoint`.

    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None),
                      callbacks=[ShardedOptimizerCallback()])

Resuming (`trainer.train(resume_from_checkpoint=...)`) needs nothing more: Trainer loads the full
optimizer file and calls `load_state_dict` on every rank.

Must not import transformers at import time (an optional dependency): the callback class, a
`transformers.TrainerCallback`, is built on first access of `ShardedOptimizerCallback`.
"""

from __future__ import annotations

import warnings
from typing import Any

from shardoptim.integrations._unwrap import check_world_size, unwrap_sharded
from shardoptim.optimizer import ShardedOptimizer

__all__ = ["ShardedOptimizerCallback"]  # noqa: F822 - built on first access, by __getattr__

_callback_class: type[Any] | None = None


def _build_callback_class() -> type[Any]:
    """Define ShardedOptimizerCallback on top of transformers.TrainerCallback (imported here)."""
    from transformers import TrainerCallback

    class ShardedOptimizerCallback(TrainerCallback):  # type: ignore[misc, unused-ignore]  # Any without transformers
        """Consolidate the ShardedOptimizer's state on every rank whenever Trainer is about to save.

        Args:
            optimizer: the ShardedOptimizer; None (default) finds it inside the optimizer Trainer
                trains with (`optimizers=(opt, None)`, `optimizer_cls_and_kwargs`, or a subclass's
                `create_optimizer`). A Trainer whose optimizer is not a ShardedOptimizer is left alone.

        The state is consolidated onto rank 0 of the optimizer's process group, which must be the
        process that saves (global rank 0, Trainer's `args.should_save`): true for the default group.
        """

        def __init__(self, optimizer: ShardedOptimizer | None = None) -> None:
            if optimizer is not None and not isinstance(optimizer, ShardedOptimizer):
                raise TypeError(
                    f"ShardedOptimizerCallback(optimizer) takes a shardoptim.ShardedOptimizer, got "
                    f"{type(optimizer).__name__}; pass nothing to use the optimizer Trainer trains with"
                )
            self._optimizer = optimizer

        def _sharded(self, kwargs: dict[str, Any]) -> ShardedOptimizer | None:
            if self._optimizer is not None:
                return self._optimizer
            return unwrap_sharded(kwargs.get("optimizer"))

        def _consolidate(self, args: Any, kwargs: dict[str, Any]) -> None:
            optimizer = self._sharded(kwargs)
            if optimizer is not None and not getattr(args, "save_only_model", False):
                optimizer.consolidate_state_dict(to=0)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            optimizer = self._sharded(kwargs)
            if optimizer is None:
                return
            check_world_size(optimizer, expected=args.world_size, framework="Trainer")
            if optimizer.stage == 2:
                warnings.warn(
                    "ShardedOptimizer(stage=2) under Trainer: Trainer wraps the model in "
                    "DistributedDataParallel, which reduces the gradients a second time, and clips with "
                    "torch.nn.utils.clip_grad_norm_, which sees no gradients at stage 2 (clipping is then "
                    "off). Use stage=1 with Trainer",
                    stacklevel=2,
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # NOTE: the default flow callback (first in Trainer's list) has set should_save by now;
            # _maybe_log_save_evaluate saves right after this event, on rank 0 only.
            if control.should_save:
                self._consolidate(args, kwargs)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if control.should_save:  # save_strategy="epoch", and the save after the last epoch
                self._consolidate(args, kwargs)

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # NOTE: with save_strategy="best" Trainer decides whether to save only after this event
            # (by comparing the new metric), so consolidate after every evaluation.
            if args.save_strategy == "best":
                self._consolidate(args, kwargs)

    ShardedOptimizerCallback.__module__ = __name__
    ShardedOptimizerCallback.__qualname__ = "ShardedOptimizerCallback"  # picklable by name
    return ShardedOptimizerCallback


def __getattr__(name: str) -> Any:
    """Build ShardedOptimizerCallback (importing transformers) on first access."""
    global _callback_class
    if name == "ShardedOptimizerCallback":
        if _callback_class is None:
            _callback_class = _build_callback_class()
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
