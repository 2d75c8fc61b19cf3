"""Fine-tune a "pretrained" backbone and a fresh classifier with per-group learning rates (LambdaLR).

The classic recipe: the pretrained backbone gets a low learning rate, the new classifier head a
higher one, and biases and norm weights get no weight decay. That makes four param groups
(backbone, backbone.no_decay, head, head.no_decay), each with its own lr and weight_decay, and
LambdaLR gets one schedule per group: the backbone stays frozen (lr 0) for the first --freeze-steps
while the head learns on top of its features, then warms up and decays with a cosine; the head
warms up and decays from the start. ShardedOptimizer takes the groups exactly as torch.optim.AdamW
does; rank 0's group options are broadcast before every step, so all ranks follow the same lrs.

The task is synthetic and generated locally: a random "teacher" network labels Gaussian inputs
with 10 classes; the student's backbone starts as the teacher's plus noise (standing in for a
checkpoint pretrained on a related task) and its head starts at random. Each rank trains on its
slice of every global batch and evaluates its slice of the validation set; the counts are summed.

Run from the repository root after `pip install -e .`; OMP_NUM_THREADS=1 on CPU:
    python examples/finetune_param_groups.py                                    # 1 process
    torchrun --standalone --nproc-per-node 2 examples/finetune_param_groups.py  # 2 ranks
    launch/mpirun.sh 2 examples/finetune_param_groups.py                        # MPI (needs mpi4py)
    sbatch launch/slurm.sbatch examples/finetune_param_groups.py                # Slurm
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardoptim import ShardedOptimizer, all_reduce_metric
from shardoptim.launcher import init_distributed

IN_FEATURES, HIDDEN, CLASSES = 32, 128, 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--freeze-steps", type=int, default=60, help="steps with the backbone frozen (default 60)")
    p.add_argument(
        "--warmup", type=int, default=30, help="linear warm-up steps of each schedule (default 30)"
    )
    p.add_argument("--batch", type=int, default=256, help="global batch, split across ranks (default 256)")
    p.add_argument("--base-lr", type=float, default=1e-3, help="peak lr of the backbone (default 1e-3)")
    p.add_argument(
        "--head-lr", type=float, default=1e-2, help="peak lr of the classifier head (default 1e-2)"
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.05, help="for weights, not biases/norms (default 0.05)"
    )
    p.add_argument("--log-every", type=int, default=30, help="table row every N steps (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task and the weights (default 0)")
    return p.parse_args()


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.GELU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.GELU(),
            nn.LayerNorm(HIDDEN),
        )
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_task(seed: int) -> tuple[Classifier, Classifier]:
    """Return (teacher, student): the student's backbone is the teacher's plus noise, its head is new."""
    torch.manual_seed(seed)
    teacher = Classifier()
    nn.init.normal_(teacher.head.weight, std=1.0)  # confident labels
    student = Classifier()  # fresh head
    with torch.no_grad():
        for mine, theirs in zip(student.backbone.parameters(), teacher.backbone.parameters()):
            mine.copy_(theirs + 0.5 * theirs.std() * torch.randn_like(theirs))
    return teacher, student


def sample(teacher: Classifier, num: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num` labelled inputs; the same seed gives the same data on every rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, IN_FEATURES, generator=gen)
    with torch.no_grad():
        return x, teacher(x).argmax(dim=1)


def param_groups(model: Classifier, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Split the parameters four ways: (backbone | head) x (decayed weights | biases and norms)."""
    groups: dict[str, dict[str, Any]] = {}
    for part, lr in (("backbone", args.base_lr), ("head", args.head_lr)):
        for name, param in getattr(model, part).named_parameters():
            no_decay = name.endswith("bias") or param.dim() < 2  # biases and LayerNorm weights
            key = f"{part}.no_decay" if no_decay else part
            group = groups.setdefault(
                key,
                {"params": [], "name": key, "lr": lr, "weight_decay": 0.0 if no_decay else args.weight_decay},
            )
            group["params"].append(param)
    return [groups[key] for key in ("backbone", "backbone.no_decay", "head", "head.no_decay")]


def schedules(args: argparse.Namespace) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """Return the (backbone, head) lr multipliers: linear warm-up then cosine to 0 at --steps."""

    def warm_cosine(step: int, start: int) -> float:
        if step < start:
            return 0.0
        if step < start + args.warmup:
            return (step - start + 1) / args.warmup
        progress = (step - start - args.warmup) / max(args.steps - start - args.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return (lambda step: warm_cosine(step, args.freeze_steps)), (lambda step: warm_cosine(step, 0))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the accuracy over all ranks' slices of the validation set.

    Collective: call on every rank, in the same order. Same result on every rank.
    """
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum()
    return all_reduce_metric(correct, "sum") / all_reduce_metric(len(y), "sum")


def main() -> None:
    args = parse_args()
    info = init_distributed()
    rank, world_size = info.rank, info.world_size
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{max(info.local_rank, 0)}" if cuda else "cpu")
    if args.batch % world_size:
        raise SystemExit(
            f"finetune_param_groups.py: --batch {args.batch} is not divisible by {world_size} ranks"
        )

    teacher, model = make_task(args.seed)
    model.to(device)
    groups = param_groups(model, args)
    opt = ShardedOptimizer(groups, torch.optim.AdamW, lr=args.base_lr, weight_decay=args.weight_decay)
    backbone_fn, head_fn = schedules(args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [backbone_fn, backbone_fn, head_fn, head_fn])
    net: nn.Module = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    x_val, y_val = sample(teacher, 4096, seed=args.seed + 1)
    mine = slice(rank * len(x_val) // world_size, (rank + 1) * len(x_val) // world_size)
    x_val, y_val = x_val[mine].to(device), y_val[mine].to(device)
    rows = slice(rank * args.batch // world_size, (rank + 1) * args.batch // world_size)

    names = [g["name"] for g in opt.param_groups]
    widths = [max(len(n), 9) for n in names]
    if rank == 0:
        print(f"finetune_param_groups: {world_size} rank(s) ({info.launcher}, {info.backend}) on {device}")
        for g in opt.param_groups:
            print(
                f"  group {g['name']:<18} {sum(p.numel() for p in g['params']):>7,} params  "
                f"peak lr {g['initial_lr']:.0e}  weight_decay {g['weight_decay']}"
            )
        print("learning rate of each group, training loss (mean over ranks), validation accuracy:")
        print(
            f"{'step':>5}  "
            + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
            + f"  {'loss':>7}  {'val acc':>7}"
        )
    acc = accuracy(net, x_val, y_val)
    if rank == 0:
        lrs = [g["lr"] for g in opt.param_groups]
        print(
            f"{0:>5}  " + "  ".join(f"{lr:>{w}.2e}" for lr, w in zip(lrs, widths)) + f"  {'':>7}  {acc:>7.3f}"
        )
    first_acc = acc
    for step in range(args.steps):
        x, y = sample(teacher, args.batch, seed=args.seed * 1_000_003 + 10 + step)
        loss = F.cross_entropy(net(x[rows].to(device)), y[rows].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        lrs = [g["lr"] for g in opt.param_groups]  # the lrs this step uses
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean_loss = all_reduce_metric(loss, "mean")
            acc = accuracy(net, x_val, y_val)
            if rank == 0:
                print(
                    f"{step + 1:>5}  "
                    + "  ".join(f"{lr:>{w}.2e}" for lr, w in zip(lrs, widths))
                    + f"  {mean_loss:>7.4f}  {acc:>7.3f}"
                )
    if rank == 0:
        print(f"val accuracy: {first_acc:.3f} -> {acc:.3f} ({CLASSES} classes)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
