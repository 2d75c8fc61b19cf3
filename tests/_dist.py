"""Spawn-once, run-many pools of gloo ranks for the multi-process tests.

A RankPool starts `world_size` worker processes (multiprocessing "spawn", never fork: fork deadlocks once
torch's OpenMP threads have run), joins them into one gloo process group through a FileStore in a fresh temp
dir, and then runs many module-level rank functions `fn(rank, world_size, **kwargs)` on that same group.
Every wait has a deadline; on a hang or a dead worker the pool is killed, the error names the ranks, and the
next run() starts fresh workers.

Usage from a test module:

    def _check_sum(rank: int, world_size: int, *, scale: int) -> float:
        t = torch.tensor([float(rank * scale)])
        torch.distributed.all_reduce(t)
        return t.item()

    def test_sum(ranks2: RankPool) -> None:
        assert ranks2.run(_check_sum, scale=2) == [2.0, 2.0]

This module must not import torch at import time (a spawned worker imports it before it sets
OMP_NUM_THREADS) and must not import shardoptim (the harness is tested on its own).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue

    import torch

__all__ = ["RankPool", "all_equal_across_ranks", "get_pool", "run_ranks"]

RankFn = Callable[..., Any]
"""A module-level function called as fn(rank, world_size, **kwargs) on every rank."""

_POLL_S = 0.1
"""Queue poll interval: how soon a dead worker or a passed deadline is noticed."""
_JOIN_S = 5.0
"""How long close() waits for workers to exit cleanly before killing them."""
_STACK_DUMP_WAIT_S = 0.5
"""How long to let faulthandler write the stacks of hung ranks before they are killed."""
_MAX_DUMP_CHARS = 6000
"""Tail of each per-rank file quoted in an error message."""
_HEALTH_TIMEOUT_S = 10.0
"""Deadline of the health check run after a failed task."""

_STARTUP_SEQ = 0
_STATUS_READY = "ready"
_STATUS_OK = "ok"
_STATUS_ERR = "err"

# Worker side ---------------------------------------------------------------------------------------------


def _exit_when_orphaned(parent_pid: int, tmp_dir: Path) -> None:
    """Exit this worker once its parent is gone, even while a task is stuck in a collective.

    The parent's close() never ran in that case, so also remove the pool's temp dir.
    """
    while True:
        if os.getppid() != parent_pid:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            os._exit(1)
        time.sleep(1.0)


def _append_error(tmp_dir: Path, rank: int, seq: int, text: str) -> None:
    """Append one traceback to rank{rank}.err in the pool's temp dir."""
    with contextlib.suppress(OSError), open(tmp_dir / f"rank{rank}.err", "a", encoding="utf-8") as f:
        f.write(f"--- task {seq}\n{text}\n")


def _run_task(rank: int, world_size: int, seq: int, payload: bytes, tmp_dir: Path) -> tuple[str, Any]:
    """Run one pickled task and return (status, pickled result or traceback); never raises but Ctrl-C.

    Unpickling and result pickling happen here, inside the try, so a task that cannot be imported or
    returns something unpicklable is reported as an error instead of failing silently in a queue thread.
    """
    import torch

    try:
        fn, kwargs = pickle.loads(payload)
        result = fn(rank, world_size, **kwargs)
        return _STATUS_OK, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: B036 - a failed task (even SystemExit or pytest.fail) must not kill the pool
        text = traceback.format_exc()
        _append_error(tmp_dir, rank, seq, text)
        return _STATUS_ERR, text
    finally:
        # NOTE: cheap resets of process-wide torch state so one task's leftovers do not leak into the next.
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)


def _worker_main(
    rank: int,
    world_size: int,
    tmp_dir_str: str,
    pg_timeout_s: float,
    start_timeout_s: float,
    parent_pid: int,
    task_q: Queue[Any],
    result_q: Queue[Any],
) -> None:
    """Join the gloo group, then run tasks from task_q until a None sentinel arrives.

    Every message put on result_q is (rank, seq, status, payload). Startup reports seq 0 with status
    "ready" (payload: pid) or "err" (payload: traceback).
    """
    # NOTE: set before torch is imported in this process, so OpenMP reads it at load time.
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp_dir = Path(tmp_dir_str)
    threading.Thread(
        target=_exit_when_orphaned, args=(parent_pid, tmp_dir), name="orphan-watchdog", daemon=True
    ).start()
    # Fatal errors (segfaults) and SIGUSR1 from the parent at a deadline dump all Python stacks here.
    stacks_file = open(tmp_dir / f"rank{rank}.stacks", "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    faulthandler.enable(file=stacks_file, all_threads=True)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=stacks_file, all_threads=True)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(str(tmp_dir / "store"), world_size)
        # NOTE: spawned ranks finish importing torch seconds apart on a busy machine. Meet on the store
        # under the startup deadline first, so the (possibly short) group timeout only covers the tasks.
        store.set_timeout(timedelta(seconds=start_timeout_s))
        store.set(f"rankpool/arrived/{rank}", "1")
        store.wait([f"rankpool/arrived/{r}" for r in range(world_size)])
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
    except BaseException:  # noqa: B036 - report any startup failure to the parent, then exit
        text = traceback.format_exc()
        _append_error(tmp_dir, rank, _STARTUP_SEQ, text)
        result_q.put((rank, _STARTUP_SEQ, _STATUS_ERR, text))
        return
    result_q.put((rank, _STARTUP_SEQ, _STATUS_READY, os.getpid()))
    while True:
        item = task_q.get()
        if item is None:
            break
        seq, payload = item
        status, out = _run_task(rank, world_size, seq, payload, tmp_dir)
        result_q.put((rank, seq, status, out))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    # NOTE: interpreter teardown with torch loaded takes 1-3 s per process on 2 busy cores, and close()
    # waits for it. Flush what must be flushed, run the atexit hooks (coverage, ...), then skip the rest.
    result_q.close()
    result_q.join_thread()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(0)


def _check_health(rank: int, world_size: int) -> bool:
    """Return whether the default group still completes an all_reduce and a barrier.

    Collective: call on every rank of the group, in the same order.
    """
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    dist.barrier()
    return t.item() == world_size


# Parent side ---------------------------------------------------------------------------------------------


def _describe(fn: RankFn) -> str:
    """Name a rank function for error messages."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _pickle_task(fn: RankFn, kwargs: dict[str, Any]) -> bytes:
    """Pickle (fn, kwargs) in the parent so an unpicklable task fails here, loudly."""
    if not callable(fn):
        raise TypeError(f"RankPool.run needs a callable fn(rank, world_size, **kwargs), got {fn!r}")
    try:
        return pickle.dumps((fn, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise TypeError(
            f"cannot send {_describe(fn)} with kwargs {sorted(kwargs)} to the ranks: {exc}; define rank "
            "functions at module level (no lambdas, closures or nested functions) and pass picklable kwargs"
        ) from exc


def _read_tail(path: Path) -> str:
    """Return the last _MAX_DUMP_CHARS characters of a file, or "" if it is missing or empty."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return text[-_MAX_DUMP_CHARS:].strip()


def _describe_exitcode(code: int) -> str:
    """Render a multiprocessing exit code, naming the signal when it is negative."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code} (killed by {signal.Signals(-code).name})"
    return f"exit code {code}"


class RankPool:
    """A lazily started set of gloo ranks that runs many module-level functions.

    Workers are spawned on the first run(), not in __init__, so an unused pool costs nothing. The pool is
    shared across tests; each rank function seeds torch itself and leaves no extra process groups behind.
    """

    def __init__(
        self,
        world_size: int,
        *,
        timeout_s: float = 120.0,
        start_timeout_s: float = 120.0,
        error_grace_s: float = 10.0,
    ) -> None:
        """Describe the pool; nothing is started until the first run().

        Args:
            world_size: Number of ranks (worker processes), >= 1.
            timeout_s: Deadline of each run(), in seconds, over all ranks together; also the gloo timeout
                of the process group, so a collective missing a peer fails on its own at about that time.
            start_timeout_s: Deadline for spawning the workers and joining the process group. Not counted
                in timeout_s, so short run() deadlines stay meaningful on a busy machine.
            error_grace_s: Once one rank has failed, how long to wait for the others before killing the
                pool (they are often stuck in a collective the failed rank never joined).
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        for name, value in (
            ("timeout_s", timeout_s),
            ("start_timeout_s", start_timeout_s),
            ("error_grace_s", error_grace_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        self._world_size = world_size
        self._timeout_s = float(timeout_s)
        self._start_timeout_s = float(start_timeout_s)
        self._error_grace_s = float(error_grace_s)
        self._ctx = mp.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._task_qs: list[Queue[Any]] = []
        self._result_q: Queue[Any] | None = None
        self._tmp_dir: Path | None = None
        self._seq = _STARTUP_SEQ

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self._world_size

    @property
    def timeout_s(self) -> float:
        """Deadline of each run(), in seconds."""
        return self._timeout_s

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers by rank; empty while the pool is not started."""
        return [p.pid for p in self._procs if p.pid is not None]

    @property
    def tmp_dir(self) -> Path | None:
        """Temp dir of the running workers (FileStore, rank{r}.err, rank{r}.stacks); None when stopped."""
        return self._tmp_dir

    def __repr__(self) -> str:
        state = f"pids={self.pids}" if self._procs else "stopped"
        return f"RankPool(world_size={self._world_size}, timeout_s={self._timeout_s}, {state})"

    def __enter__(self) -> RankPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(self, fn: RankFn, /, **kwargs: Any) -> list[Any]:
        """Run fn(rank, world_size, **kwargs) on every rank and return the results by rank.

        Collective: fn runs on every rank of the pool's default gloo group at once.

        Args:
            fn: Module-level function (it is pickled by reference).
            **kwargs: Picklable keyword arguments passed to fn on every rank.

        Returns:
            The per-rank return values; index = rank.

        Raises:
            TypeError: fn or kwargs cannot be pickled.
            AssertionError: fn raised on some rank; the message holds every failing rank's traceback,
                each prefixed "[rank r]". The pool stays up unless ranks were left hanging or the group
                fails a health check afterwards, in which case it is restarted on the next run().
            TimeoutError: not every rank finished within timeout_s; names the ranks that did not and
                quotes their Python stacks. The pool is killed and restarts on the next run().
            RuntimeError: a worker process died; names the ranks and exit codes. The pool is killed and
                restarts on the next run().
        """
        payload = _pickle_task(fn, kwargs)
        what = _describe(fn)
        results, missing = self._execute(payload, timeout_s=self._timeout_s, what=what)
        errors = {r: results[r][1] for r in sorted(results) if results[r][0] == _STATUS_ERR}
        if not errors:
            return [pickle.loads(results[r][1]) for r in range(self._world_size)]
        parts = [f"[rank {r}] {text.rstrip()}" for r, text in errors.items()]
        if missing:
            parts.append(
                f"ranks {missing} did not finish within {self._error_grace_s:g} s after the first failure "
                "(probably waiting in a collective the failed rank never joined); the pool was killed and "
                "restarts on the next run()"
            )
            parts.append(self._dump_stacks(missing))
            self._kill()
        elif not self._passes_health_check():
            parts.append("the process group failed a health check after this failure; the pool was restarted")
        message = "\n".join(p for p in parts if p)
        raise AssertionError(
            f"{what} failed on ranks {sorted(errors)} of world_size={self._world_size}:\n{message}"
        )

    def close(self) -> None:
        """Stop the workers: send each a None sentinel, wait up to 5 s, then kill what is left.

        Safe to call twice. A later run() starts fresh workers.
        """
        if not self._procs:
            return
        for task_q in self._task_qs:
            with contextlib.suppress(Exception):
                task_q.put(None)
        deadline = time.monotonic() + _JOIN_S
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self._kill()

    # Internals -------------------------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        """Start the workers unless all of them are alive; wait until they joined the group."""
        if self._procs and all(p.is_alive() for p in self._procs):
            return
        self._kill()  # a worker died while idle: start over rather than blame the next task
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"rankpool_ws{self._world_size}_"))
        result_q: Queue[Any] = self._ctx.Queue()
        self._tmp_dir, self._result_q, self._seq = tmp_dir, result_q, _STARTUP_SEQ
        atexit.register(self.close)
        for rank in range(self._world_size):
            task_q: Queue[Any] = self._ctx.Queue()
            proc = self._ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    self._world_size,
                    str(tmp_dir),
                    self._timeout_s,
                    self._start_timeout_s,
                    os.getpid(),
                    task_q,
                    result_q,
                ),
                name=f"rankpool-ws{self._world_size}-rank{rank}",
                # NOTE: not daemonic, so rank functions may start processes of their own; close() (atexit)
                # and the orphan watchdog in each worker make sure none outlives the test process.
                daemon=False,
            )
            proc.start()
            self._procs.append(proc)
            self._task_qs.append(task_q)
        results, missing = self._collect(
            _STARTUP_SEQ, timeout_s=self._start_timeout_s, what="startup (spawn + init_process_group)"
        )
        errors = {r: results[r][1] for r in sorted(results) if results[r][0] == _STATUS_ERR}
        if errors or missing:
            parts = [f"[rank {r}] {text.rstrip()}" for r, text in errors.items()]
            if missing:
                parts.append(f"ranks {missing} did not join the process group")
            self._kill()
            raise RuntimeError(
                f"RankPool(world_size={self._world_size}) failed to start:\n" + "\n".join(parts)
            )

    def _execute(
        self, payload: bytes, *, timeout_s: float, what: str
    ) -> tuple[dict[int, tuple[str, Any]], list[int]]:
        """Send one task to every rank and collect the answers (see _collect)."""
        self._ensure_started()
        self._seq += 1
        for task_q in self._task_qs:
            task_q.put((self._seq, payload))
        return self._collect(self._seq, timeout_s=timeout_s, what=what)

    def _collect(
        self, seq: int, *, timeout_s: float, what: str
    ) -> tuple[dict[int, tuple[str, Any]], list[int]]:
        """Wait for the answers to task seq from every rank.

        Returns:
            rank -> (status, payload) for the ranks that answered, and the sorted ranks that did not. The
            second is non-empty only if some rank failed and the others did not answer within the error
            grace (or the deadline); the caller then kills the pool.

        Raises:
            TimeoutError: the deadline passed with no rank failed; the pool is killed.
            RuntimeError: a worker that had not answered died; the pool is killed.
        """
        assert self._result_q is not None
        deadline = time.monotonic() + timeout_s
        results: dict[int, tuple[str, Any]] = {}
        first_error_at: float | None = None
        while len(results) < self._world_size:
            limit = (
                deadline if first_error_at is None else min(deadline, first_error_at + self._error_grace_s)
            )
            now = time.monotonic()
            pending = [r for r in range(self._world_size) if r not in results]
            if now >= limit:
                if first_error_at is not None:
                    return results, pending
                stacks = self._dump_stacks(pending)
                self._kill()
                finished = sorted(results)
                raise TimeoutError(
                    f"{what} did not finish within {timeout_s:g} s on ranks {pending} of "
                    f"world_size={self._world_size} (finished: {finished}); the pool was killed and "
                    f"restarts on the next run(). Look for a collective that some rank skips.\n{stacks}"
                )
            try:
                rank, msg_seq, status, payload = self._result_q.get(timeout=min(_POLL_S, limit - now))
            except queue.Empty:
                dead = [r for r in pending if self._procs[r].exitcode is not None]
                if dead and not self._drain_into(results, seq):
                    self._fail_dead(dead, what)
                continue
            if msg_seq != seq:
                continue  # a stale answer; cannot normally happen since hung pools are killed
            results[rank] = (status, payload)
            if status == _STATUS_ERR and first_error_at is None:
                first_error_at = time.monotonic()
        return results, []

    def _drain_into(self, results: dict[int, tuple[str, Any]], seq: int) -> bool:
        """Move answers already in the pipe into results; return whether any arrived."""
        assert self._result_q is not None
        got = False
        while True:
            try:
                rank, msg_seq, status, payload = self._result_q.get(timeout=_POLL_S)
            except queue.Empty:
                return got
            if msg_seq == seq:
                results[rank] = (status, payload)
                got = True

    def _fail_dead(self, dead: list[int], what: str) -> None:
        """Kill the pool and raise a RuntimeError naming the dead ranks and what they left behind."""
        assert self._tmp_dir is not None
        codes = {r: self._procs[r].exitcode for r in dead}
        parts = []
        for r in dead:
            code = codes[r]
            parts.append(f"[rank {r}] died with {_describe_exitcode(code if code is not None else 0)}")
            for suffix in ("err", "stacks"):
                text = _read_tail(self._tmp_dir / f"rank{r}.{suffix}")
                if text:
                    parts.append(f"[rank {r}] rank{r}.{suffix}:\n{text}")
        self._kill()
        summary = ", ".join(
            f"rank {r}: {_describe_exitcode(c if c is not None else 0)}" for r, c in codes.items()
        )
        raise RuntimeError(
            f"{what}: worker processes died ({summary}) of world_size={self._world_size}; the pool was "
            "killed and restarts on the next run()\n" + "\n".join(parts)
        )

    def _dump_stacks(self, ranks: list[int]) -> str:
        """Ask the given live ranks for their Python stacks (SIGUSR1 -> faulthandler) and quote them."""
        if not ranks or self._tmp_dir is None or not hasattr(signal, "SIGUSR1"):
            return ""
        signalled = []
        for r in ranks:
            proc = self._procs[r]
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGUSR1)
                    signalled.append(r)
        if not signalled:
            return ""
        time.sleep(_STACK_DUMP_WAIT_S)
        parts = []
        for r in signalled:
            text = _read_tail(self._tmp_dir / f"rank{r}.stacks")
            if text:
                parts.append(f"[rank {r}] Python stacks at the deadline:\n{text}")
        return "\n".join(parts)

    def _passes_health_check(self) -> bool:
        """After a failed task, check the group still works; kill the pool if it does not."""
        try:
            results, missing = self._execute(
                _pickle_task(_check_health, {}),
                timeout_s=min(self._timeout_s, _HEALTH_TIMEOUT_S),
                what="health check",
            )
        except (TimeoutError, RuntimeError):
            return False  # already killed
        healthy = not missing and all(
            status == _STATUS_OK and pickle.loads(payload) is True for status, payload in results.values()
        )
        if not healthy:
            self._kill()
        return healthy

    def _kill(self) -> None:
        """Kill every worker now, release the queues and the temp dir; the next run() starts over."""
        for proc in self._procs:
            if proc.is_alive():
                with contextlib.suppress(Exception):
                    proc.kill()
        for proc in self._procs:
            proc.join(timeout=_JOIN_S)
        for q in [*self._task_qs, *([self._result_q] if self._result_q is not None else [])]:
            # NOTE: cancel_join_thread so a feeder thread blocked on a dead reader cannot hang interpreter exit.
            q.cancel_join_thread()
            q.close()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._procs, self._task_qs, self._result_q, self._tmp_dir = [], [], None, None
        atexit.unregister(self.close)


_POOLS: dict[int, RankPool] = {}
"""world_size -> the pool shared by every test module of this pytest process (xdist worker)."""


def get_pool(world_size: int) -> RankPool:
    """Return this process's shared pool for world_size, creating it (unstarted) on first use."""
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool


def run_ranks(fn: RankFn, world_size: int, /, **kwargs: Any) -> list[Any]:
    """Run fn once in a throwaway pool (fresh processes and group) and return the results by rank.

    Costs a full spawn (seconds); use it only for tests that need a pristine process group, and a
    shared pool (get_pool, or the ranksN fixtures) otherwise. Raises as RankPool.run does.
    """
    with RankPool(world_size) as pool:
        return pool.run(fn, **kwargs)


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    """Return whether every rank holds a bitwise identical copy of t (same shape, dtype and bytes).

    Collective: call on every rank of the default group, in the same order. Returns the same value on
    every rank. Compares raw bytes, so NaNs with the same payload are equal and -0.0 differs from 0.0.
    """
    import torch
    import torch.distributed as dist

    world_size = dist.get_world_size()
    metas: list[Any] = [None] * world_size
    dist.all_gather_object(metas, (tuple(t.shape), str(t.dtype)))
    if any(meta != metas[0] for meta in metas):
        return False
    if t.numel() == 0:
        return True
    # NOTE: gather the bytes as uint8, which gloo supports for every source dtype (bool, bfloat16, ...).
    mine = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return all(torch.equal(other, gathered[0]) for other in gathered)
