"""Run under a launcher by tests/launch/test_launchers.py: init_distributed(), one all_reduce, one line per rank.

    torchrun --standalone --nproc-per-node 2 tests/launch/_init_script.py
    mpiexec -n 2 python tests/launch/_init_script.py

Prints "SHARDOPTIM_OK rank=R world_size=W local_rank=L launcher=X backend=B" on success; any failure raises
and exits non-zero.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from shardoptim.launcher import DistInfo, init_distributed


def check_all_reduce(info: DistInfo) -> None:
    """All-reduce the rank and compare with 0 + 1 + ... + (world_size - 1). Collective."""
    total = torch.tensor([float(info.rank)])
    dist.all_reduce(total)
    expected = info.world_size * (info.world_size - 1) / 2
    assert total.item() == expected, f"rank {info.rank}: all_reduce gave {total.item()}, expected {expected}"


def check_sharded_optimizer_step(info: DistInfo) -> None:
    """Take ShardedOptimizer steps and check bitwise parity with torch.optim.AdamW. Collective."""
    from shardoptim import ShardedOptimizer

    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 37), (37,), (5, 37), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    refs = [p.detach().clone().requires_grad_() for p in params]
    opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, r, g in zip(params, refs, grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, r in zip(params, refs):
        assert torch.equal(p, r), f"rank {info.rank}: ShardedOptimizer differs from torch.optim.AdamW"
    assert opt.world_size == info.world_size


def main() -> None:
    info = init_distributed()
    assert init_distributed() == info, "a second init_distributed() must return the same description"
    assert (dist.get_rank(), dist.get_world_size()) == (info.rank, info.world_size)
    check_all_reduce(info)
    check_sharded_optimizer_step(info)
    line = (
        f"SHARDOPTIM_OK rank={info.rank} world_size={info.world_size} local_rank={info.local_rank} "
        f"launcher={info.launcher} backend={info.backend}\n"
    )
    # NOTE: one write() call, so ranks that share an output file cannot split each other's lines
    # (print() may write the text and the newline separately).
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
