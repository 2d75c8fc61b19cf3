"""opt.clip_grad_norm_ over bf16 and mixed fp32+bf16 gradients sharded across 2 gloo ranks.

Every rank feeds the same batch, so the averaged gradients equal one process's and
torch.nn.utils.clip_grad_norm_ on an unsharded copy is the reference (to bf16 rounding: torch
rounds the per-tensor norms to bf16, shardoptim norms in fp32; tests/unit/test_gradnorm_dtypes.py).
The clipped gradients are read back as the weights after one foreach SGD step (lr=1) from zero.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch

from shardoptim import ShardedOptimizer
from tests._dist import all_equal_across_ranks


def _net(dtypes: tuple[torch.dtype, ...]) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 29).to(dtypes[0]),  # 377 + 29 elements: odd, cut across the 2 ranks
        torch.nn.Linear(29, 7).to(dtypes[1]),
        torch.nn.Linear(7, 3).to(dtypes[2]),
    )


def _loss(model: torch.nn.Sequential) -> torch.Tensor:
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(1))
    for layer in model:
        x = layer(x.to(layer.weight.dtype))
    return x.float().pow(2).sum()


def _check_clip_dtypes(rank: int, world_size: int) -> list[str]:
    mixes = {"bf16": (torch.bfloat16,) * 3, "fp32+bf16": (torch.float32, torch.bfloat16, torch.float32)}
    checked = []
    for (name, dtypes), stage, master in itertools.product(mixes.items(), (1, 2), (None, torch.float32)):
        model = _net(dtypes)
        ref = copy.deepcopy(model)
        opt = ShardedOptimizer(
            model.parameters(),
            torch.optim.SGD,
            stage=stage,
            master_dtype=master,
            bucket_numel=300,
            lr=1.0,
            foreach=True,  # not fused: pytorch/pytorch#191763 (CPU fused SGD and bf16)
        )
        _loss(model).backward()  # the same on every rank: stage 1 needs no all-reduce
        _loss(ref).backward()
        theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ours = opt.clip_grad_norm_(0.05)
        assert ours.dtype == torch.float32
        assert all_equal_across_ranks(ours)
        label = f"{name} stage={stage} master={master}"
        torch.testing.assert_close(
            ours, theirs.float(), rtol=2e-2, atol=0, msg=lambda m, s=label: f"{s}: {m}"
        )
        assert ours.item() > 0.05 * 10  # clipping by a factor of 10 or more happened
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert all_equal_across_ranks(p.detach())
            assert q.grad is not None
            torch.testing.assert_close(
                -p.detach().double(),
                q.grad.double(),
                rtol=2e-2 + 2 * torch.finfo(p.dtype).eps,
                atol=torch.finfo(p.dtype).tiny,
                msg=lambda m, s=label: f"{s}: {m}",
            )
        checked.append(label)
    return checked


def test_clip_bf16_and_mixed_at_2_ranks(ranks2: Any) -> None:
    checked = ranks2.run(_check_clip_dtypes)
    assert checked[0] == checked[1] and len(checked[0]) == 8
