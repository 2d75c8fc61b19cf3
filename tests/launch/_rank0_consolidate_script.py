"""A DDP loop with the classic mistake: the optimizer state is consolidated inside `if rank == 0:`.

Run under torchrun with 2 ranks; argv[1] is entry_timeout_s. Rank 0 must raise shardoptim.EntryError
after about that long (not hang until the group's timeout); rank 1 waits in DDP's next all-reduce
until torchrun ends it.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import shardoptim

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(torch.nn.Linear(8, 4))
opt = shardoptim.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, entry_timeout_s=float(sys.argv[1]))
for step in range(4):
    model(torch.randn(16, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    if step == 1 and rank == 0:  # WRONG: a collective called on rank 0 only
        opt.consolidate_state_dict(to=0)
        torch.save(opt.state_dict(), "never-written.pt")
    print(f"rank {rank} finished step {step}", flush=True)
dist.destroy_process_group()
