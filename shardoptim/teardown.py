"""Keep the gloo process groups the library shards over alive until interpreter exit, then free them safely.

Why: destroying a gloo group joins its worker threads. A worker that has just finished a
collective may still have to take the GIL once, to free the Python objects of that collective's
tensors when the caller dropped them before the worker dropped the work (torch all_gather_object's
temporaries, for one). Two ways of destroying the group cannot let it do so:
  * with the GIL held: DDP's C++ Reducer owns a reference to the group, and a user's model that
    outlives `destroy_process_group()` (a local of `main`, no `del`) frees it when `main` returns,
    joining the workers without releasing the GIL: the join waits for a worker that waits for the GIL;
  * during interpreter finalization (a reference left in a module global, in a reference cycle, or
    in the default arguments of torch.distributed.nn.functional, see below): a worker that then asks
    for the GIL is ended by Python with pthread_exit inside a noexcept destructor, and the process
    aborts ("terminate called without an active exception").
A reference held here means neither of those ever drops the last one: `_release_all` (an atexit
hook, so before finalization starts) collects reference cycles, then drops the references from
Python, through torch's holder that releases the GIL while the group is destroyed, so the
workers finish and the join returns. A group that torch no longer knows (destroyed) is also
released when the next group is held, so a process that re-initialises does not accumulate them.

A group still referenced elsewhere at exit (e.g. by a DDP model in a module global of a script)
is destroyed during finalization whatever this module does; `_release_all` then only waits (at most
2 s) until no gloo worker thread is runnable or waiting for the GIL, which makes an abort unlikely
but cannot rule it out: keep training code in a function.

Must not import shardoptim.comm or anything above it.
"""

from __future__ import annotations

import atexit
import gc
import os
import time

import torch.distributed as dist

if dist.is_available():
    # NOTE: torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is
    # first imported. Imported after init_process_group (torch.optim's first step imports it, through
    # torch._dynamo), ten of them hold the default group until interpreter finalization, out of reach
    # of `_release_all`. Imported here, before the user creates any group, they bind None.
    import torch.distributed.nn  # noqa: F401

#: What torch names the worker threads of a gloo group.
_GLOO_WORKER_NAME = "pt_gloo_runloop"
#: At exit, gloo workers still alive must have slept this long in a row to count as idle: longer than
#: Python's switch interval (5 ms), after which a thread waiting for the GIL asks for it.
_IDLE_S = 0.02
_POLL_S = 0.001
_DRAIN_LIMIT_S = 2.0

#: Groups kept alive until exit, in the order they were first held.
_held: list[dist.ProcessGroup] = []
_hook_registered = False


def hold_until_exit(group: dist.ProcessGroup | None) -> None:
    """Keep a reference to `group` (None: the default group) until interpreter exit, if it is gloo.

    Also releases the groups held so far that torch has destroyed since. Not collective.
    """
    global _hook_registered
    pg = group if group is not None else dist.group.WORLD
    if pg is None or "gloo" not in _backend(pg):
        return
    _release_destroyed()
    if not any(held is pg for held in _held):
        _held.append(pg)
    if not _hook_registered:
        # NOTE: atexit hooks run before interpreter finalization starts, while threads may still take the GIL.
        atexit.register(_release_all)
        _hook_registered = True


def num_held() -> int:
    """Return how many process groups are held (for tests)."""
    return len(_held)


def _backend(pg: dist.ProcessGroup) -> str:
    """Return the group's backend name, or "" once torch no longer knows the group (destroyed)."""
    try:
        return str(dist.get_backend(pg))
    except (ValueError, RuntimeError):
        return ""


def _release_destroyed() -> None:
    """Drop the references to held groups that were destroyed with `dist.destroy_process_group`."""
    live = [pg for pg in _held if _backend(pg)]
    if len(live) < len(_held):
        _held[:] = live


def _release_all() -> None:
    """Drop every held group, newest first, after collecting reference cycles (atexit hook).

    When gloo worker threads outlive that (another reference, e.g. a DDP model in a module global,
    destroys its group during finalization), wait until none of them still needs the GIL.
    """
    if not _held:
        return
    # A DDP model kept alive by a reference cycle goes first, while the group is still held here.
    gc.collect()
    while _held:
        _held.pop()  # the last reference: torch destroys the group here, with the GIL released
    _let_gloo_workers_finish()


def _gloo_worker_states() -> list[str]:
    """Return the scheduler state ("R", "S", ...) of each gloo worker thread (Linux; else [])."""
    states = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                stat = handle.read()
        except OSError:  # the thread has exited
            continue
        name, _, rest = stat[stat.index("(") + 1 :].rpartition(")")
        if name == _GLOO_WORKER_NAME:
            states.append(rest.split()[0])
    return states


def _let_gloo_workers_finish() -> None:
    """Release the GIL until every gloo worker has slept for _IDLE_S in a row (at most _DRAIN_LIMIT_S).

    Best effort: a worker that finished a collective but still has to take the GIL is runnable, or
    asleep waiting for the GIL; after the switch interval (5 ms) a waiting one asks for it and gets
    it at our next sleep. So workers asleep for longer than that are idle, and finalization (which
    ends any thread that then asks for the GIL) cannot catch one halfway.
    """
    deadline = time.monotonic() + _DRAIN_LIMIT_S
    idle_since = time.monotonic()
    while time.monotonic() < deadline:
        states = _gloo_worker_states()
        if not states:
            return
        now = time.monotonic()
        if any(state != "S" for state in states):
            idle_since = now
        elif now - idle_since >= _IDLE_S:
            return
        time.sleep(_POLL_S)  # releases the GIL
