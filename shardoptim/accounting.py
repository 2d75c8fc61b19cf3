"""What one rank's optimizer holds in memory: state, parameters, gradients, master copies.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from shardoptim.grads import GradReducer
from shardoptim.master import MASTER_KEY
from shardoptim.placement import Placement


def local_state_nbytes(optim: Optimizer) -> int:
    """Return the bytes of the state tensors of the local optimizer `optim` (master copies excluded)."""
    return sum(nbytes(value) for state in optim.state.values() for key, value in state.items() if key != MASTER_KEY)


def memory_nbytes(placement: Placement, optim: Optimizer, reducer: GradReducer | None) -> dict[str, int]:
    """Return this rank's bytes of "params", "grads", "state" and "master" (see ShardedOptimizer.memory_nbytes)."""
    params = placement.params
    grads = sum(nbytes(p.grad) for p in params)  # stage 1; at stage 2 left by no_sync()
    if reducer is not None:
        grads += reducer.allocated_nbytes()  # shards and pooled full buckets
    return {
        "params": sum(nbytes(b.buffer) for b in placement.buckets if b.buffer is not None)
        + placement.storage.extra_nbytes(params)
        + (sum(nbytes(p) for p in params) if placement.kind == "replicated" else 0),
        "grads": grads,
        "state": local_state_nbytes(optim),
        "master": placement.masters.nbytes(),
    }


def nbytes(value: object) -> int:
    """Bytes of a tensor, or of the tensors in a list or tuple; 0 for anything else."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0
