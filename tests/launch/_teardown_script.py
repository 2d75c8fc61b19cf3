"""A user's plain script: build ShardedOptimizers, step, destroy the process group, return. No del, no gc.

Launched by tests/launch/test_teardown.py, which expects every rank to exit with status 0 in time:
    torchrun --standalone --nproc-per-node 2 tests/launch/_teardown_script.py [--starve-gloo-workers]

Three optimizers, each over its own small float64 MLP: AdamW at stage 1 behind DDP, AdamW at stage 2
(no DDP), and LBFGS with a closure that runs through DDP. Then every rank all-gathers its
`local_state_nbytes()`, rank 0 stays busy for 3 s while rank 1 destroys the process group and
returns at once, leaving the models and optimizers to be freed when `main` returns.

--starve-gloo-workers lowers the priority of this process's gloo worker threads (nice 19) after
training, so on a busy machine they run late after the last collectives: the window in which teardown
used to deadlock or abort (a worker still freeing a finished collective's tensors) then stays open
long enough to be hit.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from shardoptim import ShardedOptimizer

BUSY_S = 3.0


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).double()


def starve_gloo_workers() -> None:
    """Renice every thread of this process but the main one and gloo's TCP loop to 19 (Linux only)."""
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as handle:
            name = handle.read().strip()
        if int(tid) != os.getpid() and name != "gloo_tcp_loop":
            os.setpriority(os.PRIO_PROCESS, int(tid), 19)


def mean_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starve-gloo-workers", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 4, generator=gen, dtype=torch.float64)

    model1 = make_mlp(1)
    adamw1 = ShardedOptimizer(model1.parameters(), torch.optim.AdamW, lr=1e-2, stage=1)
    net1 = nn.parallel.DistributedDataParallel(model1)
    model2 = make_mlp(2)
    adamw2 = ShardedOptimizer(model2.parameters(), torch.optim.AdamW, lr=1e-2, stage=2)
    for _ in range(3):
        for net, opt in ((net1, adamw1), (model2, adamw2)):
            opt.zero_grad()
            mean_loss(net, x, y).backward()
            opt.step()

    model3 = make_mlp(3)
    lbfgs = ShardedOptimizer(model3.parameters(), torch.optim.LBFGS, max_iter=5)
    net3 = nn.parallel.DistributedDataParallel(model3)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = mean_loss(net3, x, y)
        loss.backward()
        loss = loss.detach().clone()
        dist.all_reduce(loss)  # every rank must return the same loss
        return loss / world_size

    for _ in range(2):
        lbfgs.step(closure)

    if args.starve_gloo_workers:  # from here on: the collectives before teardown
        starve_gloo_workers()
    for name, opt in (("adamw stage 1", adamw1), ("adamw stage 2", adamw2), ("lbfgs", lbfgs)):
        rank_to_nbytes: list[object] = [None] * world_size
        dist.all_gather_object(rank_to_nbytes, opt.local_state_nbytes())
        if rank == 0:
            print(f"{name}: state bytes per rank {rank_to_nbytes}", flush=True)
    if rank == 0:
        deadline = time.perf_counter() + BUSY_S
        while time.perf_counter() < deadline:  # busy, holding the GIL, while rank 1 tears down
            pass
    dist.destroy_process_group()
    print(f"rank {rank}: destroyed the process group", flush=True)


if __name__ == "__main__":
    main()
