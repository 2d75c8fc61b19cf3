"""Parameters in peer regions: the one-copy shared-memory gather (2 gloo ranks on one host).

Where every rank is on one host the CPU buckets live in files every peer maps, and a gather
copies each owner's range straight out of its mapping. Checked against the unsharded optimizer
(bitwise), for own storage and bucket views, flat and whole-tensor sharding, stage 2, an added
group, a parameter that is a view of a larger tensor (it keeps its home, its bucket goes through
the staging area), a rank that cannot reserve its file (every rank falls back), and a rank that
writes its parameters right after the step while a slow peer is still reading them (without
the barrier that closes a gather, the slow rank reads the scaled values and scales them again).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer
from shardoptim.shm import SharedStaging
from tests._dist import RankPool, all_equal_across_ranks


def _model(seed: int, *, window: bool = True) -> tuple[torch.nn.Module, torch.Tensor]:
    """A small model with a channels_last conv and (`window`) a parameter that is a view of a larger tensor."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 33), torch.nn.Linear(33, 7)
    )
    model[0].to(memory_format=torch.channels_last)
    big = torch.randn(100)
    if window:
        model.register_parameter("window", torch.nn.Parameter(big[10:60]))  # shares big's storage
    return model, big


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
    extra = (model.window**2).sum() if hasattr(model, "window") else 0.0
    return (model(x) ** 2).mean() + extra


def _assert_trains_like_adamw(
    model: torch.nn.Module, opt: ShardedOptimizer, ref: torch.nn.Module, *, steps: int
) -> None:
    """Step `model` with `opt` and `ref` with fused AdamW (lr 1e-2) alike; their parameters stay bitwise equal."""
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for step in range(steps):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def _staged_counter(opt: ShardedOptimizer) -> list[int]:
    """Count the buckets that go through the staging area (not read straight from the peers)."""
    staging = opt.placement.comm.transports.shared_staging()
    assert staging is not None
    counts = [0]
    inner = staging.gather_many_

    def counting(buckets: Any) -> bool:
        counts[0] += len(buckets)
        return inner(buckets)

    staging.gather_many_ = counting  # type: ignore[method-assign]
    return counts


def _check_one_copy(rank: int, world_size: int, *, as_view: bool, sharding: str, stage: int) -> None:
    model, big = _model(0)
    ref, ref_big = _model(0)
    window = model.window
    opt = ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        lr=1e-2,
        parameters_as_bucket_view=as_view,
        sharding=sharding,
        stage=stage,
        bucket_numel=600,
    )
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    buckets = opt.placement.buckets
    in_window = {b for b, bucket in enumerate(buckets) if opt.placement.params.index(window) in bucket.param_indices}
    peered = [b for b, bucket in enumerate(buckets) if bucket.segments.peer is not None]
    # bucket views move every parameter anyway; own storage leaves the view of `big` where it is
    assert peered == [b for b in range(len(buckets)) if as_view or b not in in_window], (peered, in_window)
    if not as_view:  # every parameter still has a storage of its own
        assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 7
    for b in peered:
        mine = buckets[b].segments.peer.mine  # type: ignore[union-attr]
        lo, hi = mine.data_ptr(), mine.data_ptr() + mine.numel() * mine.element_size()
        for index in buckets[b].param_indices:
            assert lo <= opt.placement.params[index].data_ptr() < hi
    staged, num_staged = _staged_counter(opt), len(buckets) - len(peered)
    for step in range(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
        if step == 1:
            opt.add_param_group({"params": [extra := torch.nn.Parameter(torch.ones(70))], "lr": 3e-3})
            ref_opt.add_param_group({"params": [ref_extra := torch.nn.Parameter(torch.ones(70))], "lr": 3e-3})
            assert opt.placement.buckets[-1].segments.peer is not None
        if step >= 2:
            extra.grad, ref_extra.grad = torch.full((70,), 0.5), torch.full((70,), 0.5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert all_equal_across_ranks(p.detach())
    assert torch.equal(extra, ref_extra)
    if not as_view:  # the window is still a view of `big`, which sees every update
        assert torch.equal(big[10:60], window) and torch.equal(big, ref_big)
    assert staged[0] == 4 * num_staged, (staged, num_staged)  # the added group's bucket is read from the peers


@pytest.mark.parametrize(
    ("as_view", "sharding", "stage"),
    [(False, "flat", 1), (True, "flat", 1), (False, "tensor", 1), (False, "flat", 2)],
    ids=["own_flat", "view_flat", "own_tensor", "own_stage2"],
)
def test_gathers_read_the_peers(ranks2: RankPool, as_view: bool, sharding: str, stage: int) -> None:
    ranks2.run(_check_one_copy, as_view=as_view, sharding=sharding, stage=stage)


@pytest.mark.parametrize("sharding", ["flat", "tensor"])
def test_gathers_read_the_peers_three_ranks(ranks3: RankPool, sharding: str) -> None:
    """Three ranks: each reads two peers' files; whole tensors give uneven (and empty) ranges."""
    ranks3.run(_check_one_copy, as_view=False, sharding=sharding, stage=1)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _check_no_room(rank: int, world_size: int, *, fail: str) -> list[str]:
    """Rank 1 cannot reserve its file (`fail` "reserve") or cannot open its peer's ("open")."""
    model, _ = _model(1)
    ref, _ = _model(1)
    records = _Records()
    logging.getLogger("shardoptim").addHandler(records)
    reserve, open_file = os.posix_fallocate, os.open

    def full(fd: int, offset: int, length: int) -> None:
        if rank == 1 and length > 4096:  # the staging area is small enough; the parameters are not
            raise OSError(28, "No space left on device")
        reserve(fd, offset, length)

    def hidden(path: str, flags: int, *args: Any) -> int:
        if rank == 1 and "shardoptim-params" in str(path) and flags == os.O_RDONLY:
            raise FileNotFoundError(2, "No such file or directory", path)
        return open_file(path, flags, *args)

    if fail == "reserve":
        os.posix_fallocate = full
    else:
        os.open = hidden  # type: ignore[assignment]
    try:
        opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, bucket_numel=600)
    finally:
        os.posix_fallocate, os.open = reserve, open_file
        logging.getLogger("shardoptim").removeHandler(records)
    assert opt.placement.comm.transports.cpu_name() == "shm"
    assert all(b.segments.peer is None for b in opt.placement.buckets)  # on every rank, not only rank 1
    _assert_trains_like_adamw(model, opt, ref, steps=2)
    return [m for m in records.messages if "shared staging area" in m]


@pytest.mark.parametrize(("fail", "why"), [("reserve", "rank 1 cannot reserve"), ("open", "rank 1 cannot open")])
def test_no_room_falls_back_on_every_rank(ranks2: RankPool, fail: str, why: str) -> None:
    warned = ranks2.run(_check_no_room, fail=fail)
    assert len(warned[0]) == 1 and why in warned[0][0] and "--shm-size" in warned[0][0], warned
    assert warned[1] == []


def _check_slow_reader(rank: int, world_size: int) -> None:
    """Rank 0 reads its peer's range late; rank 1 scales its parameters as soon as its step returns."""
    model, _ = _model(2, window=False)  # every bucket read from the peers: no staging round after them
    ref, _ = _model(2, window=False)
    barrier = SharedStaging.barrier

    def late(self: SharedStaging, what: str) -> None:
        barrier(self, what)
        if rank == 0 and what.endswith("ranges written"):
            time.sleep(0.2)

    SharedStaging.barrier = late  # type: ignore[method-assign]
    try:
        opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, lr=0.5, bucket_numel=600)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        assert all(b.segments.peer is not None for b in opt.placement.buckets)
        for step in range(3):
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                _loss(m, step).backward()
                o.step()
                with torch.no_grad():  # a decay written in place, on every rank, right after the step
                    for p in m.parameters():
                        p.mul_(0.75)
    finally:
        SharedStaging.barrier = barrier  # type: ignore[method-assign]
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_no_write_before_every_peer_has_read(ranks2: RankPool) -> None:
    ranks2.run(_check_slow_reader)


def _rss_shmem_nbytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def _check_rss(rank: int, world_size: int, *, threads: int) -> tuple[int, int, int]:
    """The peers' ranges are read, not mapped: RSS holds this rank's parameters and the staging area only.

    With several torch threads a large gather reads on several threads; the values are the same.
    """
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(1024, 1024, generator=gen)) for _ in range(6)]  # 24 MiB
        expected = [p.detach() - 0.3 for p in params]
        before = _rss_shmem_nbytes()
        opt = ShardedOptimizer(params, torch.optim.SGD, lr=0.1)
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        staging = opt.placement.comm.transports.shared_staging()
        assert staging is not None and all(b.segments.peer is not None for b in opt.placement.buckets)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
            assert all_equal_across_ranks(p.detach())
        pooled = any(t.name.startswith("shardoptim-gather") for t in threading.enumerate())
        assert pooled == (threads > 1), (pooled, threads)
        return _rss_shmem_nbytes() - before, sum(p.numel() * 4 for p in params), staging.nbytes
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("threads", [1, 2])
def test_peer_ranges_are_not_in_rss(ranks2: RankPool, threads: int) -> None:
    for grown, params_nbytes, staging_nbytes in ranks2.run(_check_rss, threads=threads):
        # a mapping of the peer's file would add the half of the parameters read from it (12 MiB)
        assert grown <= params_nbytes + staging_nbytes + (1 << 20), (grown, params_nbytes, staging_nbytes)


def _check_shared_memory(rank: int, world_size: int) -> str:
    """model.share_memory() before building keeps the parameters where they are; after, the step refuses."""
    model, _ = _model(4, window=False)
    ref, _ = _model(4, window=False)
    model.share_memory()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, bucket_numel=600)
    assert all(b.segments.peer is None for b in opt.placement.buckets)
    assert all(p.is_shared() for p in model.parameters())
    _assert_trains_like_adamw(model, opt, ref, steps=2)
    moved, _ = _model(5, window=False)
    opt = ShardedOptimizer(moved.parameters(), torch.optim.AdamW, lr=1e-2)
    assert all(b.segments.peer is not None for b in opt.placement.buckets)
    _loss(moved, 0).backward()
    opt.step()
    moved.share_memory()  # moves every storage out of the peer region, in place
    _loss(moved, 1).backward()
    with pytest.raises(RuntimeError, match=r"moved out of the shared memory.*share_memory_\(\)") as caught:
        opt.step()
    return str(caught.value)


def test_share_memory_before_is_kept_and_after_is_refused(ranks2: RankPool) -> None:
    messages = ranks2.run(_check_shared_memory)
    assert all("before building the ShardedOptimizer" in m for m in messages), messages
