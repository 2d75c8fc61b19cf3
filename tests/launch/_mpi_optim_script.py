"""Run under mpiexec by tests/launch/test_mpi_comm.py: stage 2 training through the MPI comm path.

Usage: launch/mpirun.sh 2 tests/launch/_mpi_optim_script.py {mpi|auto|torch}
Prints `MPI_OPTIM_OK rank=R gather=G reduce=R` per rank after checking, on every rank, that an fp32
AdamW run matches a single-process reference on the whole batch, and that a bf16 model with fp32
master weights (its bf16 gradients never go through MPI's reductions) trains with identical replicas.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

import shardoptim


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 20, generator=gen), torch.randn(8, 5, generator=gen)


def main() -> None:
    comm_backend = sys.argv[1]
    info = shardoptim.init_distributed()
    rank, world_size = info.rank, info.world_size
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 300), torch.nn.Tanh(), torch.nn.Linear(300, 5))
    ref = copy.deepcopy(model)
    opt = shardoptim.ShardedOptimizer(
        model.parameters(), torch.optim.AdamW, stage=2, comm_backend=comm_backend, lr=1e-2, weight_decay=0.1
    )
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x, y = _data(rank, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for r in range(world_size):
            xr, yr = _data(r, step)
            (torch.nn.functional.mse_loss(ref(xr), yr) / world_size).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    opt.verify_replicas()

    low = copy.deepcopy(model).to(torch.bfloat16)
    low_opt = shardoptim.ShardedOptimizer(
        low.parameters(), torch.optim.AdamW, stage=2, master_dtype=torch.float32, comm_backend=comm_backend
    )
    for step in range(3):
        x, y = _data(rank, step)
        torch.nn.functional.mse_loss(low(x.bfloat16()).float(), y).backward()
        low_opt.step()
        low_opt.zero_grad()
    low_opt.verify_replicas()
    transport = opt.placement.comm.transports.get(torch.device("cpu"))  # chosen by now: no communication
    gather, reduce = (transport.gathers, transport.reduces) if transport.name == "mpi" else (None, None)
    print(f"MPI_OPTIM_OK rank={rank} gather={gather} reduce={reduce}", flush=True)
    del opt, low_opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
