"""The shared-memory staging area: bounded size, many rounds, exact results, any call order.

A tiny staging half forces every path through many rounds: buckets cut across rounds, several
buckets sharing a round, uneven and empty rank ranges, bf16 buckets summed into fp32, and gathers
and reduce-scatters interleaved on the one area (its halves alternate across calls).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from shardoptim.segments import Segments
from shardoptim.shm import SharedStaging


def _contribution(rank: int, numel: int, dtype: torch.dtype, call: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * call + rank)
    return torch.randn(numel, generator=gen).to(dtype)


def _all_gather_object(obj: object) -> list[object]:
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier(what: str) -> None:
    dist.barrier()


def _check_staging(rank: int, world_size: int, *, half_nbytes: int) -> int:
    staging = SharedStaging(rank, world_size, _all_gather_object, _barrier, half_nbytes=half_nbytes, timeout_s=60.0)
    # (numel, bounds): even, uneven (whole-tensor style), one rank empty, smaller than a round.
    cases = [
        (1000, [0, 334, 667, 1000][:world_size] + [1000]),
        (999, [0, 10, 900, 999][:world_size] + [999]),
        (700, [0, 0, 300, 700][:world_size] + [700]),
        (37, [0, 12, 25, 37][:world_size] + [37]),
    ]
    call = 0
    for _ in range(2):
        for dtype in (torch.float32, torch.bfloat16):
            # gather: each rank fills its own range with its values; all ranks end with all values
            full = [_contribution(0, n, dtype, call) for n, _ in cases]
            buckets = [torch.full((n,), float("nan")).to(dtype) for n, _ in cases]
            for bucket, ref, (_, bounds) in zip(buckets, full, cases):
                bucket[bounds[rank] : bounds[rank + 1]] = ref[bounds[rank] : bounds[rank + 1]]
            # and one bucket held in segments (parameters in their own storage): padding between
            # and after them, rank ranges cutting through segments and padding alike
            seg_numel, seg_bounds = 1000, [0, 310, 700, 1000][:world_size] + [1000]
            spans = [(0, 300), (320, 500), (832, 100)]
            seg_ref = _contribution(7, seg_numel, dtype, call)
            seg_parts = [torch.full((n,), float("nan")).to(dtype) for _, n in spans]
            for (start, n), part in zip(spans, seg_parts):
                lo, hi = max(start, seg_bounds[rank]), min(start + n, seg_bounds[rank + 1])
                if lo < hi:
                    part[lo - start : hi - start] = seg_ref[lo:hi]
            segmented = Segments(list(zip([start for start, _ in spans], seg_parts)), seg_numel)
            assert staging.gather_many_(
                [(b, bounds) for b, (_, bounds) in zip(buckets, cases)] + [(segmented, seg_bounds)]
            )
            assert all(torch.equal(b, ref) for b, ref in zip(buckets, full))
            for (start, n), part in zip(spans, seg_parts):
                assert torch.equal(part, seg_ref[start : start + n]), (rank, start, n, dtype)
            call += 1
            # reduce-scatter: the same sum, in rank order, as a direct computation
            for numel, bounds in cases:
                start, end = bounds[rank], bounds[rank + 1]
                parts = [_contribution(r, numel, dtype, call) for r in range(world_size)]
                for accumulate in (False, True):
                    out = torch.ones(end - start, dtype=torch.float32)
                    assert staging.reduce_scatter_(
                        parts[rank].clone(), bounds, out, accumulate=accumulate, scale=1.0 / world_size
                    )
                    ref = torch.ones(end - start, dtype=torch.float32)
                    if accumulate:
                        for part in parts:
                            ref.add_(part[start:end], alpha=1.0 / world_size)
                    else:
                        ref.copy_(parts[0][start:end])
                        for part in parts[1:]:
                            ref.add_(part[start:end])
                        ref.mul_(1.0 / world_size)
                    assert torch.equal(out, ref), (numel, bounds, dtype, accumulate)
                call += 1
    return staging.nbytes


def test_staging_is_bounded_and_exact(ranks3: Any) -> None:
    """Many rounds through a 1 KiB half give the exact gathers and rank-ordered sums."""
    assert ranks3.run(_check_staging, half_nbytes=1024) == [2 * 1024 + 3 * 64] * 3


def test_staging_one_round_per_call(ranks2: Any) -> None:
    """A half larger than every bucket: one round per call, the same results."""
    assert ranks2.run(_check_staging, half_nbytes=1 << 16) == [(2 << 16) + 2 * 64] * 2
