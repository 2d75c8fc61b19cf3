"""shardoptim: shard the state (ZeRO-1) and gradients (ZeRO-2) of any torch.optim optimizer across ranks.

Public API only; see README.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shardoptim.amp import ShardedGradScaler
from shardoptim.entry import EntryError
from shardoptim.hybrid import HybridGroups, hybrid_groups
from shardoptim.kinds import register_elementwise, register_per_tensor
from shardoptim.launcher import DistInfo, init_distributed
from shardoptim.metrics import all_reduce_metric
from shardoptim.optimizer import DEFAULT_BUCKET_NUMEL, ShardedOptimizer
from shardoptim.verify import VerifyResult, verify

if TYPE_CHECKING:
    from shardoptim import checkpoint  # a module: shardoptim.checkpoint.save/load

__all__ = [
    "DEFAULT_BUCKET_NUMEL",
    "DistInfo",
    "EntryError",
    "HybridGroups",
    "ShardedGradScaler",
    "ShardedOptimizer",
    "VerifyResult",
    "all_reduce_metric",
    "checkpoint",
    "hybrid_groups",
    "init_distributed",
    "register_elementwise",
    "register_per_tensor",
    "verify",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # NOTE: shardoptim.checkpoint is imported on first use, so that `python -m shardoptim.checkpoint`
    # does not find it already imported (runpy warns then).
    if name == "checkpoint":
        return importlib.import_module("shardoptim.checkpoint")
    raise AttributeError(f"module 'shardoptim' has no attribute {name!r}")
