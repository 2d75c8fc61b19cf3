"""Compare how evenly each layout splits optimizer state across ranks, for real model shapes.

Run from the repository root (no processes, no torch, layout math only; a few seconds on 2 cores):

    python benchmarks/balance.py
    python benchmarks/balance.py --models gpt2-small,resnet50 --ranks 2,8,64

For every model (see benchmarks/_shapes.py) and world size N it prints one markdown table row of
"largest shard / ideal", where ideal is total / N and 1.000 is a perfect split:

- flat: `build_flat_layout` (bucket 1 << 24 elements, align 64), `Layout.imbalance()` on owned
  parameter elements, and `flat padded`, the padded shard elements * N / total (the memory each rank
  actually allocates, alignment and padding included);
- greedy: torch ZeroRedundancyOptimizer's parameter-granular partition (`greedy_param_partition`);
- tensor: whole tensors assigned by element count (`assign_whole_tensors`), packed with
  `build_tensor_layout`, `Layout.imbalance()`, and `tensor padded`, the summed bucket
  `padded_numel` / total (the all-gather traffic and gathered-buffer size relative to the parameters;
  each rank's range fits its own tensors, so this is ~1.0, alignment only);
- muon: whole tensors assigned by `muon_cost(shape)`, reported as max / ideal in Muon-cost units and,
  for the same assignment, in elements.

Then it prints whether the flat layout stays <= 1.001 for every row, and exits with status 1 if not.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # NOTE: run as a script: make `shardoptim` (repo root) and `_shapes` (this folder) importable.
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    from _shapes import MODELS, check_totals, numel_of
else:
    from benchmarks._shapes import MODELS, check_totals, numel_of

from shardoptim.flat_layout import build_flat_layout  # noqa: E402
from shardoptim.tensor_layout import build_tensor_layout  # noqa: E402
from shardoptim.tensor_owners import assign_whole_tensors, muon_cost  # noqa: E402

#: The flat layout must stay within this factor of ideal for every model and world size.
FLAT_TOLERANCE = 1.001
BUCKET_NUMEL = 1 << 24
ALIGN = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    """Largest shard / ideal of every layout for one model at one world size."""

    model: str
    num_shards: int
    num_params: int
    numel: int
    flat: float
    """Flat layout, owned parameter elements."""
    flat_padded: float
    """Flat layout, padded shard elements (what each rank allocates) * N / total."""
    num_buckets: int
    """Buckets of the flat layout."""
    greedy: float
    tensor: float
    tensor_padded: float
    """Whole-tensor layout by element count, summed bucket padded_numel / total (gather traffic)."""
    muon_cost: float
    """Whole tensors by Muon cost, in Muon-cost units."""
    muon_numel: float
    """The same assignment as muon_cost, in elements."""


def greedy_param_partition(numels: Sequence[int], *, num_shards: int) -> list[int]:
    """Return the per-rank elements of a parameter-granular greedy partition (largest first).

    This is the partition torch's ZeroRedundancyOptimizer uses, the baseline this benchmark compares
    the flat layout against (tests/unit/test_balance.py checks it against torch's own rule).
    """
    owners = assign_whole_tensors([float(n) for n in numels], num_shards=num_shards)
    totals = [0] * num_shards
    for numel, owner in zip(numels, owners, strict=True):
        totals[owner] += numel
    return totals


def _max_over_ideal(rank_to_load: Sequence[float], total: float) -> float:
    if total == 0:
        return 1.0
    return max(rank_to_load) * len(rank_to_load) / total


def measure(model: str, shapes: Sequence[tuple[int, ...]], num_shards: int) -> Row:
    """Build every layout for `shapes` at world size `num_shards` and return their max / ideal."""
    numels = [numel_of(s) for s in shapes]
    total = sum(numels)
    flat = build_flat_layout(numels, num_shards=num_shards, bucket_numel=BUCKET_NUMEL, align=ALIGN)
    greedy = greedy_param_partition(numels, num_shards=num_shards)
    by_numel = assign_whole_tensors([float(n) for n in numels], num_shards=num_shards)
    tensor = build_tensor_layout(
        numels, num_shards=num_shards, owners=by_numel, bucket_numel=BUCKET_NUMEL, align=ALIGN
    )
    costs = [muon_cost(s) for s in shapes]
    by_muon = assign_whole_tensors(costs, num_shards=num_shards)
    rank_to_cost = [0.0] * num_shards
    for cost, owner in zip(costs, by_muon, strict=True):
        rank_to_cost[owner] += cost
    muon = build_tensor_layout(
        numels, num_shards=num_shards, owners=by_muon, bucket_numel=BUCKET_NUMEL, align=ALIGN
    )
    return Row(
        model=model,
        num_shards=num_shards,
        num_params=len(shapes),
        numel=total,
        flat=flat.imbalance(),
        flat_padded=flat.padded_numel / total,
        num_buckets=len(flat.buckets),
        greedy=_max_over_ideal(greedy, total),
        tensor=tensor.imbalance(),
        tensor_padded=tensor.padded_numel / total,
        muon_cost=_max_over_ideal(rank_to_cost, sum(costs)),
        muon_numel=muon.imbalance(),
    )


def format_table(rows: Sequence[Row]) -> str:
    """Return `rows` as a markdown table."""
    header = (
        "| model | params | elements | N | flat buckets | flat | flat padded | greedy (torch ZeRO) "
        "| tensor (elements) | tensor padded | muon (cost) | muon (elements) |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.num_params} | {r.numel:,} | {r.num_shards} | {r.num_buckets} | {r.flat:.4f} "
            f"| {r.flat_padded:.4f} | {r.greedy:.3f} | {r.tensor:.3f} | {r.tensor_padded:.4f} | {r.muon_cost:.3f} "
            f"| {r.muon_numel:.3f} |"
        )
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the balance table; return 0 if the flat layout is within FLAT_TOLERANCE everywhere, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=_csv,
        default=list(MODELS),
        help=f"comma-separated subset of {','.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--ranks",
        type=lambda text: [int(n) for n in _csv(text)],
        default=[2, 4, 8, 16, 64],
        help="comma-separated world sizes (default: 2,4,8,16,64)",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if any(n < 1 for n in args.ranks):
        parser.error(f"world sizes must be >= 1, got {args.ranks}")

    check_totals()
    start = time.perf_counter()
    rows = [measure(m, MODELS[m](), n) for m in args.models for n in args.ranks]
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    print()
    worst = max(rows, key=lambda r: r.flat)
    ok = worst.flat <= FLAT_TOLERANCE
    print(
        f"flat <= {FLAT_TOLERANCE} everywhere: {'yes' if ok else 'NO'} "
        f"(worst {worst.flat:.5f}: {worst.model}, N={worst.num_shards}); "
        f"layout math took {elapsed:.2f} s for {len(rows)} rows"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
