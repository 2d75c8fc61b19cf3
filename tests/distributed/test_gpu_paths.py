"""What the GPU paths change that gloo ranks can show: fp16/bf16 means that cannot overflow, memory formats.

NCCL averages with ReduceOp.AVG; gloo has no AVG, so there the low-precision bucket is divided by
the world size before the SUM, as DDP does (and before the shared-memory path, which sums in the
output's dtype). Old code summed first: 2 ranks x 40000 = 80000 is past
fp16's 65504, an inf, a skipped step and a halved loss scale.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from shardoptim import ShardedOptimizer, checkpoint
from shardoptim.comm import Comm


def _check_low_precision_means(rank: int, world_size: int) -> list[list[float]]:
    results = []
    for method in ("broadcast", "shm"):  # the torch.distributed path, the shared-memory one
        comm = Comm()
        comm.transports.use(method)  # type: ignore[arg-type]
        results += _means(comm)
    return results


def _means(comm: Comm) -> list[list[float]]:
    results = []
    rank = comm.rank
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
            assert all(torch.isfinite(torch.tensor(row))) and min(row) > 1e4, rows  # the mean: the value itself


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
    return model.to(memory_format=torch.channels_last)


def _steps_side_by_side(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    ref: torch.nn.Module,
    ref_opt: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    steps: int,
) -> None:
    """Train `model` with `opt` and its copy `ref` with `ref_opt` on the same input, `steps` steps."""
    for _ in range(steps):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()


def _check_channels_last(rank: int, world_size: int, *, path: str) -> list[str]:
    """channels_last weights keep their strides in both storage modes and stages; values match torch's."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last)
    seen = []
    for stage in (1, 2):
        for as_view in (False, True):
            model = _conv_model()
            ref = copy.deepcopy(model)
            strides = [p.stride() for p in model.parameters()]
            assert strides[0] == (36, 1, 12, 4), strides[0]
            opt = ShardedOptimizer(
                model.parameters(), torch.optim.AdamW, stage=stage, parameters_as_bucket_view=as_view, lr=1e-2
            )
            ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
            _steps_side_by_side(model, opt, ref, ref_opt, x, steps=2)
            where = f"stage {stage}, bucket view {as_view}"
            assert [p.stride() for p in model.parameters()] == strides, where
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, msg=where)
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                state = opt.state_dict()["state"]
                for i, q in enumerate(ref.parameters()):
                    torch.testing.assert_close(state[i]["exp_avg"], ref_opt.state[q]["exp_avg"], msg=where)
            seen.append(where)
    # A checkpoint of the channels_last run loads into a row-major model with the same values.
    checkpoint.save(path, opt, model=model)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert plain[0].weight.is_contiguous()
    opt2 = ShardedOptimizer(plain.parameters(), torch.optim.AdamW, lr=1e-2)
    checkpoint.load(path, opt2, model=plain)
    opt2.consolidate_state_dict(to=0)
    if rank == 0:
        state = opt2.state_dict()["state"]
        for i, q in enumerate(ref.parameters()):
            torch.testing.assert_close(state[i]["exp_avg"], ref_opt.state[q]["exp_avg"], msg="checkpoint")
    return seen


def test_channels_last_parameters_keep_their_strides(ranks2, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert all(len(seen) == 4 for seen in ranks2.run(_check_channels_last, path=str(tmp_path / "ckpt")))


def _check_uneven_ranges_one_call(rank: int, world_size: int) -> dict[str, int]:
    """Uneven ranges (whole-tensor layouts) on the all_gather method (NCCL's): one collective per bucket."""
    from unittest import mock

    import torch.distributed as dist

    from shardoptim import transports

    calls = {"per_owner": 0, "one": 0}

    def counting(name: str, fn: object) -> object:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            return fn(*args, **kwargs)  # type: ignore[operator]

        return wrapper

    comm = Comm()
    comm.transports.use("all_gather")
    bounds = [0, 3, 7] if world_size == 2 else [0, 3, 7, 9]
    with (
        mock.patch.object(dist, "broadcast", counting("per_owner", dist.broadcast)),
        mock.patch.object(dist, "reduce", counting("per_owner", dist.reduce)),
        mock.patch.object(transports, "all_gather_single", counting("one", transports.all_gather_single)),
        mock.patch.object(transports, "reduce_scatter_single", counting("one", transports.reduce_scatter_single)),
    ):
        bucket = torch.zeros(bounds[-1])
        bucket[bounds[rank] : bounds[rank + 1]] = rank + 1.0
        comm.gather_bucket_async(bucket, bounds, what="test").wait()
        expected = torch.cat([torch.full((hi - lo,), r + 1.0) for r, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
        assert torch.equal(bucket, expected), bucket
        out = torch.zeros(bounds[rank + 1] - bounds[rank])
        grads = torch.arange(float(bounds[-1])) * (rank + 1)
        comm.reduce_scatter_mean_async(grads, bounds, out, accumulate=False, what="test").wait()
        mean = torch.arange(float(bounds[-1])) * (world_size + 1) / 2
        torch.testing.assert_close(out, mean[bounds[rank] : bounds[rank + 1]])
    # A whole-tensor class end to end on that path (stage 2: both transports), against torch's.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 5))
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(model.parameters(), torch.optim.Adafactor, stage=2, lr=1e-2)
    opt.placement.comm.transports.use("all_gather")
    ref_opt = torch.optim.Adafactor(ref.parameters(), lr=1e-2)
    x = torch.randn(4, 8)
    _steps_side_by_side(model, opt, ref, ref_opt, x, steps=2)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    return calls


def test_uneven_ranges_cost_one_collective(ranks2) -> None:  # type: ignore[no-untyped-def]
    """Old: one broadcast per owner to gather, one reduce per owner to reduce-scatter (N calls each)."""
    for calls in ranks2.run(_check_uneven_ranges_one_call):
        assert calls == {"per_owner": 0, "one": 2}, calls
