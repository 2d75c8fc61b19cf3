"""What the GPU paths change that gloo ranks can show: fp16/bf16 means that cannot overflow.

NCCL averages with ReduceOp.AVG; gloo has no AVG, so there the low-precision bucket is divided by
the world size before the SUM, as DDP does. Old code summed first: 2 ranks x 40000 = 80000 is past
fp16's 65504, an inf, a skipped step and a halved loss scale.
"""

from __future__ import annotations

import torch

from shardoptim.comm import Comm


def _check_low_precision_means(rank: int, world_size: int) -> list[list[float]]:
    comm = Comm()
    comm.gather_method, comm.mpi_reduce = "broadcast", False  # the torch.distributed path, not shared memory
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        value = 40000.0 if dtype == torch.float16 else 3e38
        for bounds in ([0, 8, 16], [0, 5, 16]):  # even ranges (one reduce-scatter), uneven (reduces)
            bucket = torch.full((16,), value, dtype=dtype)
            start, end = bounds[rank], bounds[rank + 1]
            out = torch.zeros(end - start, dtype=dtype)
            comm.reduce_scatter_mean_async(bucket, bounds, out, accumulate=False, what="test").wait()
            results.append(out.float().tolist())
        shard = torch.full((4,), value, dtype=dtype)
        comm.all_reduce_(shard, op="mean", what="test")
        results.append(shard.float().tolist())
    return results


def test_fp16_and_bf16_means_do_not_overflow(ranks2) -> None:  # type: ignore[no-untyped-def]
    for rows in ranks2.run(_check_low_precision_means):
        for row in rows:
            assert all(torch.isfinite(torch.tensor(row))), rows
