"""Shared helpers for the multi-process benchmarks: fresh gloo ranks per run, RSS, markdown tables.

`run_fresh_ranks(fn, world_size=N, ...)` spawns N new processes ("spawn", never fork), joins them
into one gloo process group through a FileStore in a fresh temp dir, calls the module-level
`fn(rank, world_size, **kwargs)` on every rank and returns the list of what each rank returned
(it must be JSON-serialisable). Fresh processes per run keep per-process measurements such as peak
RSS (`resource.getrusage`, monotone over a process's life) separate between configurations.

The caller must set OMP_NUM_THREADS before torch is imported in the children; the simplest way is
to set it in `os.environ` at the top of the script, before `import torch` (spawned children inherit
the environment and re-import the script). `_rank_entry` also calls torch.set_num_threads.

Must not import shardoptim (the helpers are generic).
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

RankFn = Callable[..., Any]
"""A module-level function called as fn(rank, world_size, **kwargs) on every rank."""


def current_rss_nbytes() -> int:
    """Return this process's resident set size now, in bytes (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_nbytes() -> int:
    """Return this process's peak resident set size so far, in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pss_nbytes() -> int:
    """Return this process's proportional set size of anonymous and shared memory, in bytes.

    PSS charges each resident page 1/k to each of the k processes mapping it, so the PSS of the
    ranks of one host adds up to what they hold together (shared memory counted once).
    Pss_Anon + Pss_Shmem of /proc/self/smaps_rollup: file pages (libtorch's code) are left out,
    since their share moves with every other process on the host that maps the same libraries.
    Falls back to the whole Pss (Linux < 5.5), and to the RSS without smaps_rollup (< 4.14).
    """
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Pss_Anon", "Pss_Shmem"):
                    fields[key] = int(rest.split()[0]) * 1024
    except OSError:
        return current_rss_nbytes()
    if "Pss_Anon" in fields:
        return fields["Pss_Anon"] + fields.get("Pss_Shmem", 0)
    return fields.get("Pss", current_rss_nbytes())


def _rank_entry(
    rank: int,
    world_size: int,
    store_path: str,
    out_dir: str,
    fn: RankFn,
    kwargs: dict[str, Any],
    num_threads: int,
    timeout_s: float,
) -> None:
    torch.set_num_threads(num_threads)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        result = fn(rank, world_size, **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def run_fresh_ranks(
    fn: RankFn,
    *,
    world_size: int,
    kwargs: dict[str, Any] | None = None,
    num_threads: int = 1,
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run `fn(rank, world_size, **kwargs)` on `world_size` freshly spawned gloo ranks.

    Collective inside: every rank joins one gloo group (FileStore, no ports) before `fn` runs and
    leaves it afterwards. Blocks until every rank is done.

    Args:
        fn: a module-level function (it is pickled by reference).
        world_size: number of processes to start.
        kwargs: keyword arguments for `fn`, the same on every rank.
        num_threads: torch.set_num_threads in each rank, before `fn` runs.
        timeout_s: deadline for the whole run and for each collective.

    Returns:
        What `fn` returned on each rank, in rank order (through JSON).

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or the deadline passed; the
            processes started here are then terminated.
    """
    with tempfile.TemporaryDirectory(prefix="shardoptim_bench_") as tmp_dir:
        store_path = str(Path(tmp_dir, "store"))
        args = (world_size, store_path, tmp_dir, fn, dict(kwargs or {}), num_threads, timeout_s)
        ctx = tmp.start_processes(_rank_entry, args=args, nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{fn.__name__} on {world_size} ranks did not finish within {timeout_s:.0f} s; "
                        "ranks still alive: "
                        f"{[r for r, p in enumerate(ctx.processes) if p.is_alive()]}"
                    )
        except tmp.ProcessRaisedException as err:
            raise RuntimeError(f"{fn.__name__} failed on {world_size} ranks:\n{err}") from None
        except tmp.ProcessExitedException as err:
            raise RuntimeError(f"{fn.__name__}: a rank of {world_size} exited early: {err}") from None
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5.0)
        return [json.loads(Path(tmp_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Return a markdown table; the first column is left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + "-") if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
