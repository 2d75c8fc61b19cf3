"""Faults with real processes: a rank SIGKILLed mid-step or mid-save, and a step that one rank skips.

Each test runs on its own 3-rank RankPool, never a shared one: a dead rank kills the pool. The
optimizer runs on a group made with `dist.new_group(timeout=PG_TIMEOUT_S)`, the short collective
timeout that `init_distributed(timeout=...)` sets on the default group in production. A separate group
is needed because RankPool uses its timeout_s both as the deadline of run() and as the timeout of its own
default group: a collective timing out after PG_TIMEOUT_S on that group would race the pool's deadline,
and the pool would kill the ranks before they could report. Here the pool's deadline (POOL_TIMEOUT_S)
is well above PG_TIMEOUT_S.

A surviving rank catches the error, measures the time from just before the faulty call to the error, and
writes (error type, message, seconds) to out/rank{r}.json at once: the pool kills the survivors as soon
as it sees the dead rank, and pool.run() itself then fails with a RuntimeError naming it. The test
asserts on those files. `pytest -s` prints the fault-to-error times.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter

from shardoptim import ShardedOptimizer, checkpoint, checkpoint_save
from shardoptim.comm import Comm
from tests._dist import RankPool, all_equal_across_ranks

WORLD_SIZE = 3
DYING_RANK = 2
PG_TIMEOUT_S = 10.0
"""Timeout of the group the optimizer runs on: every collective of the library fails after this."""
POOL_TIMEOUT_S = 45.0
"""Deadline of each pool run (and timeout of the pool's own default group)."""
MARGIN_S = 5.0
"""Allowed time on top of PG_TIMEOUT_S from the fault to the error on a survivor."""
OPTIONS: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1}
SAVED_AT = 3
"""Steps before the last complete checkpoint of the save test."""
_KILLED = rf"rank {DYING_RANK}: exit code -9 \(killed by SIGKILL\)"


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(50, 13, generator=gen))
        self.w = torch.nn.Parameter(torch.randn(13, 29, generator=gen))
        self.b = torch.nn.Parameter(torch.randn(29, generator=gen))


def _groups(model: _Net) -> list[dict[str, Any]]:
    return [{"params": [model.emb, model.w]}, {"params": [model.b], "lr": 3e-3}]


def _grads_(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(500 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


class _Run:
    """A model, its ShardedOptimizer(AdamW) and a StepLR scheduler, trained on seeded gradients."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.model = _Net()
        self.opt = ShardedOptimizer(_groups(self.model), torch.optim.AdamW, process_group=group, **OPTIONS)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)

    def train_(self, steps: range) -> None:
        for step in steps:
            _grads_(self.model, step)
            self.opt.step()
            self.sched.step()

    def save(self, path: str, step: int) -> None:
        checkpoint.save(path, self.opt, model=self.model, extra={"sched": self.sched, "step": step})


def _short_group() -> dist.ProcessGroup:
    """Collective: a group of every rank whose collectives time out after PG_TIMEOUT_S."""
    group = dist.new_group(timeout=timedelta(seconds=PG_TIMEOUT_S))
    assert group is not None
    return group


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _record(out: str, rank: int, err: BaseException | None, seconds: float) -> None:
    """Write this rank's outcome to out/rank{rank}.json (first, before anything can kill this process)."""
    payload = {
        "error": "" if err is None else type(err).__name__,
        "message": "" if err is None else str(err),
        "seconds": seconds,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(payload))


def _timed(out: str, rank: int, call: Any) -> None:
    start = time.monotonic()
    try:
        call()
    except (Exception, CheckpointException) as err:  # NOTE: CheckpointException is a BaseException
        _record(out, rank, err, time.monotonic() - start)
        return
    _record(out, rank, None, time.monotonic() - start)


def _records(out: Path, ranks: list[int]) -> dict[int, dict[str, Any]]:
    found = {int(f.stem[4:]): json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))}
    assert sorted(found) == ranks, (
        f"expected reports from ranks {ranks}, got {sorted(found)}: a survivor that did not report got no error "
        "before the pool killed it (or it hung)"
    )
    return found


def _report(label: str, records: dict[int, dict[str, Any]]) -> None:
    times = ", ".join(f"rank {r}: {rec['seconds']:.3f} s ({rec['error']})" for r, rec in records.items())
    print(f"\n[fault-to-error] {label}: {times} (group timeout {PG_TIMEOUT_S:g} s)")


# (a) a rank dies during step ------------------------------------------------------------------------------


def _check_die_in_step(rank: int, world_size: int, *, out: str, where: str) -> None:
    group = _short_group()
    run = _Run(group)
    run.train_(range(2))
    if rank == DYING_RANK:
        if where == "hyperparameter sync":
            run.opt._stepper.ctx.hparams.sync_ = lambda *args, **kwargs: _kill_self()  # type: ignore[method-assign]
        elif where == "local update":
            run.opt.optim.step = lambda *args, **kwargs: _kill_self()  # type: ignore[method-assign]
        else:
            run.opt.placement.comm.gather_bucket_async = lambda *args, **kwargs: _kill_self()  # type: ignore[method-assign]
            run.opt.placement.comm.gather_buckets_ = lambda *args, **kwargs: _kill_self()  # type: ignore[method-assign]
    _grads_(run.model, 2)
    # NOTE: a survivor returns right after reporting; the pool then kills it with its group still open.
    _timed(out, rank, run.opt.step)


@pytest.mark.parametrize(
    ("where", "operation"),
    [
        ("hyperparameter sync", "hyperparameter broadcast"),
        ("local update", "parameter gather"),
        ("parameter gather", "parameter gather"),
    ],
)
def test_rank_killed_during_step(tmp_path: Path, where: str, operation: str) -> None:
    with RankPool(WORLD_SIZE, timeout_s=POOL_TIMEOUT_S) as pool, pytest.raises(RuntimeError, match=_KILLED):
        pool.run(_check_die_in_step, out=str(tmp_path), where=where)
    records = _records(tmp_path, [0, 1])
    _report(f"SIGKILL rank {DYING_RANK} in step ({where})", records)
    for rank, record in records.items():
        assert record["error"] == "RuntimeError", record
        assert record["message"].startswith(f"[rank {rank}/{WORLD_SIZE}] {operation}"), record["message"]
        assert record["seconds"] < PG_TIMEOUT_S + MARGIN_S, record


def _check_die_in_stage2_backward(rank: int, world_size: int, *, out: str) -> None:
    model = _Net()
    opt = ShardedOptimizer(_groups(model), torch.optim.AdamW, process_group=_short_group(), stage=2, **OPTIONS)

    def loss() -> torch.Tensor:
        return (model.emb[:7] @ model.w + model.b).pow(2).sum()

    loss().backward()
    opt.step()
    opt.zero_grad()
    if rank == DYING_RANK:
        model.b.register_post_accumulate_grad_hook(lambda _: _kill_self())
    _timed(out, rank, lambda: loss().backward())


def test_rank_killed_during_stage2_backward(tmp_path: Path) -> None:
    """A rank dying while gradients are reduce-scattered: every survivor's backward raises, none hangs."""
    with RankPool(WORLD_SIZE, timeout_s=POOL_TIMEOUT_S) as pool, pytest.raises(RuntimeError, match=_KILLED):
        pool.run(_check_die_in_stage2_backward, out=str(tmp_path))
    records = _records(tmp_path, [0, 1])
    _report(f"SIGKILL rank {DYING_RANK} in stage-2 backward", records)
    for rank, record in records.items():
        assert record["error"] == "RuntimeError", record
        assert record["message"].startswith(f"[rank {rank}/{WORLD_SIZE}] gradient reduce-scatter"), record
        assert record["seconds"] < PG_TIMEOUT_S + MARGIN_S, record


# (b) a rank dies during checkpoint.save -------------------------------------------------------------------


def _check_die_in_save(rank: int, world_size: int, *, path: str, out: str, where: str) -> None:
    group = _short_group()
    run = _Run(group)
    run.train_(range(SAVED_AT))
    run.save(path, SAVED_AT)
    run.train_(range(SAVED_AT, SAVED_AT + 2))
    if rank == DYING_RANK:
        if where == "write":
            FileSystemWriter.write_data = lambda *args, **kwargs: _kill_self()  # type: ignore[method-assign]
        else:
            checkpoint_save.dcp_save = lambda *args, **kwargs: _kill_self()  # type: ignore[assignment]
    _timed(out, rank, lambda: run.save(path, SAVED_AT + 2))


def _check_resume(rank: int, world_size: int, *, path: str, partial: str, more: int) -> None:
    """Reject the partial save, load the previous checkpoint, and match a run that never crashed."""
    run = _Run(None)
    with torch.no_grad():
        for p in run.model.parameters():
            p.zero_()  # the checkpoint must restore the model too
    with pytest.raises(ValueError, match=r"is incomplete \(no COMPLETE marker\)"):
        checkpoint.load(partial, run.opt, model=run.model, extra={"sched": run.sched})
    extras = checkpoint.load(path, run.opt, model=run.model, extra={"sched": run.sched})
    assert extras["step"] == SAVED_AT and run.sched.last_epoch == SAVED_AT
    ref_model = _Net()
    flags = {k: v for k in ("fused", "foreach") if (v := run.opt.param_groups[0].get(k)) is not None}
    ref = torch.optim.AdamW(_groups(ref_model), **OPTIONS, **flags)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for step in range(SAVED_AT + more):
        _grads_(ref_model, step)
        ref.step()
        ref_sched.step()
        if step >= SAVED_AT:
            run.train_(range(step, step + 1))
            for (name, p), q in zip(run.model.named_parameters(), ref_model.parameters()):
                assert torch.equal(p, q), f"{name} differs from the run that never crashed at step {step}"
    assert [g["lr"] for g in run.opt.param_groups] == [g["lr"] for g in ref.param_groups]
    run.opt.verify_replicas()
    assert all(all_equal_across_ranks(p) for p in run.model.parameters())


def test_rank_killed_during_checkpoint_save_resumes_bitwise(tmp_path: Path, ranks2: RankPool) -> None:
    path, out = tmp_path / "ckpt", tmp_path / "errors"
    out.mkdir()
    with RankPool(WORLD_SIZE, timeout_s=POOL_TIMEOUT_S) as pool, pytest.raises(RuntimeError, match=_KILLED):
        pool.run(_check_die_in_save, path=str(path), out=str(out), where="write")
    records = _records(out, [0, 1])
    _report(f"SIGKILL rank {DYING_RANK} while it writes its checkpoint shard", records)
    for record in records.values():
        assert record["error"], "a survivor finished the save without its peer"
        assert record["seconds"] < PG_TIMEOUT_S + MARGIN_S, record
    assert (path / "COMPLETE").is_file(), "the previous checkpoint is gone"
    partial = tmp_path / "ckpt.partial"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    # Resume on a fresh group of another world size (3 -> 2 ranks).
    ranks2.run(_check_resume, path=str(path), partial=str(partial), more=4)


def test_rank_killed_during_checkpoint_save_error_names_operation(tmp_path: Path) -> None:
    path, out = tmp_path / "ckpt", tmp_path / "errors"
    out.mkdir()
    with RankPool(WORLD_SIZE, timeout_s=POOL_TIMEOUT_S) as pool, pytest.raises(RuntimeError, match=_KILLED):
        pool.run(_check_die_in_save, path=str(path), out=str(out), where="dcp_save")
    records = _records(out, [0, 1])
    _report(f"SIGKILL rank {DYING_RANK} on entering torch.distributed.checkpoint.save", records)
    for rank, record in records.items():
        assert record["seconds"] < PG_TIMEOUT_S + MARGIN_S, record
        assert record["message"].startswith(f"[rank {rank}/{WORLD_SIZE}] checkpoint.save"), record["message"]


# (c) a step that one rank skips ---------------------------------------------------------------------------


def _check_step_skipped_by_rank0(rank: int, world_size: int, *, out: str) -> None:
    group = _short_group()
    try:
        run = _Run(group)
        run.train_(range(1))
        if rank != 0:
            _grads_(run.model, 1)
            _timed(out, rank, run.opt.step)
        # NOTE: rank 0 skips the step and waits here, on the pool's default group, with the short group open
        # (closing it would show the others a closed connection rather than a timeout).
        dist.barrier()
    finally:
        dist.destroy_process_group(group)


def test_step_on_some_ranks_only_times_out(tmp_path: Path) -> None:
    with RankPool(WORLD_SIZE, timeout_s=POOL_TIMEOUT_S) as pool:
        pool.run(_check_step_skipped_by_rank0, out=str(tmp_path))
    records = _records(tmp_path, [1, 2])
    _report("rank 0 skips opt.step() (ranks 1, 2 call it)", records)
    for rank, record in records.items():
        assert record["error"] == "RuntimeError", record
        # One host: the agreement goes through the shared staging; elsewhere a gloo all-reduce.
        assert record["message"].startswith(
            (
                f"[rank {rank}/{WORLD_SIZE}] hyperparameter broadcast failed or timed out",
                f"[rank {rank}/{WORLD_SIZE}] hyperparameter broadcast (shared memory): ranks [0] did not reach",
            )
        ), record["message"]
        assert record["seconds"] < PG_TIMEOUT_S + MARGIN_S, record
    assert max(record["seconds"] for record in records.values()) > PG_TIMEOUT_S / 2, (
        "detected before any timeout?"
    )


def _check_shm_round_skipped_by_rank0(rank: int, world_size: int, *, out: str) -> None:
    group = _short_group()
    try:
        comm = Comm(group)
        bounds = [0, 64, 128, 192]
        staging = comm.transports.shared_staging()
        assert staging is not None
        assert staging.gather_many_([(torch.zeros(192), bounds)])  # maps the area; every rank takes part
        if rank != 0:
            _timed(out, rank, lambda: staging.gather_many_([(torch.zeros(192), bounds)]))
        dist.barrier()  # rank 0 skipped the round; it waits here on the pool's group, as above
    finally:
        dist.destroy_process_group(group)


def test_shm_round_on_some_ranks_only_times_out_after_the_group_timeout(tmp_path: Path) -> None:
    """The shared-memory barrier waits as long as the group's own timeout, not torch's 30-minute default."""
    with RankPool(WORLD_SIZE, timeout_s=POOL_TIMEOUT_S) as pool:
        pool.run(_check_shm_round_skipped_by_rank0, out=str(tmp_path))
    records = _records(tmp_path, [1, 2])
    _report("rank 0 skips a shared-memory gather round (ranks 1, 2 enter it)", records)
    for rank, record in records.items():
        assert record["error"] == "RuntimeError", record
        assert record["message"].startswith(f"[rank {rank}/{WORLD_SIZE}] parameter gather (shared memory)"), record
        assert "ranks [0] did not reach barrier" in record["message"], record
        assert PG_TIMEOUT_S <= record["seconds"] < PG_TIMEOUT_S + MARGIN_S, record
