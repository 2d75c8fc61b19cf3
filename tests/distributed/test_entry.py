"""The entry check of the optimizer's rare collectives: fast failure on a lone call, no harm to what follows.

Also add_param_group's agreement: a group rejected on one rank is rolled back on every rank.

The torchrun test of the same mistake inside a DDP loop is tests/launch/test_handwritten_loop.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from shardoptim import EntryError, ShardedOptimizer


def _opt(**options: Any) -> tuple[list[torch.nn.Parameter], ShardedOptimizer]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((9, 7), (5,))]
    opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-2, **options)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt


def _check_lone_call(rank: int, world_size: int) -> dict[str, Any]:
    """Rank 0 consolidates alone: it raises within the deadline, and the group stays usable."""
    _, opt = _opt(entry_timeout_s=0.5)
    seen: dict[str, Any] = {}
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(EntryError, match=r"ranks \[1\] did not call it within 0.5 s.*Called on rank 0 only\?"):
            opt.consolidate_state_dict(to=0)
        seen["elapsed"] = time.monotonic() - start
    else:
        time.sleep(1.0)  # busy elsewhere past rank 0's deadline
    # Nothing of the abandoned consolidation is pending: the next collective pairs correctly.
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    seen["sum"] = total.item()
    # A later call on every rank does not hang: rank 1 meets the abandoned call, rank 0 the new one.
    with pytest.raises(EntryError):
        opt.consolidate_state_dict(to=0)
    return seen


def test_lone_call_fails_fast_and_leaves_the_group_usable(ranks2: Any) -> None:
    results = ranks2.run(_check_lone_call)
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert 0.5 <= results[0]["elapsed"] < 5.0, results[0]


def _check_late_ranks(rank: int, world_size: int, *, late_rank: int) -> float:
    """Every rank calls, one of them late: only the target's deadline applies, and only to it."""
    params, opt = _opt(entry_timeout_s=0.5)
    if rank == late_rank:
        time.sleep(3.0)  # six times the deadline: a busy machine must not let the target catch up
    sd = opt.full_state_dict(to=0)
    if rank != 0:
        assert sd is None
        return 0.0
    assert sd is not None and sorted(sd["state"]) == [0, 1]
    return float(sd["state"][0]["exp_avg"].sum())


def test_late_target_is_waited_for(ranks2: Any) -> None:
    # The target (rank 0) arrives late, as after a rank-0-only evaluation: the others wait for it.
    results = ranks2.run(_check_late_ranks, late_rank=0)
    assert results[0] != 0.0


def test_late_other_rank_past_the_deadline_is_refused(ranks2: Any) -> None:
    with pytest.raises(Exception, match="did not call it within 0.5 s"):
        ranks2.run(_check_late_ranks, late_rank=1)


def _check_full_state_dict_round_trip(rank: int, world_size: int) -> bool:
    params, opt = _opt()
    sd = opt.full_state_dict(to=world_size - 1)
    if rank != world_size - 1:
        return sd is None and opt.state_dict() == {}
    assert sd is not None
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(ref, lr=1e-2)
    plain.load_state_dict(sd)
    return bool(torch.equal(plain.state[ref[0]]["exp_avg_sq"], sd["state"][0]["exp_avg_sq"]))


def test_full_state_dict_on_the_target_only(ranks3: Any) -> None:
    assert ranks3.run(_check_full_state_dict_round_trip) == [True, True, True]


class _PickyAdamW(torch.optim.AdamW):
    """AdamW whose add_param_group fails on the last rank only (a rank-dependent rejection)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_reject", False):
            raise ValueError("rejected on this rank")
        super().add_param_group(param_group)


def _check_add_param_group_rolls_back(rank: int, world_size: int) -> list[float]:
    import shardoptim

    shardoptim.register_elementwise(_PickyAdamW)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((9, 7), (5,))]
    extra = torch.nn.Parameter(torch.randn(11, generator=gen))
    opt = ShardedOptimizer(params[:1], _PickyAdamW, lr=1e-2)
    before = (len(opt.param_groups), len(opt.optim.param_groups), opt.rank_to_numel(), opt.memory_nbytes())
    opt.optim._reject = rank == world_size - 1  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="rejected on this rank|add_param_group on rank"):
        opt.add_param_group({"params": [params[1], extra], "lr": 3e-3})
    after = (len(opt.param_groups), len(opt.optim.param_groups), opt.rank_to_numel(), opt.memory_nbytes())
    assert after == before, (before, after)
    opt.optim._reject = False  # type: ignore[attr-defined]
    opt.add_param_group({"params": [params[1]], "lr": 3e-3})  # the same again, now accepted everywhere
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return [float(params[0].sum()), float(params[1].sum())]


def test_add_param_group_failing_midway_leaves_the_optimizer_as_it_was(ranks2: Any) -> None:
    results = ranks2.run(_check_add_param_group_rolls_back)
    assert results[0] == results[1]
