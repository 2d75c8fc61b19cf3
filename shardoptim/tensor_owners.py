"""Pure math: which rank owns each whole tensor, balancing a cost (elements, or Muon's flops) over ranks.

`assign_whole_tensors` is a longest-processing-time-first bin packing, deterministic on every rank;
`muon_cost` is the cost of orthogonalising one matrix, for optimizers whose step costs that much
per tensor. The owners feed shardoptim.tensor_layout. This module must not import torch,
torch.distributed or the rest of shardoptim (shardoptim.layout re-exports `muon_cost`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["assign_whole_tensors", "muon_cost"]


def assign_whole_tensors(
    costs: Sequence[float], *, num_shards: int, initial_loads: Sequence[float] | None = None
) -> list[int]:
    """Assign every tensor to one rank, balancing the summed cost (longest processing time first).

    Ties are broken by index and by rank, so the result is the same on every rank.
    `initial_loads` (one per rank) is the cost each rank already carries, e.g. from earlier groups.

    Returns:
        `index_to_owner`: the owning rank of each tensor.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    if initial_loads is not None and len(initial_loads) != num_shards:
        raise ValueError(f"initial_loads needs one value per rank ({num_shards}), got {len(initial_loads)}")
    heap = [
        (0.0 if initial_loads is None else float(initial_loads[rank]), rank) for rank in range(num_shards)
    ]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for index in order:
        load, rank = heapq.heappop(heap)
        owners[index] = rank
        heapq.heappush(heap, (load + costs[index], rank))
    return owners


def muon_cost(shape: Sequence[int]) -> float:
    """Return the cost of orthogonalising a matrix of `shape`: m * n * min(m, n) flops up to a factor."""
    if len(shape) < 2:
        return float(max(1, *shape) if shape else 1)
    m, n = shape[0], 1
    for d in shape[1:]:
        n *= d
    return float(m * n * min(m, n))
