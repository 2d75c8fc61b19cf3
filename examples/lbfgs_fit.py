"""Full-batch fit with sharded L-BFGS (strong Wolfe line search), data-parallel through DDP.

ShardedOptimizer(params, torch.optim.LBFGS) runs the same algorithm as torch.optim.LBFGS, but each
rank keeps only its 1/N slice of the 2 x history_size history vectors, and every dot product, norm
and line-search decision is reduced across ranks, so all ranks call the closure the same number of
times (a DDP backward inside the closure cannot deadlock) and the result matches one process.

The problem: L2-regularised softmax regression (256 features, 32 classes, 8,224 float64 parameters)
on 2,048 synthetic samples, so it has one minimum that both runs below reach. Each rank holds one
shard of the batch. The closure runs forward and backward through DDP (which averages the
gradients) and must return the same loss on every rank: here the mean over ranks. At the end rank 0
prints the per-rank optimizer state next to what torch.optim.LBFGS holds for the same problem on
one process (rank 0 reruns it unsharded on the full batch), and both final losses.

Run from the repository root (after `pip install -e .`, or with PYTHONPATH=. in front):
    torchrun --standalone --nproc-per-node 2 examples/lbfgs_fit.py    # 2 ranks, gloo
    python examples/lbfgs_fit.py                                      # one process
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardoptim import ShardedOptimizer

NUM_SAMPLES, FEATURES, CLASSES, WEIGHT_DECAY, STEPS = 2048, 256, 32, 1e-3, 3
LBFGS_OPTIONS: dict[str, Any] = {"line_search_fn": "strong_wolfe", "history_size": 10, "max_iter": 40}


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference run
    return nn.Linear(FEATURES, CLASSES).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch: labels of a random linear teacher, with noise."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, FEATURES, generator=gen, dtype=torch.float64)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen, dtype=torch.float64) / FEATURES**0.5
    logits = x @ teacher + 0.5 * torch.randn(NUM_SAMPLES, CLASSES, generator=gen, dtype=torch.float64)
    return x, logits.argmax(1)


def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy plus (WEIGHT_DECAY / 2) |W|^2: strictly convex, one minimum."""
    weight = next(model.parameters())
    return nn.functional.cross_entropy(model(x), y) + 0.5 * WEIGHT_DECAY * weight.square().sum()


def state_nbytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in one LBFGS state dict, history lists included."""
    tensors = [v for value in state.values() for v in (value if isinstance(value, list) else [value])]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main() -> None:
    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    model = make_model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.LBFGS, **LBFGS_OPTIONS)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    x, y = make_data()
    x_mine, y_mine = x.chunk(world_size)[rank], y.chunk(world_size)[rank]  # equal shards
    calls = 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        # NOTE: every rank adds the same penalty, so DDP's average of the gradients keeps it once.
        loss = objective(net, x_mine, y_mine)
        loss.backward()  # DDP averages the gradients over ranks
        loss = loss.detach().clone()
        if distributed:  # every rank must return the same loss: the full-batch mean
            dist.all_reduce(loss)
            loss /= world_size
        return loss

    start = time.perf_counter()
    for step in range(STEPS):
        first_loss = opt.step(closure)
        if rank == 0:
            print(f"step {step}  loss before {float(first_loss):.6f}  closure calls so far {calls}")
    loss = float(closure())
    elapsed = time.perf_counter() - start

    numel = sum(p.numel() for p in model.parameters())
    mine = opt.local_state_nbytes()
    per_rank = [mine]
    if distributed:
        per_rank = [0] * world_size
        dist.all_gather_object(per_rank, mine)
    if rank == 0:
        # torch.optim.LBFGS on one process, full batch, same options: its state and final loss
        ref = make_model()
        ref_opt = torch.optim.LBFGS(ref.parameters(), **LBFGS_OPTIONS)

        def ref_closure() -> torch.Tensor:
            ref_opt.zero_grad()
            ref_loss = objective(ref, x, y)
            ref_loss.backward()
            return ref_loss.detach()

        for _ in range(STEPS):
            ref_opt.step(ref_closure)
        ref_state = ref_opt.state[next(ref.parameters())]
        state = next(iter(opt.optim.state.values()))
        iterations = state["n_iter"]
        print(f"\n{world_size} rank(s), {numel:,} float64 parameters, {STEPS} steps in {elapsed:.1f} s")
        print(
            f"{iterations} L-BFGS iterations, {calls} closure calls per rank, "
            f"{opt.optim.num_reductions / iterations:.1f} all-reduces per iteration"
        )
        print(
            f"history: {len(state['old_dirs'])} (s, y) pairs of history_size {LBFGS_OPTIONS['history_size']}"
        )
        print(f"torch.optim.LBFGS state (one process): {state_nbytes(ref_state):>10,} B")
        for r, nbytes in enumerate(per_rank):
            print(f"rank {r} state (sharded):              {nbytes:>10,} B")
        print(f"final loss: sharded {loss:.12f}   torch.optim.LBFGS {float(ref_closure()):.12f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
