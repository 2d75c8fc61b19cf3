"""Hybrid sharding at 4 ranks (2 shard x 2 replicate): parity, memory, checkpoints, verification.

The oracle is DDP over all 4 ranks + torch.optim.AdamW (the unsharded optimizer on the global
batch). Every test runs on the shared 4-rank pool; groups are built on every rank in the same
order (new_group is collective).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from shardoptim import ShardedOptimizer, checkpoint, hybrid_groups
from tests._dist import RankPool, all_equal_across_ranks

RTOL, ATOL = 1e-5, 1e-6
LR = 1e-2


class _Net(torch.nn.Module):
    """A few layers; `only0` gets a gradient on global rank 0 only (absent from replica 1 entirely)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Linear(24, 37)
        self.b = torch.nn.Linear(37, 3)
        self.only0 = torch.nn.Linear(24, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b(torch.tanh(self.a(x)))
        if dist.get_rank() == 0:
            out = out + self.only0(x)
        return out


def _loss(model: torch.nn.Module, step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + dist.get_rank())
    x, y = torch.randn(4, 24, generator=gen), torch.randn(4, 3, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y)


def _groups_2x2(how: str) -> dict[str, Any]:
    if how == "groups":
        shard, replicate = hybrid_groups(shard_size=2)
        return {"shard_group": shard, "replicate_group": replicate}
    if how == "env":
        os.environ["LOCAL_WORLD_SIZE"] = "2"
        try:
            shard, replicate = hybrid_groups()
        finally:
            del os.environ["LOCAL_WORLD_SIZE"]
        return {"process_group": shard, "replicate_group": replicate}
    from torch.distributed.device_mesh import init_device_mesh

    return {"device_mesh": init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))}


def _check_parity(rank: int, world_size: int, *, stage: int, how: str, steps: int = 4, micro: int = 2) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Net()
    ref = DDP(copy.deepcopy(model), find_unused_parameters=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    trained = DDP(model, find_unused_parameters=True) if stage == 1 else model
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=stage, lr=LR, weight_decay=0.1, **_groups_2x2(how))
    norms = []
    for step in range(steps):
        for m in range(micro):
            # the mesh case accumulates the first micro-batch locally (no_sync) on both sides
            local = how == "mesh" and m < micro - 1
            with ref.no_sync() if local else contextlib.nullcontext():
                _loss(ref, step, m).div(micro).backward()
            with opt.no_sync() if local else contextlib.nullcontext():
                _loss(trained, step, m).div(micro).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        norm = opt.clip_grad_norm_(0.05)
        norms.append((float(ref_norm), float(norm)))
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    opt.verify_replicas()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)
    same = all(all_equal_across_ranks(p.detach()) for p in model.parameters())
    state = opt.local_state_nbytes()
    full = sum(2 * p.numel() * 4 for p in model.parameters())
    return {
        "shape": (opt.world_size, opt.num_replicas, opt.replica_rank),
        "norms": norms,
        "same": same,
        "state": state,
        "full_state": full,
        "rank_to_numel": opt.rank_to_numel,
    }


@pytest.mark.parametrize(("stage", "how"), [(1, "groups"), (2, "groups"), (2, "mesh"), (1, "env")])
def test_parity_with_ddp_adamw(ranks4: RankPool, stage: int, how: str) -> None:
    out = ranks4.run(_check_parity, stage=stage, how=how)
    assert [o["shape"] for o in out] == [(2, 2, 0), (2, 2, 0), (2, 2, 1), (2, 2, 1)]
    for o in out:
        assert o["same"]
        for ref_norm, norm in o["norms"]:
            assert norm == pytest.approx(ref_norm, rel=1e-5)
    # state per rank = total / shard size (two ranks split it; padding and step scalars aside)
    for o in out:
        assert abs(o["state"] - o["full_state"] / 2) <= 0.05 * o["full_state"] / 2 + 512
    assert out[0]["state"] == out[2]["state"] and out[1]["state"] == out[3]["state"]


def _check_hparams_and_verify(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Net()
    shard, replicate = hybrid_groups(shard_size=2)
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1, shard_group=shard, replicate_group=replicate)
    opt.param_groups[0]["lr"] = 0.1 + rank  # a rank-local change: rank 0's value must win everywhere
    _loss(model, 0, 0).backward()
    opt.step()
    lr = opt.param_groups[0]["lr"]
    opt.verify_replicas()
    if rank == 3:  # shard rank 1 of replica 1: in neither the shard group nor the replicate group of rank 0
        with torch.no_grad():
            model.a.weight[0, 0] += 1.0
    try:
        opt.verify_replicas()
    except RuntimeError as err:
        return {"lr": lr, "error": str(err)}
    return {"lr": lr, "error": None}


def test_hparams_follow_rank0_and_verify_replicas_spans_both_dims(ranks4: RankPool) -> None:
    out = ranks4.run(_check_hparams_and_verify)
    assert [o["lr"] for o in out] == [0.1] * 4
    assert all(o["error"] is not None for o in out), out
    # rank 3's replicate group (ranks 1, 3) and shard group (ranks 2, 3) name the parameter
    for r in (1, 2, 3):
        assert "parameter 0, shape (37, 24), differs" in out[r]["error"]
    assert "diverged on other ranks" in out[0]["error"]


def _build(how: str, model: torch.nn.Module) -> ShardedOptimizer:
    """`how`: "2x2" (shard x replicate), "4" (plain sharding), "1x2" (ranks 0 and 1: shard 1, replicate 2)."""
    kwargs: dict[str, Any] = {}
    if how == "2x2":
        kwargs = dict(zip(("shard_group", "replicate_group"), hybrid_groups(shard_size=2)))
    elif how == "1x2":
        singles = [dist.new_group([r]) for r in range(4)]
        pair = dist.new_group([0, 1])
        kwargs = {"shard_group": singles[dist.get_rank()], "replicate_group": pair}
    return ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=LR, weight_decay=0.1, **kwargs)


def _train(model: torch.nn.Module, opt: ShardedOptimizer, steps: range) -> None:
    for step in steps:
        _loss(model, step, 0).backward()
        opt.step()
        opt.zero_grad()


def _consolidated(opt: ShardedOptimizer) -> dict[str, Any]:
    opt.consolidate_state_dict(to=0)
    return opt.state_dict()


def _check_round_trip(rank: int, world_size: int, *, path: str) -> dict[str, Any]:
    # 2x2: train, consolidate (the lead replica only), save (the lead replica only)
    torch.manual_seed(0)
    model = _Net()
    opt = _build("2x2", model)
    _train(model, opt, range(3))
    saved = _consolidated(opt)
    checkpoint.save(f"{path}/a", opt, model=model)
    files_a = sorted(p.name for p in Path(f"{path}/a").glob("*.distcp"))
    # -> 4: load, consolidate, compare; save
    model4 = _Net()
    opt4 = _build("4", model4)
    checkpoint.load(f"{path}/a", opt4, model=model4)
    state4 = _consolidated(opt4)
    checkpoint.save(f"{path}/b", opt4, model=model4)
    # -> 1x2 on ranks 0 and 1 (shard 1, replicate 2); ranks 2 and 3 only make the groups
    model12 = _Net()
    state12: dict[str, Any] = {}
    if rank < 2:
        opt12 = _build("1x2", model12)
        checkpoint.load(f"{path}/b", opt12, model=model12)
        state12 = opt12.state_dict()  # unsharded within its shard group: local, no consolidation needed
        checkpoint.save(f"{path}/c", opt12, model=model12)
    else:
        for r in range(4):
            dist.new_group([r])
        dist.new_group([0, 1])
    dist.barrier()
    files_c = sorted(p.name for p in Path(f"{path}/c").glob("*.distcp"))
    # -> 2x2 again; it must continue exactly as the first 2x2 optimizer does
    model22 = _Net()
    opt22 = _build("2x2", model22)
    checkpoint.load(f"{path}/c", opt22, model=model22)
    state22 = _consolidated(opt22)
    _train(model, opt, range(3, 5))
    _train(model22, opt22, range(3, 5))
    continued = all(torch.equal(p, q) for p, q in zip(model.parameters(), model22.parameters()))
    return {
        "saved": saved,
        "states": [state4, state12, state22],
        "files": (files_a, files_c),
        "continued": continued,
    }


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if sorted(a["state"]) != sorted(b["state"]):
        return False
    for index, entry in a["state"].items():
        other = b["state"][index]
        if sorted(entry) != sorted(other):
            return False
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and not torch.equal(value, other[key]):
                return False
    return [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]


def test_checkpoint_round_trips_2x2_4_1x2_2x2(ranks4: RankPool, tmp_path: Path) -> None:
    out = ranks4.run(_check_round_trip, path=str(tmp_path))
    saved = out[0]["saved"]
    assert saved["state"], "rank 0 holds the consolidated state"
    assert [o["saved"] for o in out[1:]] == [{}, {}, {}]  # not the target, or not the lead replica
    state4, state12, state22 = out[0]["states"]
    assert _same_state(saved, state4) and _same_state(saved, state12) and _same_state(saved, state22)
    assert _same_state(saved, out[1]["states"][1])  # the second replica of 1x2 holds the same full state
    files_a, files_c = out[0]["files"]
    assert len(files_a) == 2, files_a  # written by the lead replica's 2 ranks only
    assert len(files_c) == 1, files_c  # 1x2: one writer
    assert all(o["continued"] for o in out)


def _check_bad_grid(rank: int, world_size: int) -> str:
    shard, _ = hybrid_groups(shard_size=2)
    try:
        ShardedOptimizer(_Net().parameters(), torch.optim.AdamW, shard_group=shard, replicate_group=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return ""


def test_replicate_group_that_does_not_fit_is_refused_on_every_rank(ranks4: RankPool) -> None:
    out = ranks4.run(_check_bad_grid)
    assert all("replicate_group does not fit the shard groups" in message for message in out), out
    assert all("different shard ranks [0, 1, 0, 1]" in message for message in out), out


def _side_groups(rank: int, world_size: int) -> list[float]:
    """Each shard group makes its CPU side group alone (the other pair never calls), then reduces on it."""
    from shardoptim.sidegroup import host_side_group

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = pairs[rank // 2]
    if rank // 2 == 1:
        time.sleep(0.5)  # the pairs create their side groups at different times: no global sync needed
    side = host_side_group(mine, timeout_s=60)
    assert dist.get_rank(side) == dist.get_rank(mine) == rank % 2
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=side)
    return [value.item()]


def test_cpu_side_groups_are_made_by_their_members_only(ranks4: RankPool) -> None:
    """The metadata side group of an NCCL-only shard group (Comm.for_metadata) needs only its members."""
    assert ranks4.run(_side_groups) == [[1.0], [1.0], [5.0], [5.0]]
