"""The distributed GPU checks under NCCL, one GPU per rank (2+ GPUs). Written without a GPU: never run yet.

Launch (tests/gpu/run_all.sh does, once per backend):

    torchrun --standalone --nproc-per-node 2 tests/gpu/_nccl_checks.py --backend nccl
    torchrun --standalone --nproc-per-node 2 tests/gpu/_nccl_checks.py --backend cpu:gloo,cuda:nccl
    torchrun --standalone --nproc-per-node 2 tests/gpu/_nccl_checks.py --backend default

"default" calls init_process_group() without a backend (it reports "undefined"; NCCL only on a GPU
host). The gloo suites under tests/distributed build CPU tensors and cannot run under NCCL as they
are; this script runs the checks of issue 23 on CUDA tensors instead: the device of the small
collectives, consolidation with CPU `step` scalars beside CUDA state (NAdam, Adam foreach),
sharded checkpoints saved and read back at once (the host barrier), stage 2 fp16 with a GradScaler,
channels_last, uneven ranges (Adafactor) and fp16 means that cannot overflow. Every rank prints
"SHARDOPTIM_NCCL_OK rank=R backend=B" at the end; any failure raises (torchrun exits non-zero).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shardoptim import ShardedGradScaler, ShardedOptimizer, checkpoint  # noqa: E402
from shardoptim.comm import Comm  # noqa: E402
from shardoptim.launcher import cuda_device_index  # noqa: E402


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, *, channels_last: bool = False) -> None:
    """The same data on every rank, so every rank's reference is the unsharded run."""
    for step in range(steps):
        gen = torch.Generator(device="cuda").manual_seed(step)
        if channels_last:
            x = torch.randn(4, 8, 12, 12, device="cuda", generator=gen).to(memory_format=torch.channels_last)
        else:
            x = torch.randn(32, 64, device="cuda", generator=gen)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 10)).cuda()


def check_devices(backend: str) -> None:
    comm = Comm()
    expected = "cpu" if backend.startswith("cpu") else "cuda"
    assert comm.device.type == expected, (backend, comm.device)
    comm.barrier(what="check barrier")


def check_consolidation(cls: type[torch.optim.Optimizer], **kwargs: object) -> None:
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(model.parameters(), cls, lr=1e-3, **kwargs)
    ref_opt = cls(ref.parameters(), lr=1e-3, **kwargs)
    _train(model, opt, 3)
    _train(ref, ref_opt, 3)
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        mine, theirs = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        for index, entry in theirs.items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(mine[index][key].to(value.device), value, msg=f"{cls.__name__} {key}")
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def check_checkpoints(root: str) -> None:
    """Save, change, save again and load at once: every rank must read the second checkpoint."""
    model = _mlp()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3, stage=2)
    _train(model, opt, 2)
    checkpoint.save(root, opt, model=model)
    _train(model, opt, 1)
    checkpoint.save(root, opt, model=model)
    expected = [p.detach().clone() for p in model.parameters()]
    fresh = _mlp()
    opt2 = ShardedOptimizer(fresh.parameters(), torch.optim.AdamW, lr=1e-3, stage=2)
    checkpoint.load(root, opt2, model=fresh)
    for p, q in zip(fresh.parameters(), expected):
        assert torch.equal(p, q)


def check_fp16_grad_scaler() -> None:
    model = _mlp().half()
    ref = _mlp()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    scaler = ShardedGradScaler("cuda", init_scale=2.0**15)
    for step in range(5):
        x = torch.randn(32, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step))
        scaler.scale(model(x.half()).float().square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert opt.num_skipped_steps == 0 and scaler.get_scale() >= 2.0**15, (opt.num_skipped_steps, scaler.get_scale())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.float(), q, rtol=1e-2, atol=2e-3)


def check_channels_last_and_uneven() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3))
    conv = conv.to("cuda", memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    strides = [p.stride() for p in conv.parameters()]
    _train(conv, ShardedOptimizer(conv.parameters(), torch.optim.AdamW, stage=2), 3, channels_last=True)
    _train(ref, torch.optim.AdamW(ref.parameters()), 3, channels_last=True)
    assert [p.stride() for p in conv.parameters()] == strides
    for p, q in zip(conv.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    model = _mlp()
    ref = copy.deepcopy(model)
    _train(model, ShardedOptimizer(model.parameters(), torch.optim.Adafactor, stage=2, lr=1e-2), 3)
    _train(ref, torch.optim.Adafactor(ref.parameters(), lr=1e-2), 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def check_fp16_mean() -> None:
    comm = Comm()
    n = comm.world_size
    bucket = torch.full((4 * n,), 60000.0, dtype=torch.float16, device="cuda")
    out = torch.empty(4, dtype=torch.float16, device="cuda")
    comm.reduce_scatter_mean_async(bucket, [4 * r for r in range(n + 1)], out, accumulate=False, what="fp16").wait()
    assert bool(torch.isfinite(out).all()), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="nccl", help='"nccl", "cpu:gloo,cuda:nccl" or "default"')
    backend = parser.parse_args().backend
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(cuda_device_index(local_rank, torch.cuda.device_count()))
    if backend == "default":
        dist.init_process_group(timeout=timedelta(minutes=5))
    else:
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
    try:
        check_devices(backend)
        check_consolidation(torch.optim.NAdam)
        check_consolidation(torch.optim.Adam, foreach=True)
        check_consolidation(torch.optim.Adagrad)
        root = tempfile.mkdtemp(prefix="shardoptim_nccl_") if dist.get_rank() == 0 else ""
        shared = [root]
        dist.broadcast_object_list(shared, src=0)  # NOTE: one node (torchrun --standalone): a shared /tmp
        check_checkpoints(str(Path(shared[0]) / "ckpt"))
        check_fp16_grad_scaler()
        check_channels_last_and_uneven()
        check_fp16_mean()
        print(f"SHARDOPTIM_NCCL_OK rank={dist.get_rank()} backend={backend}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
