"""The baseline benchmarks/balance.py compares the flat layout against: torch ZeroRedundancyOptimizer's
parameter-granular greedy partition (`greedy_param_partition`). Single process, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.balance import greedy_param_partition


def _torch_zero_partition(numels: Sequence[int], num_shards: int) -> list[int]:
    """Transcribe torch ZeroRedundancyOptimizer._partition_parameters for one param group."""
    sizes = [0] * num_shards
    for numel in sorted(numels, reverse=True):
        rank = sizes.index(min(sizes))
        sizes[rank] += numel
    return sizes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), max_size=40), st.integers(1, 64))
def test_greedy_param_partition_matches_torch_zero(numels: list[int], num_shards: int) -> None:
    assert greedy_param_partition(numels, num_shards=num_shards) == _torch_zero_partition(numels, num_shards)


def test_greedy_param_partition_example() -> None:
    # Largest first is not optimal ([5, 5] / [4, 3, 3] would give [10, 10]); torch's partition is the same.
    assert greedy_param_partition([5, 5, 4, 3, 3], num_shards=2) == [9, 11]
    assert greedy_param_partition([100, 1, 1], num_shards=4) == [100, 1, 1, 0]


def test_greedy_param_partition_rejects_no_ranks() -> None:
    with pytest.raises(ValueError, match="num_shards"):
        greedy_param_partition([1], num_shards=0)
