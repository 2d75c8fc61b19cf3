"""Accelerate: consolidate ShardedOptimizer state on every rank before `accelerator.save_state()`.

`save_state()` calls `optimizer.state_dict()` on every rank and writes rank 0's. A ShardedOptimizer
answers that (full state on rank 0, `{}` elsewhere) once `consolidate_state_dict()` ran on every
rank, so `register` adds a save-state pre-hook that runs it:

    accelerator = Accelerator()
    model, opt, dl = accelerator.prepare(model, opt, dl)
    shardoptim.integrations.accelerate.register(accelerator)

`accelerator.load_state()` needs nothing more: it calls `load_state_dict` on every rank with the
full dict. Works with the defaults (`safe_serialization=True`) as long as the parameters keep their
own storage (`parameters_as_bucket_view=False`, the default).

Must not import accelerate at import time (an optional dependency).
"""

from __future__ import annotations

from typing import Any

from shardoptim.integrations._unwrap import check_world_size, sharded_among
from shardoptim.optimizer import ShardedOptimizer

__all__ = ["register"]


def register(accelerator: Any, *optimizers: ShardedOptimizer) -> Any:
    """Consolidate ShardedOptimizer state before every `accelerator.save_state()`.

    The hook is collective, like `save_state()` itself: call `save_state()` on every rank (as
    Accelerate requires anyway). The state goes to rank 0 of each optimizer's process group, which
    must be the process that writes (Accelerate's main process): true for the default group.

    Args:
        accelerator: an `accelerate.Accelerator`.
        *optimizers: the ShardedOptimizers to consolidate; none (default): every ShardedOptimizer
            among those prepared by `accelerator` at the time of each save (found inside their
            AcceleratedOptimizer wrappers).

    Returns:
        The hook's `torch.utils.hooks.RemovableHandle` (`handle.remove()` unregisters it).

    Raises:
        TypeError: an argument is not a ShardedOptimizer.
        RuntimeError: an optimizer shards over a different number of ranks than Accelerate runs
            (it was built before the Accelerator started the process group).
    """
    for optimizer in optimizers:
        if not isinstance(optimizer, ShardedOptimizer):
            raise TypeError(
                f"register(accelerator, *optimizers) takes shardoptim.ShardedOptimizer instances, got "
                f"{type(optimizer).__name__}; pass none to use every ShardedOptimizer that accelerator prepared"
            )
        check_world_size(optimizer, expected=accelerator.num_processes, framework="Accelerate")

    def consolidate_before_save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        targets = list(optimizers) or sharded_among(accelerator._optimizers)
        for optimizer in targets:
            check_world_size(optimizer, expected=accelerator.num_processes, framework="Accelerate")
            optimizer.consolidate_state_dict(to=0)

    return accelerator.register_save_state_pre_hook(consolidate_before_save)
