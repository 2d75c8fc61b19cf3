"""A hand-written DDP training loop (nanoGPT-style) with its AdamW state sharded by shardoptim.

The script is what people write by hand: `init_process_group` from torchrun's variables, a model
wrapped in DDP, weight-decay param groups, a learning rate set by hand every iteration, gradient
clipping, and a checkpoint saved every --save-every iterations by rank 0 ("master process"). Two
lines differ from the plain-torch version:
  1. the optimizer: `ShardedOptimizer(groups, torch.optim.AdamW, ...)` instead of `torch.optim.AdamW(groups, ...)`;
  2. the save: the optimizer state is gathered on EVERY rank (`opt.full_state_dict(to=0)`, a
     collective), then rank 0 alone writes it. Calling the gather inside `if master_process:`
     raises shardoptim.EntryError on rank 0 after entry_timeout_s (60 s) instead of hanging.
The checkpoint holds torch's own AdamW format, so a plain torch.optim.AdamW can load it too.

Numbers: by default the wrapper runs torch's fused AdamW kernel (fast). `--optimizer sharded-plain`
passes fused=None, which leaves the kernel choice to AdamW itself, exactly as the plain script does:
then the logged losses equal the plain run's (`--optimizer plain`) bit for bit.

Run from the repository root (2 CPU ranks; on GPUs the same command uses NCCL):
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --out out/ddp
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/ddp_loop.py --out out/ddp --resume
The first line trains --iters iterations (stop early with --stop-after N, as a time-limited job
would); the second resumes from out/ddp/ckpt.pt and continues to --iters.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import shardoptim

VOCAB, SEQ, WIDTH, LAYERS = 48, 16, 32, 2


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.head(self.norm(self.blocks(self.tok(idx) + self.pos, mask=mask, is_causal=True)))


def get_batch(it: int, rank: int, world_size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank draws the same global batch for iteration `it` and keeps its own rows."""
    gen = torch.Generator().manual_seed(1000 + it)
    start = torch.randint(0, VOCAB, (batch * world_size, 1), generator=gen)
    data = (start + torch.arange(SEQ + 1) * 7) % VOCAB  # a learnable sequence rule
    rows = data[rank * batch : (rank + 1) * batch]
    return rows[:, :-1], rows[:, 1:]


def get_lr(it: int, iters: int, peak: float = 3e-3, warmup: int = 4) -> float:
    if it < warmup:
        return peak * (it + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / max(1, iters - warmup)))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--save-every", type=int, default=8)
    p.add_argument("--stop-after", type=int, default=None, help="exit after this iteration (after its save)")
    p.add_argument("--out", default="out/ddp_loop")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--batch", type=int, default=8, help="rows per rank")
    p.add_argument("--optimizer", choices=("sharded", "sharded-plain", "plain"), default="sharded")
    return p.parse_args()


def train(args: argparse.Namespace, ddp: bool) -> None:
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master_process = rank == 0
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"

    torch.manual_seed(0)
    raw_model = TinyGPT().to(device)
    model = DDP(raw_model) if ddp else raw_model
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "plain":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    else:
        flags = {"fused": None} if args.optimizer == "sharded-plain" else {}
        optimizer = shardoptim.ShardedOptimizer(groups, torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.95), **flags)

    iter_num = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # every rank, the full dict, any world size
        iter_num = ckpt["iter_num"]

    while iter_num < args.iters:
        lr = get_lr(iter_num, args.iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(iter_num, rank, world_size, args.batch)
        logits = model(x.to(device))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.to(device).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        # The mean loss over ranks, printed exactly (hex) so runs can be compared bit for bit.
        mean = loss.detach().clone()
        if ddp:
            dist.all_reduce(mean)
        if master_process:
            print(f"iter {iter_num} loss {float(mean) / world_size:.4f} exact {(float(mean) / world_size).hex()}")

        if iter_num % args.save_every == 0 or iter_num == args.iters:
            # A collective on every rank (rank 0 gets the dict, the others None): NOT inside `if master_process`.
            if isinstance(optimizer, shardoptim.ShardedOptimizer):
                opt_state = optimizer.full_state_dict(to=0)
            else:
                opt_state = optimizer.state_dict()
            if master_process:
                out.mkdir(parents=True, exist_ok=True)
                ckpt = {"model": raw_model.state_dict(), "optimizer": opt_state, "iter_num": iter_num}
                torch.save(ckpt, out / "ckpt.pt.tmp")
                os.replace(out / "ckpt.pt.tmp", ckpt_path)  # atomic: a crash keeps the last checkpoint
                print(f"saved {ckpt_path} at iter {iter_num}")
        if args.stop_after is not None and iter_num >= args.stop_after:
            break


def main() -> None:
    args = parse_args()
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    train(args, ddp)
    if ddp:
        # NOTE: the DDP model is freed (train returned; gc for its reference cycles) before its group
        # is destroyed. The other way round, the model's last reference to a destroyed gloo group can
        # join the group's threads while they wait for the GIL: a plain-torch hang at exit that the
        # "plain" run here hit once. With a ShardedOptimizer the library holds the group until exit.
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
