"""Time `shardoptim.probe.probe_update_kind` over the catalog classes (the cost a user pays at construction).

Run from the repository root (a minute or two on 2 cores; needs the catalogs of
benchmarks/catalog_sweep.py):

    OMP_NUM_THREADS=1 python3 benchmarks/probe_time.py
    OMP_NUM_THREADS=1 python3 benchmarks/probe_time.py --root /tmp/old_checkout   # another shardoptim

Each class is probed once with the arguments the sweep gives it (a fresh cache per class), in
one process. It prints one line per class (seconds, verdict) and then the median, 90th percentile
and maximum. `--root` imports shardoptim from another checkout (e.g. an older commit, to compare).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to import")
    parser.add_argument("--only", default=None, help="comma-separated name substrings (any case)")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.root)
    import torch

    import shardoptim.probe as probe  # from --root: imported before the sweep module adds this checkout

    spec = importlib.util.spec_from_file_location("catalog_sweep", Path(__file__).with_name("catalog_sweep.py"))
    assert spec is not None and spec.loader is not None
    sweep = importlib.util.module_from_spec(spec)
    sys.modules["catalog_sweep"] = sweep  # dataclasses look their module up
    spec.loader.exec_module(sweep)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    times: list[float] = []
    for entry in sweep.build_catalog(args.only):
        if entry.cls is None:
            continue
        probe._CACHE.clear()
        start = time.perf_counter()
        verdict = probe.probe_update_kind(entry.cls, entry.kwargs)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        print(f"{elapsed:7.3f} s  {entry.name:44s} {verdict.update}", flush=True)
    times.sort()
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    print(
        f"\n{len(times)} classes from {probe.__file__}: median {statistics.median(times):.3f} s, "
        f"p90 {p90:.3f} s, max {times[-1]:.3f} s, total {sum(times):.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
