"""Find the ShardedOptimizer(s) inside the wrappers that frameworks put around an optimizer.

Must not import any framework: wrappers are recognised by their attributes only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shardoptim.optimizer import ShardedOptimizer

_WRAPPED_ATTRS = ("optimizer", "_optimizer")
"""Where wrappers keep the optimizer they wrap: Accelerate's AcceleratedOptimizer uses `optimizer`,
Lightning's LightningOptimizer `_optimizer`."""
_MAX_DEPTH = 8
"""How many wrappers deep to look (a cycle of wrappers must not loop forever)."""


def unwrap_sharded(optimizer: Any) -> ShardedOptimizer | None:
    """Return the ShardedOptimizer that `optimizer` is or wraps, or None when it wraps none."""
    for _ in range(_MAX_DEPTH):
        if isinstance(optimizer, ShardedOptimizer):
            return optimizer
        inner = next(
            (getattr(optimizer, a) for a in _WRAPPED_ATTRS if getattr(optimizer, a, None) is not None), None
        )
        if inner is None:
            return None
        optimizer = inner
    return None


def sharded_among(optimizers: Iterable[Any]) -> list[ShardedOptimizer]:
    """Return the ShardedOptimizers that the given (possibly wrapped) optimizers are, each once, in order."""
    found: list[ShardedOptimizer] = []
    for optimizer in optimizers:
        sharded = unwrap_sharded(optimizer)
        if sharded is not None and all(sharded is not f for f in found):
            found.append(sharded)
    return found


def check_world_size(optimizer: ShardedOptimizer, *, expected: int, framework: str) -> None:
    """Raise if the optimizer shards over a different number of ranks than the framework runs.

    The usual cause: the optimizer was built before the framework started the process group, so it
    saw a single process and every rank keeps (and updates) the full state.
    """
    if optimizer.world_size != expected:
        raise RuntimeError(
            f"the ShardedOptimizer shards over {optimizer.world_size} rank(s) but {framework} runs "
            f"{expected} processes: it was built before the process group existed (or over another "
            "group). Start the process group first, then build the optimizer: with Trainer create the "
            "TrainingArguments first, with Accelerate the Accelerator first (or call "
            "shardoptim.init_distributed() before building the model and optimizer)"
        )
