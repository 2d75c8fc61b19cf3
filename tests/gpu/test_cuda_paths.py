"""What one GPU can show of the multi-rank CUDA paths: torch's fake process group over real CUDA tensors.

Skipped without a CUDA device. NOTE: written without a GPU (issue 23); none of these has run yet.
One GPU cannot host two NCCL ranks (NCCL refuses two ranks on one device), so the collectives here
go to torch's fake group (private, torch.testing._internal): it lets this process be one rank of
4, with real CUDA parameters, state and kernels, and checks what the rank itself does: no host-
device sync in step() (`torch.cuda.set_sync_debug_mode("error")`), state tensors moved to CUDA
before they are sent. The real multi-rank NCCL checks are tests/gpu/_nccl_checks.py (2+ GPUs,
run by tests/gpu/run_all.sh).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from shardoptim import ShardedGradScaler, ShardedOptimizer, checkpoint, sidegroup

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; on a GPU machine run bash tests/gpu/run_all.sh"
)


@pytest.fixture
def fake4(request: pytest.FixtureRequest) -> Iterator[str]:
    """Make this process rank 1 of 4 in torch's fake group with the given backends."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    dist.init_process_group(request.param, rank=1, world_size=4, store=fake_pg.FakeStore())
    try:
        with mock.patch.object(sidegroup, "HOST_BACKEND", "fake"):  # the CPU side group of a GPU-only group
            yield request.param
    finally:
        dist.destroy_process_group()


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 10))
    return net.to("cuda", dtype)


def _backward(model: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(step)
    x = torch.randn(32, 64, device="cuda", generator=gen)
    loss = model(x.to(next(model.parameters()).dtype)).float().pow(2).mean()
    loss.backward()
    return loss


_STEP_CASES: list[dict[str, Any]] = [
    {},
    {"foreach": True},
    {"stage": 2},
    {"stage": 2, "clip": True},
    {"stage": 2, "master_dtype": torch.float32, "dtype": torch.bfloat16, "clip": True},
]


@pytest.mark.parametrize("fake4", ["cpu:fake,cuda:fake", "cuda:fake"], indirect=True)
@pytest.mark.parametrize("case", _STEP_CASES, ids=str)
def test_step_makes_no_host_sync(fake4: str, case: dict[str, Any]) -> None:
    """step() never syncs: with a CPU backend beside the GPU one (init_distributed's default), and on
    an NCCL-only group (`init_process_group("nccl")`), whose metadata travels on a CPU side group."""
    kwargs = {k: v for k, v in case.items() if k not in ("clip", "dtype")}
    model = _model(case.get("dtype", torch.float32))
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3, **kwargs)
    for step in range(3):
        _backward(model, step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if case.get("clip"):
                opt.clip_grad_norm_(1.0)
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
    assert opt.placement.comm.num_host_reads == 0


@pytest.mark.parametrize("fake4", ["cuda:fake"], indirect=True)
def test_nccl_only_group_reads_once_per_step(fake4: str) -> None:
    """skip_nonfinite on an NCCL-only group: one host read per step (the inf/nan flag), no more."""
    model = _model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=1e-3, skip_nonfinite=True)
    assert opt.placement.comm.device == torch.device("cuda", torch.cuda.current_device())
    before = opt.placement.comm.num_host_reads
    for step in range(3):
        _backward(model, step)
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    assert opt.placement.comm.num_host_reads - before == 3


@pytest.mark.parametrize("fake4", ["cuda:fake"], indirect=True)
@pytest.mark.parametrize("cls", [torch.optim.NAdam, torch.optim.Adagrad, torch.optim.Adam])
def test_consolidation_sends_cpu_scalars_on_cuda(fake4: str, cls: type[torch.optim.Optimizer]) -> None:
    """Rank 1 sends its state to rank 0: `step` (and NAdam's `mu_product`), CPU scalars, go as CUDA tensors."""
    model = _model()
    opt = ShardedOptimizer(model.parameters(), cls, lr=1e-3, foreach=True)
    _backward(model, 0)
    opt.step()
    sent: list[torch.device] = []
    original = opt.placement.comm.send

    def send(tensor: torch.Tensor, **kwargs: Any) -> None:
        sent.append(tensor.device)
        original(tensor, **kwargs)

    opt.placement.comm.send = send  # type: ignore[method-assign]
    opt.consolidate_state_dict(to=0)
    assert sent and all(d.type == "cuda" for d in sent), sent


@pytest.mark.parametrize(
    "cls", [torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Rprop,
            torch.optim.Adadelta, torch.optim.Adagrad, torch.optim.Adam]
)
def test_non_fused_classes_consolidate_and_checkpoint(cls: type[torch.optim.Optimizer], tmp_path: Path) -> None:
    """World size 1 on CUDA: CPU `step` scalars beside CUDA state consolidate to torch's state_dict and round-trip."""
    model = _model()
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(model.parameters(), cls, lr=1e-3, foreach=True)
    ref_opt = cls(ref.parameters(), lr=1e-3, foreach=True)
    for step in range(2):
        _backward(model, step)
        _backward(ref, step)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    opt.consolidate_state_dict(to=0)
    mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    for index, entry in theirs.items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(mine[index][key].to(value.device), value, msg=f"{index} {key}")
    checkpoint.save(tmp_path / "ckpt", opt, model=model)
    fresh = _model()
    opt2 = ShardedOptimizer(fresh.parameters(), cls, lr=1e-3, foreach=True)
    checkpoint.load(tmp_path / "ckpt", opt2, model=fresh)
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("as_view", [False, True])
def test_channels_last_on_cuda(as_view: bool) -> None:
    """channels_last CUDA weights keep their strides (cuDNN's NHWC kernels) and match torch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3))
    model = model.to("cuda", memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    strides = [p.stride() for p in model.parameters()]
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, parameters_as_bucket_view=as_view)
    ref_opt = torch.optim.AdamW(ref.parameters())
    x = torch.randn(4, 8, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    for _ in range(3):
        model(x).square().mean().backward()
        ref(x).square().mean().backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert [p.stride() for p in model.parameters()] == strides
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_stage2_fp16_grad_scaler_matches_torch() -> None:
    """Stage 2, fp16 parameters with fp32 masters and a GradScaler, against torch's AdamW on fp32 copies."""
    model = _model(torch.float16)
    ref = _model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    scaler = ShardedGradScaler("cuda", init_scale=2.0**12)
    for step in range(5):
        gen = torch.Generator(device="cuda").manual_seed(step)
        x = torch.randn(32, 64, device="cuda", generator=gen)
        scaler.scale(model(x.half()).float().pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ref(x).pow(2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert scaler.get_scale() >= 2.0**12
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.float(), q, rtol=1e-2, atol=2e-3)
