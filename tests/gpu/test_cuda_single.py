"""CUDA checks on one GPU (world size 1): fused kernels, stage 2, master weights, clipping, loss scaling.

Skipped without a CUDA device: the CPU machines of CI have none. On a GPU machine run
`python -m pytest -q tests/gpu`. Multi-rank NCCL needs one GPU per rank: tests/gpu/_nccl_checks.py
(run by tests/gpu/run_all.sh on 2+ GPUs); test_cuda_paths.py checks one rank of a fake group here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from shardoptim import ShardedGradScaler, ShardedOptimizer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; on a GPU machine run pytest tests/gpu"
)


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 10))
    return net.to("cuda", dtype)


def _loss(model: torch.nn.Module, step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(100 * step + micro)
    x = torch.randn(32, 64, device="cuda", generator=gen)
    return model(x.to(next(model.parameters()).dtype)).float().pow(2).mean()


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_adamw_is_bitwise_torch(stage: int) -> None:
    model = _model()
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=stage, lr=1e-3, weight_decay=0.1)
    assert opt.defaults["fused"] is True  # fused where torch has a CUDA kernel
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    for step in range(5):
        for micro in range(2):
            with opt.no_sync() if stage == 2 and micro == 0 else torch.enable_grad():
                _loss(model, step, micro).backward()
            _loss(ref, step, micro).backward()
        torch.testing.assert_close(
            opt.clip_grad_norm_(1.0), torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0), rtol=0, atol=0
        )
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.device.type == "cuda" and torch.equal(p, q)


def test_bf16_master_weights_track_fp32() -> None:
    ref = _model()
    low = copy.deepcopy(ref).to(torch.bfloat16)
    opt = ShardedOptimizer(low.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)
    for step in range(5):
        _loss(low, step, 0).backward()
        _loss(ref, step, 0).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert opt.memory_nbytes()["master"] > 0
    for p, q in zip(low.parameters(), ref.parameters()):
        torch.testing.assert_close(p.float(), q, rtol=2**-7, atol=2e-3)


def test_fp16_loss_scaling_skips_an_overflow() -> None:
    model = _model(torch.float16)
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, lr=1e-3)
    scaler = ShardedGradScaler("cuda", init_scale=2.0**15)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(_loss(model, 0, 0) * 1e4).backward()  # overflows fp16 at this scale
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0**14
    scaler.scale(_loss(model, 1, 0)).backward()
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
