"""Train a small GPT data-parallel, with its AdamW state sharded across the ranks by shardoptim.

The data is generated locally and deterministically: a random order-2 Markov chain over a small
vocabulary (every pair of previous tokens allows only a few next tokens), so the loss visibly drops
from ln(vocab) toward the chain's entropy within a hundred steps. For every step all ranks draw the
same global batch and each keeps its own slice of rows, so the data does not depend on the world
size. The model is a GPT (token + position embedding, pre-norm blocks with causal self-attention,
tied output head), wrapped in DistributedDataParallel when there is more than one rank. Compared
with plain torch, one line differs: the optimizer.

At the end rank 0 saves a consolidated checkpoint (model, optimizer in torch's own AdamW format,
scheduler, step) atomically to --out and prints the optimizer-state memory of every rank next to
what an unsharded AdamW holds; with matplotlib installed (`pip install shardoptim[examples]`) it
also draws both, the loss per step and the memory per rank, to --plot as a PNG. `--resume` loads
the checkpoint on every rank, at any world size, and continues until --steps.

Run from the repository root after `pip install -e .` (or run `bash examples/demo.sh`, which sets
everything up and starts 2 CPU ranks). Use OMP_NUM_THREADS=1 on CPU: one thread per rank.
    python examples/train_gpt.py                                      # 1 process
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py    # 2 ranks: gloo on CPU, nccl on GPUs
    launch/mpirun.sh 2 examples/train_gpt.py                          # MPI; needs mpi4py (see the script)
    sbatch launch/slurm.sbatch examples/train_gpt.py --steps 2000     # Slurm: srun, one task per rank
Split a run (e.g. across time-limited jobs) and resume it at another world size:
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --steps 300 --stop-after 100
    python examples/train_gpt.py --resume                             # steps 100..300 on 1 process
The process group comes from shardoptim.launcher.init_distributed(), which recognises torchrun,
mpirun/mpiexec, srun and a plain `python`; on GPUs each rank uses cuda:<local rank>.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardoptim import ShardedOptimizer
from shardoptim.launcher import init_distributed

DEFAULT_STEPS = 150
#: Settings that define the model and the data; a checkpoint keeps them and --resume reuses them.
MODEL_DEFAULTS = {"vocab": 64, "seq": 64, "d_model": 128, "layers": 4, "heads": 4, "seed": 0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With --resume, --steps and the model and data options default to the checkpoint's values.",
    )
    add, m = p.add_argument, MODEL_DEFAULTS
    add("--steps", type=int, help=f"total optimizer steps, the OneCycleLR length (default {DEFAULT_STEPS})")
    add(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop and save after N steps; continue later with --resume",
    )
    add("--batch", type=int, default=32, help="global batch in sequences, split across ranks (default 32)")
    add("--seq", type=int, help=f"tokens per sequence (default {m['seq']})")
    add("--vocab", type=int, help=f"vocabulary of the synthetic Markov chain (default {m['vocab']})")
    add("--d-model", type=int, help=f"model width (default {m['d_model']})")
    add("--layers", type=int, help=f"transformer blocks (default {m['layers']})")
    add("--heads", type=int, help=f"attention heads (default {m['heads']})")
    add("--seed", type=int, help=f"seed of the weights and the data (default {m['seed']})")
    add("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    add("--log-every", type=int, default=10, help="progress line every N steps (default 10)")
    add("--out", type=Path, default=Path("out/gpt_ckpt.pt"), help="checkpoint file (default out/gpt_ckpt.pt)")
    add(
        "--plot",
        type=Path,
        default=Path("out/loss.png"),
        help="PNG of the loss and of the memory per rank, needs matplotlib (default out/loss.png)",
    )
    add("--resume", action="store_true", help="load --out on every rank and continue from its step")
    add(
        "--stage",
        type=int,
        choices=(1, 2),
        default=1,
        help="ZeRO stage: 1 shards optimizer state, gradients averaged by DDP (default); 2 also shards the "
        "gradients, reduce-scattered by the optimizer during backward (no DDP)",
    )
    add("--bf16", action="store_true", help="bf16 model, updated through fp32 master weights of each rank's shard")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ data


def markov_chain(vocab: int, seed: int, *, successors: int = 8) -> torch.Tensor:
    """Return next-token probabilities [vocab * vocab, vocab] of a random order-2 chain.

    Row a * vocab + b is the distribution of the token after (a, b). The last token b allows
    `successors` next tokens (learnable from one token back); the token before it, a, sets their
    weights (learnable only by attending two tokens back), so the loss falls in two stages.
    """
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(vocab, vocab, generator=gen).argsort(dim=1)[:, :successors]  # [b, successors]
    weights = torch.softmax(2.0 * torch.randn(vocab * vocab, successors, generator=gen), dim=1)
    probs = torch.zeros(vocab * vocab, vocab)
    probs.scatter_(1, allowed.repeat(vocab, 1), weights)  # row a * vocab + b gets allowed[b]
    return probs


def sample_batch(probs: torch.Tensor, num_seqs: int, length: int, *, seed: int, step: int) -> torch.Tensor:
    """Draw `num_seqs` sequences of `length` tokens; the same (seed, step) gives the same batch anywhere."""
    vocab = probs.shape[1]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    seqs = torch.empty(num_seqs, length, dtype=torch.long)
    seqs[:, :2] = torch.randint(0, vocab, (num_seqs, 2), generator=gen)
    for t in range(2, length):
        context = seqs[:, t - 2] * vocab + seqs[:, t - 1]
        seqs[:, t] = torch.multinomial(probs[context], 1, generator=gen).squeeze(1)
    return seqs


def entropy_floor(probs: torch.Tensor, length: int) -> float:
    """Return the lowest mean loss possible on this data, in nats per predicted token.

    The second token of a sequence is uniform (nothing to learn), the rest have the chain's
    conditional entropy averaged over the contexts the chain visits.
    """
    vocab = probs.shape[1]
    seqs = sample_batch(probs, 256, length, seed=12345, step=0)
    context = (seqs[:, :-2] * vocab + seqs[:, 1:-1]).reshape(-1)
    p = probs[context]
    conditional = -(p * p.clamp_min(1e-30).log()).sum(dim=1).mean().item()
    return (math.log(vocab) + (length - 2) * conditional) / (length - 1)


# ------------------------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # [b, t, 3c] -> 3 x [b, heads, t, c / heads]
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, *, vocab: int, seq: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"--d-model {d_model} is not divisible by --heads {heads}")
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: model.parameters() lists it once
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() == 2:
                # GPT-2: residual projections scaled down with depth
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(param, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------------------------------ helpers


class Progress:
    """A plain-text progress bar on rank 0: redrawn in place on a terminal, one line per update otherwise."""

    def __init__(self, first: int, last: int, total: int) -> None:
        self.first, self.last, self.total = first, last, total
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, lr: float) -> None:
        done = (step - self.first) / max(self.last - self.first, 1)
        elapsed = time.perf_counter() - self.start
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (self.last - step) / rate if rate > 0 else 0.0
        bar = "#" * round(24 * done) + "." * (24 - round(24 * done))
        line = (
            f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f}  lr {lr:.2e}  "
            f"{rate:.1f} step/s  eta {eta:.0f}s"
        )
        print(
            ("\r" + line) if self.tty else line, end="" if self.tty and step < self.last else "\n", flush=True
        )


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to `<path>.tmp`, flush it to disk, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def resolve_config(args: argparse.Namespace, checkpoint: dict[str, Any] | None) -> dict[str, int]:
    """Model, data and schedule settings: the command line, else the checkpoint's, else the defaults."""
    saved = checkpoint["config"] if checkpoint is not None else {}
    config = {}
    for key, default in [*MODEL_DEFAULTS.items(), ("steps", DEFAULT_STEPS)]:
        given = getattr(args, key)
        if given is not None and key in saved and given != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(
                f"train_gpt.py: {flag} {given}, but {args.out} was trained with {flag} {saved[key]}; "
                f"drop {flag} to continue that run, or start a new one without --resume"
            )
        config[key] = given if given is not None else saved.get(key, default)
    if config["steps"] < 5:
        raise SystemExit(
            f"train_gpt.py: --steps {config['steps']} is too short for OneCycleLR; use 5 or more"
        )
    return config


def gather_memory(opt: ShardedOptimizer, model: nn.Module, device: torch.device) -> tuple[list[int], int]:
    """Return every rank's optimizer-state bytes and what unsharded AdamW holds on each rank.

    Collective: call on every rank, in the same order. Every rank gets the same lists.
    """
    sizes = opt.memory_nbytes()
    rank_to_nbytes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(opt.world_size)]
    dist.all_gather(rank_to_nbytes, torch.tensor([sizes["state"] + sizes["master"]], device=device))
    # torch.optim.AdamW on every rank: exp_avg and exp_avg_sq shaped like each parameter (8 bytes per
    # fp32 element) plus one 4-byte float32 `step` tensor per parameter; with bf16 weights, an fp32
    # master copy and fp32 moments (12 bytes per element).
    params = [p for p in model.parameters() if p.requires_grad]
    per_element = 12 if sizes["master"] else None
    unsharded = sum((per_element or 2 * p.element_size()) * p.numel() + 4 for p in params)
    return [int(t.item()) for t in rank_to_nbytes], unsharded


def print_memory_table(rank_to_nbytes: Sequence[int], unsharded: int, *, numel: int, master: bool) -> None:
    """Print every rank's optimizer-state bytes next to what unsharded AdamW would hold."""
    what = "exp_avg, exp_avg_sq, step, fp32 master" if master else "exp_avg, exp_avg_sq, step"
    print(f"optimizer state per rank: AdamW ({what}) for {numel:,} parameters")
    print(f"{'rank':>6}  {'sharded':>12}  {'unsharded':>12}  {'ratio':>6}")
    for r, nbytes in enumerate(rank_to_nbytes):
        print(f"{r:>6}  {mib(nbytes):>12}  {mib(unsharded):>12}  {nbytes / unsharded:>6.3f}")
    print(f"{'total':>6}  {mib(sum(rank_to_nbytes)):>12}  {mib(unsharded * len(rank_to_nbytes)):>12}")


# ------------------------------------------------------------------------------------------ plot


def plot_run(
    path: Path,
    losses: Sequence[float],
    *,
    floor: float,
    resumed_at: Sequence[int],
    rank_to_nbytes: Sequence[int],
    unsharded: int,
    title: str,
) -> bool:
    """Draw the loss per step and the optimizer memory per rank side by side into a 640x400 RGB PNG.

    The loss panel marks the data's entropy floor and every step a run was resumed at; the memory
    panel puts each rank's sharded optimizer state next to what unsharded AdamW holds per rank.
    Written to `<path>.tmp`, then renamed. Returns False, after printing one line saying how to
    install it, when matplotlib is missing.
    """
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
        from PIL import Image  # a dependency of matplotlib
    except ImportError:
        print(f"skipped the plot {path}: matplotlib is not installed (pip install shardoptim[examples])")
        return False
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=9)
    loss_ax, mem_ax = fig.subplots(1, 2, width_ratios=(3, 2))

    loss_ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", linewidth=1.2, label="loss")
    loss_ax.axhline(floor, color="black", linestyle="--", linewidth=0.9, label=f"floor {floor:.3f} (entropy)")
    for i, step in enumerate(resumed_at):
        label = "resumed at " + ", ".join(str(s) for s in resumed_at) if i == 0 else None
        loss_ax.axvline(step, color="tab:orange", linestyle=":", linewidth=1.5, label=label)
    loss_ax.set_ylim(bottom=max(0.0, math.floor((floor - 0.05) * 2) / 2))  # a tick at or below the floor
    loss_ax.set_xlim(0, max(len(losses), 1))
    loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 2.5
    loss_ax.set_xlabel("step", fontsize=8)
    loss_ax.set_ylabel("cross-entropy (nats / token, mean over ranks)", fontsize=8)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7, loc="upper right")

    values = [n / 2**20 for n in rank_to_nbytes] + [unsharded / 2**20]
    names = [str(r) for r in range(len(rank_to_nbytes))] + ["unsharded"]
    colors = ["tab:blue"] * len(rank_to_nbytes) + ["tab:gray"]
    bars = mem_ax.bar(range(len(values)), values, color=colors)
    if len(values) <= 9:
        mem_ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    mem_ax.set_xticks(range(len(values)), names, fontsize=7)
    mem_ax.set_xlabel("rank (sharded) vs unsharded AdamW", fontsize=8)
    mem_ax.set_ylabel("optimizer state per rank (MiB)", fontsize=8)
    mem_ax.set_ylim(top=max(values) * 1.15)
    mem_ax.grid(axis="y", alpha=0.3)
    for ax in (loss_ax, mem_ax):
        ax.tick_params(labelsize=7)

    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]  # opaque white background: alpha carries nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)
    return True


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    info = init_distributed()  # torchrun, mpirun, srun or a single process; gloo on CPU, nccl on GPUs
    rank, world_size = info.rank, info.world_size
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{max(info.local_rank, 0)}" if cuda else "cpu")
    if args.batch % world_size:
        raise SystemExit(f"train_gpt.py: --batch {args.batch} is not divisible by the {world_size} ranks")
    checkpoint = None
    if args.resume:
        if not args.out.is_file():
            raise SystemExit(
                f"train_gpt.py: --resume, but {args.out} does not exist; run without --resume first"
            )
        checkpoint = torch.load(args.out, map_location=device, weights_only=True)
    config = resolve_config(args, checkpoint)
    total_steps = config["steps"]

    torch.manual_seed(config["seed"])  # the same initial weights on every rank
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = GPT(**{k: config[k] for k in ("vocab", "seq", "d_model", "layers", "heads")}).to(device, dtype)
    # The one line that differs from plain torch: torch.optim.AdamW(model.parameters(), lr=..., ...)
    opt = ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        stage=args.stage,
        master_dtype=torch.float32 if args.bf16 else None,
        lr=args.lr,
        weight_decay=0.1,
    )
    # NOTE: OneCycleLR divides by zero unless its warm-up spans at least 2 steps.
    warmup = max(0.1, 2 / total_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=total_steps, pct_start=warmup
    )
    start_step, losses, resumed_at = 0, [], []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # copies into the optimizer's flat buffers in place
        opt.load_state_dict(checkpoint["optimizer"])  # each rank keeps what it owns at this world size
        sched.load_state_dict(checkpoint["scheduler"])
        start_step, losses = checkpoint["step"], list(checkpoint["losses"])
        resumed_at = [*checkpoint.get("resumed_at", []), start_step]  # marked on the plot
        del checkpoint
    net: nn.Module = model
    if world_size > 1 and args.stage == 1:  # at stage 2 the optimizer's backward hooks reduce the gradients
        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    end_step = total_steps if args.stop_after is None else min(total_steps, start_step + args.stop_after)

    probs = markov_chain(config["vocab"], config["seed"])
    floor = entropy_floor(probs, config["seq"] + 1)
    if rank == 0:
        resumed = f" (resumed from {args.out})" if args.resume else ""
        print(
            f"train_gpt: {world_size} rank(s) ({info.launcher}, {info.backend}) on {device}, ZeRO stage "
            f"{args.stage}{', bf16 + fp32 master weights' if args.bf16 else ''}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"global batch {args.batch} x {config['seq']} tokens, steps {start_step} -> {end_step} of "
            f"{total_steps}{resumed}\n"
            f"data: order-2 Markov chain over {config['vocab']} tokens; "
            f"loss floor {floor:.3f}, uniform {math.log(config['vocab']):.3f}",
            flush=True,
        )
    if start_step >= end_step:
        if rank == 0:
            print(f"nothing to do: {args.out} is at step {start_step} of {total_steps}")
        dist.destroy_process_group()
        return

    rows = slice(rank * args.batch // world_size, (rank + 1) * args.batch // world_size)  # this rank's slice
    progress = Progress(start_step, end_step, total_steps) if rank == 0 else None
    window: list[torch.Tensor] = []
    start = time.perf_counter()
    for step in range(start_step, end_step):
        seqs = sample_batch(probs, args.batch, config["seq"] + 1, seed=config["seed"], step=step)
        seqs = seqs[rows].to(device)
        logits = net(seqs[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # averaged across ranks by DDP (stage 1) or by the optimizer's hooks (stage 2)
        opt.clip_grad_norm_(1.0)  # the global norm over every rank's gradients (one small collective)
        opt.step()
        sched.step()
        window.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == end_step:
            mean = torch.stack(window)  # one all-reduce per progress line, not one per step
            dist.all_reduce(mean)
            losses.extend((mean / world_size).tolist())
            window.clear()
            if progress is not None:
                progress.update(step + 1, losses[-1], float(sched.get_last_lr()[0]))
    elapsed = time.perf_counter() - start

    opt.consolidate_state_dict(to=0)  # collective: every rank sends its shard to rank 0
    rank_to_nbytes, unsharded = gather_memory(opt, model, device)  # collective
    if rank == 0:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        extra = {"step": end_step, "config": config, "losses": losses, "resumed_at": resumed_at}
        save_atomic({**state, **extra}, args.out)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print_memory_table(rank_to_nbytes, unsharded, numel=numel, master=args.bf16)
        title = (
            f"train_gpt.py: {world_size} rank(s) ({info.launcher}, {info.backend}, {device.type}), "
            f"ZeRO stage {args.stage}, {'bf16 + fp32 master' if args.bf16 else 'fp32'}\n"
            f"{numel / 1e6:.2f}M parameters, batch {args.batch} x {config['seq']}, step {end_step} of {total_steps}"
        )
        plotted = plot_run(
            args.plot,
            losses,
            floor=floor,
            resumed_at=resumed_at,
            rank_to_nbytes=rank_to_nbytes,
            unsharded=unsharded,
            title=title,
        )
        done = end_step - start_step
        saved = f"{args.out} and {args.plot}" if plotted else f"{args.out}"
        print(f"{done} steps in {elapsed:.1f} s ({done / elapsed:.1f} step/s); saved {saved}")
        print(f"loss: first {losses[0]:.4f} -> final {losses[-1]:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
