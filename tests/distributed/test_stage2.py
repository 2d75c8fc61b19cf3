"""ZeRO stage 2, master weights, global clipping and inf/nan skipping, against DDP + torch.optim.

Stage 2 reduces gradients with a reduce-scatter in a different order than DDP's all-reduce, so
parity at 2-3 ranks is allclose at fp32 rounding; at world size 1 it is bitwise (tests/unit).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shardoptim import ShardedGradScaler, ShardedOptimizer
from shardoptim.grads import POOL_SIZE
from tests._dist import all_equal_across_ranks

RTOL, ATOL = 1e-5, 1e-6


class _Net(torch.nn.Module):
    """Parameters cut across ranks, one unused everywhere, one used on rank 0 only."""

    def __init__(self, rank: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.rank = rank
        self.a = torch.nn.Linear(24, 37, dtype=dtype)
        self.b = torch.nn.Linear(37, 3, dtype=dtype)
        self.only_rank0 = torch.nn.Linear(24, 3, dtype=dtype)
        self.unused = torch.nn.Parameter(torch.randn(5, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.a.weight.dtype)
        out = self.b(torch.tanh(self.a(x)))
        if self.rank == 0:
            out = out + self.only_rank0(x)
        return out.float()


def _batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    return torch.randn(4, 24, generator=gen), torch.randn(4, 3, generator=gen)


def _loss(model: torch.nn.Module, step: int, micro: int, rank: int) -> torch.Tensor:
    x, y = _batch(step, micro, rank)
    return torch.nn.functional.mse_loss(model(x), y)


def _check_parity_with_ddp(
    rank: int,
    world_size: int,
    *,
    cls_name: str,
    opts: dict[str, Any],
    micro: int,
    no_sync: bool,
    clip: float | None,
) -> None:
    torch.manual_seed(0)
    model = _Net(rank)
    ref = copy.deepcopy(model)
    ddp = DDP(ref, find_unused_parameters=True)
    cls = getattr(torch.optim, cls_name)
    ref_opt = cls(ref.parameters(), **opts)
    opt = ShardedOptimizer(model.parameters(), cls, stage=2, bucket_numel=700, **opts)
    assert len(opt.placement.buckets) > 1  # several buckets: launch order and partial readiness matter
    for step in range(4):
        for m in range(micro):
            last = m == micro - 1
            ctx = opt.no_sync() if no_sync and not last else torch.enable_grad()
            with ctx:
                _loss(model, step, m, rank).backward()
            ref_ctx = ddp.no_sync() if no_sync and not last else torch.enable_grad()
            with ref_ctx:
                _loss(ddp, step, m, rank).backward()
        if clip is not None:
            ours = opt.clip_grad_norm_(clip)
            theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
        assert ref.unused.grad is None  # DDP leaves a globally unused parameter without a gradient
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(
                p, q, rtol=RTOL, atol=ATOL, msg=lambda m, n=name, s=step: f"{n} step {s}: {m}"
            )
            assert all_equal_across_ranks(p.detach())
    assert torch.equal(model.unused, ref.unused)  # no gradient anywhere: never stepped


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(
    "cls_name,opts,micro,no_sync,clip",
    [
        ("AdamW", dict(lr=1e-2, weight_decay=0.1), 1, False, None),
        ("AdamW", dict(lr=1e-2, weight_decay=0.1), 3, False, 0.5),
        ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01), 3, True, None),
        ("Adam", dict(lr=1e-2, amsgrad=True), 2, True, 0.1),
    ],
)
def test_stage2_matches_ddp(
    pool_for: Any,
    world_size: int,
    cls_name: str,
    opts: dict[str, Any],
    micro: int,
    no_sync: bool,
    clip: float | None,
) -> None:
    pool_for(world_size).run(
        _check_parity_with_ddp, cls_name=cls_name, opts=opts, micro=micro, no_sync=no_sync, clip=clip
    )


def _check_tensor_sharding_stage2(rank: int, world_size: int) -> None:
    torch.manual_seed(1)
    model = _Net(rank)
    ref = copy.deepcopy(model)
    ddp = DDP(ref, find_unused_parameters=True)
    ref_opt = torch.optim.Adafactor(ref.parameters(), lr=1e-2)
    opt = ShardedOptimizer(model.parameters(), torch.optim.Adafactor, stage=2, lr=1e-2)
    assert opt.sharding == "tensor"
    for step in range(3):
        _loss(model, step, 0, rank).backward()
        _loss(ddp, step, 0, rank).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_stage2_whole_tensor_sharding(ranks3: Any) -> None:
    ranks3.run(_check_tensor_sharding_stage2)


def _check_memory_is_sharded(rank: int, world_size: int) -> dict[str, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, bucket_numel=1 << 12)
    model(torch.randn(8, 64)).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # full gradients were released
    opt.step()
    sizes = opt.memory_nbytes()
    owned = opt.rank_to_numel()[rank]
    assert sum(opt.rank_to_numel()) == 2 * (64 * 64 + 64)
    assert max(opt.rank_to_numel()) <= 2 * (64 * 64 + 64) / world_size + 64
    # the shards span this rank's range of each bucket: its elements plus alignment padding
    shards = sum(t.numel() * t.element_size() for t in opt._reducer.shards())
    assert owned * 4 <= shards <= (owned + 64 * len(opt.placement.buckets)) * 4
    # plus at most POOL_SIZE full buckets kept for reuse
    largest = max(b.numel * b.segments.element_size() for b in opt.placement.buckets)
    assert shards < sizes["grads"] <= shards + POOL_SIZE * largest
    assert sizes["state"] == 2 * owned * 4 + 4 * len(opt.optim.state)  # exp_avg, exp_avg_sq, 4-byte steps
    return sizes


def test_stage2_gradient_memory_is_total_over_n(ranks2: Any) -> None:
    ranks2.run(_check_memory_is_sharded)


def _check_master_weights(rank: int, world_size: int, *, stage: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    ref = copy.deepcopy(model)
    low = copy.deepcopy(model).to(torch.bfloat16)
    net = DDP(low) if stage == 1 else low
    opt = ShardedOptimizer(
        low.parameters(), torch.optim.AdamW, stage=stage, master_dtype=torch.float32, lr=1e-3
    )
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    assert opt.memory_nbytes()["master"] > 0
    for step in range(5):
        x, y = _batch(step, 0, rank)
        x = x[:, :16]
        torch.nn.functional.mse_loss(net(x.bfloat16()).float(), y).backward()
        for r in range(world_size):
            xr, yr = _batch(step, 0, r)
            (torch.nn.functional.mse_loss(ref(xr[:, :16]), yr) / world_size).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(low.parameters(), ref.parameters()):
        assert p.dtype == torch.bfloat16
        # bf16 rounding of the weights (2^-8 relative) plus lr-sized drift from bf16 gradients
        torch.testing.assert_close(p.float(), q, rtol=2**-7, atol=2e-3)
        assert all_equal_across_ranks(p.detach())


@pytest.mark.parametrize("stage", [1, 2])
def test_master_weights_track_fp32_reference(ranks2: Any, stage: int) -> None:
    ranks2.run(_check_master_weights, stage=stage)


def _regression_loss(rank: int, world_size: int, *, master: bool, steps: int) -> float:
    """Final fp32 loss of a bf16 linear regression trained with AdamW, with or without fp32 masters."""
    gen = torch.Generator().manual_seed(5)
    w_true = torch.randn(32, 1, generator=gen)
    x = torch.randn(256, 32, generator=gen)
    y = x @ w_true
    model = torch.nn.Linear(32, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_((w_true.T + 0.5).bfloat16())
    opt = ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        stage=2,
        master_dtype=torch.float32 if master else None,
        lr=1e-3,
    )
    shard = slice(rank * 128 // world_size, (rank + 1) * 128 // world_size)
    for _ in range(steps):
        torch.nn.functional.mse_loss(model(x[shard].bfloat16()).float(), y[shard]).backward()
        opt.step()
        opt.zero_grad()
    return torch.nn.functional.mse_loss(x @ model.weight.float().T, y).item()


def test_master_weights_beat_pure_bf16(ranks2: Any) -> None:
    master = ranks2.run(_regression_loss, master=True, steps=200)
    pure = ranks2.run(_regression_loss, master=False, steps=200)
    assert master[0] == master[1] and pure[0] == pure[1]
    # lr=1e-3 updates are below half a bf16 ulp of weights near 1: pure bf16 stalls
    assert master[0] < 0.5 * pure[0], (master, pure)


def _check_nan_on_one_rank_skips(rank: int, world_size: int, *, stage: int) -> list[bool]:
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3)
    net = DDP(model) if stage == 1 else model
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=stage, skip_nonfinite=True, lr=0.1)
    skipped = []
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        loss = net(torch.randn(4, 10)).sum()
        if step == 1 and rank == world_size - 1:
            loss = loss * float("nan")
        loss.backward()
        if stage == 1 and step == 1 and rank == world_size - 1:
            model.weight.grad[0, 0] = float("inf")  # a rank-local inf DDP did not average away
        opt.step()
        opt.zero_grad()
        skipped.append(opt.last_step_skipped)
        unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert unchanged == opt.last_step_skipped
        for p in model.parameters():
            assert all_equal_across_ranks(p.detach())
    assert opt.num_skipped_steps == 1
    return skipped


@pytest.mark.parametrize("stage", [1, 2])
def test_nonfinite_on_one_rank_skips_everywhere(ranks3: Any, stage: int) -> None:
    assert ranks3.run(_check_nan_on_one_rank_skips, stage=stage) == [[False, True, False]] * 3


def _check_clip_norm_types(rank: int, world_size: int, *, norm_type: float, stage: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 7))
    ref = copy.deepcopy(model)
    net = DDP(model) if stage == 1 else model
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=stage, lr=0.1)
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(rank))
    net(x).pow(2).sum().backward()
    xs = torch.cat(
        [torch.randn(5, 30, generator=torch.Generator().manual_seed(r)) for r in range(world_size)]
    )
    (ref(xs).pow(2).sum() / world_size).backward()
    theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3, norm_type=norm_type)
    ours = opt.clip_grad_norm_(0.3, norm_type=norm_type)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    opt.step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_type,stage", [(2.0, 2), (1.0, 2), (math.inf, 2), (2.0, 1), (math.inf, 1)])
def test_clip_grad_norm_matches_torch(ranks3: Any, norm_type: float, stage: int) -> None:
    ranks3.run(_check_clip_norm_types, norm_type=norm_type, stage=stage)


def _check_grad_scaler(rank: int, world_size: int) -> tuple[list[bool], float]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.float16)
    opt = ShardedOptimizer(
        model.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, lr=1e-2
    )
    scaler = ShardedGradScaler("cpu", init_scale=2.0**15, growth_interval=1000)
    skipped = []
    for step in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.randn(16, 8).half() * (300.0 if step == 0 and rank == 1 else 1.0)  # fp16 overflow once
        loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        opt.clip_grad_norm_(1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        skipped.append(all(torch.equal(p, b) for p, b in zip(model.parameters(), before)))
        for p in model.parameters():
            assert all_equal_across_ranks(p.detach())
    return skipped, scaler.get_scale()


def test_sharded_grad_scaler_skips_overflow_on_every_rank(ranks2: Any) -> None:
    results = ranks2.run(_check_grad_scaler)
    assert results[0] == results[1]
    skipped, scale = results[0]
    assert skipped == [True, False, False, False]
    assert scale == 2.0**14  # halved once, for the one overflow


def _check_master_checkpoint(rank: int, world_size: int, tmp: str) -> None:
    from shardoptim import checkpoint

    def build() -> tuple[torch.nn.Module, ShardedOptimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.Linear(9, 2)).to(torch.bfloat16)
        return model, ShardedOptimizer(
            model.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, lr=1e-3
        )

    def train(model: torch.nn.Module, opt: ShardedOptimizer, steps: range) -> None:
        for step in steps:
            x, _ = _batch(step, 0, rank)
            model(x[:, :12].bfloat16()).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    train(model, opt, range(3))
    opt.consolidate_state_dict(to=0)
    full = opt.state_dict() if rank == 0 else None
    if rank == 0:
        entry = full["state"][0]
        assert entry["master_param"].dtype == torch.float32 and entry["master_param"].shape == (9, 12)
        assert entry["exp_avg"].dtype == torch.float32
    checkpoint.save(f"{tmp}/ckpt", opt, model=model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    objs = [full]
    dist.broadcast_object_list(objs, src=0)
    train(model, opt, range(3, 6))
    expected = [p.detach().clone() for p in model.parameters()]
    for source in ("consolidated", "sharded"):
        model2, opt2 = build()
        if source == "consolidated":
            model2.load_state_dict(snapshot)
            opt2.load_state_dict(objs[0])
        else:
            checkpoint.load(f"{tmp}/ckpt", opt2, model=model2)
        train(model2, opt2, range(3, 6))
        for p, q in zip(model2.parameters(), expected):
            assert torch.equal(p, q), source


def test_master_weights_survive_checkpoints(ranks2: Any, tmp_path: Any) -> None:
    ranks2.run(_check_master_checkpoint, tmp=str(tmp_path))


def _check_mpi_backend_needs_mpirun(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="comm_backend='mpi' but MPI cannot serve this group"):
        ShardedOptimizer(torch.nn.Linear(3, 2).parameters(), torch.optim.SGD, comm_backend="mpi", lr=0.1)


def test_mpi_backend_without_mpirun_is_refused_on_every_rank(ranks2: Any) -> None:
    ranks2.run(_check_mpi_backend_needs_mpirun)


def _check_flags_with_hparam_mode(rank: int, world_size: int, *, mode: str) -> None:
    torch.manual_seed(0)
    model = _Net(rank)
    ref = copy.deepcopy(model)
    ddp = DDP(ref, find_unused_parameters=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        stage=2,
        hparam_sync=mode,
        skip_nonfinite=True,
        lr=1e-2,
        weight_decay=0.1,
    )
    for step in range(3):
        _loss(model, step, 0, rank).backward()
        _loss(ddp, step, 0, rank).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert not opt.last_step_skipped
    assert torch.equal(model.unused, ref.unused)  # the "no gradient anywhere" flag also travels alone ("off")
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["check", "off"])
def test_step_flags_travel_with_every_hparam_mode(ranks2: Any, mode: str) -> None:
    ranks2.run(_check_flags_with_hparam_mode, mode=mode)
