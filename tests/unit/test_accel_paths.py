"""The CUDA/NCCL paths checked without a GPU, in one process on torch's fake process group.

A fake group registered for the "meta" device only stands in for an NCCL-only group (no CPU
backend, as `init_process_group()` without a backend or `init_device_mesh("cuda", ...)` make on a
GPU host): its collectives take meta tensors, and any host read of a meta tensor raises, so a
step that runs through proves it reads nothing back except through `Comm.to_host`, which counts.
"cpu:fake,meta:fake" stands in for "cpu:gloo,cuda:nccl". torch's fake group is private
(torch.testing._internal); the tests skip with a reason if this torch lacks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from shardoptim import ShardedOptimizer, sidegroup
from shardoptim.comm import Comm

fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="needs torch's fake group")


def _init(backend: str, *, rank: int = 1, world_size: int = 4) -> None:
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=fake_pg.FakeStore())


@pytest.fixture
def fake_group(request: pytest.FixtureRequest) -> Iterator[str]:
    backend = request.param
    assert not dist.is_initialized()
    _init(backend)
    try:
        with mock.patch.object(sidegroup, "HOST_BACKEND", "fake"):  # the CPU side group of "meta:fake"
            yield backend
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("fake_group", "expected"),
    [("meta:fake", "meta"), ("cpu:fake,meta:fake", "cpu"), ("cuda:fake", "cuda:3")],
    indirect=["fake_group"],
)
def test_small_collectives_follow_the_groups_devices(fake_group: str, expected: str) -> None:
    """The device comes from the group's backends, not from the backend's name (old: "nccl" only)."""
    with mock.patch("torch.cuda.current_device", return_value=3):
        comm = Comm()
        assert comm.device == torch.device(expected), (fake_group, comm.device)
        # A CPU `step` scalar beside accelerator parameters travels on the group's device.
        assert comm.wire_device(torch.device("cpu")) == torch.device(expected)
        if expected == "cpu":  # CUDA state keeps its own device where the group has a backend for it
            assert comm.wire_device(torch.device("meta")) == torch.device("meta")


def _params() -> list[torch.nn.Parameter]:
    return [
        torch.nn.Parameter(torch.empty(shape, device="meta"))
        for shape in [(256, 64), (64,), (64, 64), (10, 64), (10,)]
    ]


def _two_steps(opt: ShardedOptimizer, params: list[torch.nn.Parameter], *, stage: int, clip: bool) -> int:
    """Run two steps; return the host reads of collective results per step."""
    before = opt.placement.comm.num_host_reads
    for _ in range(2):
        if stage == 2:
            torch.stack([p.sum() for p in params]).sum().backward()
        else:
            for p in params:
                p.grad = torch.empty_like(p)
        if clip:
            opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    return (opt.placement.comm.num_host_reads - before) // 2


_CASES: list[tuple[dict[str, Any], bool]] = [
    ({}, False),
    ({"foreach": True}, False),
    ({"stage": 2}, False),
    ({"stage": 2}, True),
    ({"stage": 2, "skip_nonfinite": True}, True),
    ({"skip_nonfinite": True, "hparam_sync": "off"}, False),
]


class _ThirdPartySGD(torch.optim.SGD):
    """A class outside torch.optim: its step's success is agreed on every step (a flag all-reduce)."""


@pytest.mark.parametrize("fake_group", ["meta:fake", "cpu:fake,meta:fake"], indirect=True)
def test_third_party_class_reads(fake_group: str) -> None:
    """A third-party step's success is agreed on the CPU side group: no host read (old: two per step)."""
    params = _params()
    opt = ShardedOptimizer(params, _ThirdPartySGD, lr=0.1)
    reads = _two_steps(opt, params, stage=1, clip=False)
    assert reads == 0, reads


@pytest.mark.parametrize("fake_group", ["meta:fake", "cpu:fake,meta:fake"], indirect=True)
def test_meta_parameters_construct_and_step(fake_group: str) -> None:
    """World size 4, meta parameters: construction and steps read no meta tensor on the host.

    Host reads per step: none by default (the hyperparameter probe and the flags stay on the CPU:
    the group's CPU backend, or the CPU side group of an accelerator-only group; clipping stays on
    the device), one with skip_nonfinite (the inf/nan flag, which lives on the device).
    """
    for kwargs, clip in _CASES:
        params = _params()
        opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-3, **kwargs)
        assert opt.placement.comm.device.type == fake_group.split(":")[0]
        reads = _two_steps(opt, params, stage=int(kwargs.get("stage", 1)), clip=clip)
        assert reads == (1 if kwargs.get("skip_nonfinite") else 0), (kwargs, clip, reads)


class _StreamWork:
    """A Work with NCCL's semantics: wait() without a timeout returns at once (only the stream waits)."""

    def __init__(self, log: list[str]) -> None:
        self._log = log

    def wait(self, timeout: timedelta | None = None) -> bool:
        self._log.append("stream" if timeout is None else "host")
        return True

    def is_completed(self) -> bool:
        return False


@pytest.mark.parametrize("fake_group", ["meta:fake"], indirect=True)
def test_barrier_blocks_the_host_on_an_accelerator_group(fake_group: str) -> None:
    """Every wait of Comm.barrier blocks the host (old: stream-only waits on NCCL), then reads the flags."""
    comm = Comm()
    log: list[str] = []
    with (
        mock.patch.object(dist, "broadcast", lambda *a, **k: _StreamWork(log)),
        mock.patch.object(dist, "isend", lambda *a, **k: _StreamWork(log)),
        mock.patch.object(dist, "irecv", lambda *a, **k: _StreamWork(log)),
    ):
        comm.barrier(what="test barrier")
        comm.wait_work(_StreamWork(log), "a step's gather")  # the step's waits stay stream waits
        comm.send(torch.empty(1, device="meta"), dst=0, what="consolidation")  # a dead peer raises here
        comm.recv(torch.empty(1, device="meta"), src=0, what="consolidation")
    assert log == ["host"] * comm.world_size + ["stream", "host", "host"], log
    assert comm.num_host_reads == 1


class _Stop(Exception):
    pass


@pytest.mark.parametrize("fake_group", ["meta:fake", "cpu:fake,meta:fake"], indirect=True)
def test_consolidation_sends_and_receives_on_one_device(fake_group: str) -> None:
    """State tensors travel on the parameter's device on both ends (old: as they were / on comm.device).

    Meta parameters stand in for CUDA ones; `step` is a CPU scalar as torch keeps it beside CUDA
    parameters without fused kernels (NAdam's `mu_product` too). On an NCCL-only group the old
    sender sent the CPU scalar as it was (NCCL raises, the receiver waits for the watchdog); on
    "cpu:gloo,cuda:nccl" the old receiver received on the CPU what the sender sent on CUDA (a hang).
    """
    from types import SimpleNamespace

    from shardoptim.state_dict import _move

    comm = Comm()
    opt = SimpleNamespace(placement=SimpleNamespace(comm=comm, params=[torch.empty(4, 8, device="meta")]))
    index_to_local = {0: {"step": torch.tensor(3.0), "exp_avg": torch.empty(32, device="meta")}}
    sent: list[torch.device] = []
    received: list[torch.device] = []

    def recv(tensor: torch.Tensor, **_: Any) -> None:
        received.append(tensor.device)
        raise _Stop  # a meta tensor cannot be copied into the CPU result: the routing is what is checked

    with mock.patch.object(comm, "send", lambda tensor, **_: sent.append(tensor.device)):
        for key in ("step", "exp_avg"):
            _move(opt, None, index_to_local, 0, key, src=comm.rank, to=0, what=key)  # type: ignore[arg-type]
    assert sent == [torch.device("meta")] * 2, sent
    with mock.patch.object(comm, "rank", 0), mock.patch.object(comm, "recv", recv):
        for key in ("step", "exp_avg"):
            with pytest.raises(_Stop):
                _move(opt, torch.empty(32), index_to_local, 0, key, src=1, to=0, what=key)  # type: ignore[arg-type]
    assert received == [torch.device("meta")] * 2, received


@pytest.mark.parametrize("fake_group", ["meta:fake", "cpu:fake,meta:fake"], indirect=True)
def test_device_tensor_options_are_read_once_per_change(fake_group: str) -> None:
    """A tensor-valued option on the device (a CUDA lr) is read back only after it changed (old: every step).

    Reads go through hparam_pack._read_device (patched: a meta tensor has no values); the per-step sync,
    the snapshot before the base step and the flow-back after it read nothing while its version
    counter stays put.
    """
    from shardoptim import hparam_flow, hparam_pack, hparams

    lr = torch.tensor(0.1, device="meta")
    groups = [{"params": [], "lr": lr, "momentum": 0.9}]
    reads: list[int] = []

    def read(tensor: torch.Tensor) -> list[float]:
        reads.append(tensor._version)
        return [0.1]

    syncer = hparams.HparamSyncer(Comm(), "broadcast")
    with mock.patch.object(hparam_pack, "_read_device", read):
        for _ in range(3):
            syncer.sync_(groups)
            before = hparam_flow.snapshot_hparams(groups)
            assert hparam_flow.flow_back_hparams_(groups, [dict(groups[0])], before) == []
        assert len(reads) == 1, reads
        lr.mul_(0.5)  # a scheduler writing in place: read again, once
        before = hparam_flow.snapshot_hparams(groups)
        lr.mul_(1.0)
        assert hparam_flow.flow_back_hparams_(groups, [dict(groups[0])], before) == [(0, "lr")]
        for _ in range(2):
            syncer.sync_(groups)
        assert len(reads) == 2, reads
