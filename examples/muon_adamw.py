"""Muon for the hidden matrices, AdamW for everything else: two ShardedOptimizers on one model.

torch.optim.Muon only takes 2-D parameters and is meant for the hidden weight matrices; embeddings,
the output head, biases and norm gains stay with AdamW. This is the usual pairing, and with shardoptim
each half is a ShardedOptimizer of its own: Muon is sharded whole-tensor (each matrix is owned by one
rank, balanced by the cost of its orthogonalisation, m * n * min(m, n)), AdamW flat (element ranges).
Call both every step, on every rank.

Trains a tiny causal transformer on synthetic sequences (x[t] = x[t-1] + x[t-2] mod vocab) on CPU.

Run from the repository root (after `pip install -e .`, or with PYTHONPATH=. in front):
    python examples/muon_adamw.py                                      # one process
    torchrun --standalone --nproc-per-node 2 examples/muon_adamw.py    # 2 ranks, gloo
    python examples/muon_adamw.py --steps 10 --log-every 5             # a shorter run
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardoptim import ShardedOptimizer

VOCAB, DIM, HEADS, SEQ, LAYERS = 32, 64, 4, 24, 2
BATCH = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.proj = nn.Linear(DIM, DIM, bias=False)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, HEADS, DIM // HEADS).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, DIM))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(step: int, rank: int) -> torch.Tensor:
    """Each rank draws its own sequences: two random tokens, then x[t] = x[t-1] + x[t-2] mod VOCAB."""
    gen = torch.Generator().manual_seed(10_000 * rank + step)
    seq = torch.empty(BATCH, SEQ + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, VOCAB, (BATCH, 2), generator=gen)
    for t in range(2, SEQ + 1):
        seq[:, t] = (seq[:, t - 1] + seq[:, t - 2]) % VOCAB
    return seq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--log-every", type=int, default=10, help="print the loss every this many steps")
    args = parser.parse_args()
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # same initial weights on every rank
    model = TinyLM()
    # Muon: the 2-D weight matrices inside the blocks. AdamW: embeddings, positions, head, biases, norms.
    hidden = [p for p in model.blocks.parameters() if p.ndim == 2]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    muon = ShardedOptimizer(hidden, torch.optim.Muon, lr=0.02, momentum=0.95, weight_decay=0.01)
    adamw = ShardedOptimizer(rest, torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    # DDP averages the gradients across ranks; build it after the optimizers (which move the weights
    # into their buckets) or before: either works, the parameters stay the same tensors.
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    if rank == 0:
        print(f"{world_size} rank(s); Muon sharding={muon.sharding}, AdamW sharding={adamw.sharding}")

    start = time.perf_counter()
    for step in range(args.steps):
        seq = batch(step, rank)
        logits = net(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, 1:].reshape(-1))
        muon.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        muon.step()
        adamw.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            if distributed:
                dist.all_reduce(mean_loss)
                mean_loss /= world_size
            if rank == 0:
                print(f"step {step:3d}  loss {mean_loss.item():.4f}")

    mine = (muon.local_state_nbytes(), adamw.local_state_nbytes())
    per_rank = [mine]
    if distributed:
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
        for r, (muon_bytes, adamw_bytes) in enumerate(per_rank):
            print(f"rank {r}: optimizer state  Muon {muon_bytes:,} B  AdamW {adamw_bytes:,} B")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
