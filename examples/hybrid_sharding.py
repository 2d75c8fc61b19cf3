"""Hybrid sharding across nodes: shard the optimizer within each node, replicate across nodes.

`shardoptim.hybrid_groups()` reads the ranks per node from the launcher (LOCAL_WORLD_SIZE under
torchrun) and builds two groups per rank: its node (the shard group: state sharded 1/S, parameter
gathers stay on the node) and the ranks at the same position on every other node (the replicate
group: stage 2 averages its 1/S gradient shard there once per step). The model trains at stage 2,
without DDP; a DDP + torch.optim.AdamW copy trains beside it on the same batches as the oracle.
At the end rank 0 prints the optimizer state per rank against the unsharded AdamW's, the largest
difference from the oracle, and `verify_replicas()` checks that all ranks hold the same weights.

Run from the repository root (after `pip install -e .`, or with PYTHONPATH=. in front). Two
"nodes" of 2 ranks on one machine, each started by its own torchrun:
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29512 \\
        examples/hybrid_sharding.py &
    torchrun --nnodes 2 --node-rank 1 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29512 \\
        examples/hybrid_sharding.py
On a cluster, the same script under your launcher (one torchrun per node, or srun/mpirun).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import shardoptim

STEPS, BATCH, WIDTH, LR = 8, 16, 64, 3e-3


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH), nn.LayerNorm(WIDTH))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, WIDTH, generator=gen)
    return x, torch.tanh(x.flip(1))


def main() -> None:
    shardoptim.init_distributed()
    rank = dist.get_rank()
    shard_group, replicate_group = shardoptim.hybrid_groups()
    model = make_model()
    oracle = DDP(copy.deepcopy(model))
    oracle_opt = torch.optim.AdamW(oracle.parameters(), lr=LR, weight_decay=0.1)
    opt = shardoptim.ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        stage=2,
        shard_group=shard_group,
        replicate_group=replicate_group,
        lr=LR,
        weight_decay=0.1,
    )
    if rank == 0:
        print(
            f"{dist.get_world_size()} ranks: shard groups of {opt.world_size} x {opt.num_replicas} replicas, stage 2",
            flush=True,
        )
    for step in range(STEPS):
        x, y = batch(step, rank)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        nn.functional.mse_loss(oracle(x), y).backward()
        opt.clip_grad_norm_(1.0)
        nn.utils.clip_grad_norm_(oracle.parameters(), 1.0)
        opt.step()
        oracle_opt.step()
        opt.zero_grad()
        oracle_opt.zero_grad()
        mean_loss = shardoptim.all_reduce_metric(loss.detach())
        if rank == 0 and step in (0, STEPS - 1):
            print(f"step {step} loss {float(mean_loss):.5f}", flush=True)
    opt.verify_replicas()
    difference = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), oracle.parameters()))
    unsharded = sum(v.numel() * v.element_size() for s in oracle_opt.state.values() for v in s.values())
    rank_to_state: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(rank_to_state, opt.local_state_nbytes())
    if rank == 0:
        for r, nbytes in enumerate(rank_to_state):
            print(f"rank {r} optimizer state {nbytes:,} B ({nbytes / unsharded:.3f} of unsharded AdamW's)")
        print(f"unsharded AdamW state {unsharded:,} B")
        print(f"max |sharded - DDP + AdamW| over the weights: {difference:.2e}")
        print("verify_replicas: every rank holds the same weights")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
