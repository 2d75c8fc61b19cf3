"""Simulate ShardedOptimizer as one rank of up to 4,096 ranks, in one process, and print what it costs.

Run from the repository root (meta tensors: no model memory; about 5 minutes on 2 busy cores):

    python benchmarks/scale_sim.py                                   # meta tensors, the full table
    python benchmarks/scale_sim.py --models gpt2-small --ranks 8,4096 --device cpu   # real CPU tensors
    python benchmarks/scale_sim.py --device cuda --dtype bfloat16 --max-real-gib 40   # CUDA, Llama-8B incl.
    python benchmarks/scale_sim.py --models gpt2-small --ranks 64,512 --shard-size 8   # hybrid at S=8

For GPT-2 small, Llama-3.2-1B and Llama-3.1-8B shapes (benchmarks/_shapes.py), world sizes N in
8, 64, 512, 4096 and stages 1 and 2, the optimizer (torch.optim.AdamW, lr 1e-4, defaults otherwise)
is built as rank r of N for r = 0, N/2 and N-1, two steps are run, and one row is printed with:

- build s: wall time of `ShardedOptimizer(...)` and, in parentheses, the CPU time of this process
  during it (the number to trust on a shared machine; median over the built ranks), after a warm-up in
  the same process (the first Optimizer construction in a process imports torch._dynamo, ~2-3 s
  here; a plain torch.optim.AdamW pays it too; printed once above the tables);
- host MiB: Python heap retained by the optimizer after construction on rank 0 (tracemalloc, in a
  separate construction; C++ allocations such as tensor headers are not traced) and the RSS growth
  over the construction (median over the built ranks; on meta mostly Python objects);
- state: `opt.local_state_nbytes()` after the steps, as max and min over ALL N ranks of
  (state bytes) / (total / N), where total is what an unsharded torch.optim.AdamW holds (two
  moments per element plus one 4-byte step per tensor). Ranks that were not built are computed
  from the layout (2 moments per owned element + one step per owned piece); the built ranks check
  that formula against the measured bytes (a mismatch is printed);
- collectives per step (the second step; the first may add one-time calls, printed if so), by
  operation, with their sizes;
- sent/rank: bytes each rank sends in one step under the ring algorithms NCCL uses, against the
  ideal: stage 2 one reduce-scatter + one all-gather of the model, 2 (N-1)/N x model bytes;
  stage 1 the all-gather only, (N-1)/N x model bytes (DDP's gradient all-reduce is not the
  optimizer's and is not counted);
- step s: wall (CPU) time of `opt.step()` (second step; on meta: the library's and the foreach
  kernels' Python and dispatch work only, no arithmetic);
- grows with N: the allocation sites (file:line) whose retained bytes grew most since the smallest N.

Hybrid sharding (shard within S ranks, replicate across R = N/S; by default S=8 for GPT-2 small
and Llama-3.1-8B at N=512 and 4096, `--shard-size S` for every model and N, 0 for none): the groups
come from `shardoptim.hybrid_groups(S)` on the fake group, ranks 0, N/2 and N-1 are built, and a
second table prints per row: the time of hybrid_groups and of the construction; the state against
total/S (over all S shard ranks; every replica holds the same); the collectives of one step split
by group; and the bytes each rank sends per step within the shard group, against (S-1)/S x model
bytes (stage 1) or 2 (S-1)/S (stage 2), and across the replicate group, against a ring all-reduce
of its gradient shard, 2 (R-1)/R x model bytes / S (stage 2), or nothing but metadata (stage 1).

Then PASS/FAIL for: construction < 2 s per rank at N=4096 for Llama-3.1-8B; state per rank within
0.1% of total/N (largest rank; the smallest is printed); traffic per step within 1% of the ideal;
nothing in the construction growing faster than linearly in N. For the hybrid rows: state within
0.1% of total/S; shard-group traffic within 1% of its ideal, and no call outside the two groups;
replicate-group traffic within 1% of its ideal (stage 2) or at most 1 MiB per rank per step
(stage 1, metadata). Exit status 1 if any fails.

What is real and what is simulated:
- meta (default): parameters, buckets, gradients and optimizer state are meta tensors: shapes, dtypes,
  the layout, every Python object and the collectives' arguments are real; no element is stored or
  computed. Fused AdamW has no meta kernel, so the library picks foreach (printed per row).
- cpu / cuda: real tensors (uninitialised values; gradients zeros); models larger than --max-real-gib
  are skipped with a note.
- Collectives: torch's fake process group (backend "fake", FakeStore, from
  torch.testing._internal.distributed.fake_pg: private, may move between torch releases; this script
  fails with a clear message when it is missing) completes every collective at once without moving
  data. The library picks its NCCL path on it (all_gather_single / reduce_scatter_single per bucket,
  no shared memory, no MPI). Every call into torch.distributed made from a shardoptim module is
  recorded (shardoptim.comm is the only caller) with its operation, dtype, element count and group
  (world, or shard / replicate). Subgroups work on the fake group: hybrid_groups(S) walks all N/S + S
  rank lists (O(N), the "groups s" column) and creates only this rank's two. Its all_gather_object returns
  the caller's object in every slot, so the hybrid construction's one object all-gather (the grid
  check over the replicate group) is answered with what the peers would send (`hybrid_peer_object`).
- Stage 2 runs a real (meta) backward of sum(p.sum()) so the library's gradient hooks launch the
  reduce-scatters themselves.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import importlib
import linecache
import os
import pickle
import pkgutil
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # NOTE: run as a script: make `shardoptim` (repo root) and `_shapes` (this folder) importable.
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
    from _shapes import MODELS, Shape, numel_of
else:
    from benchmarks._shapes import MODELS, Shape, numel_of

import torch
import torch.distributed as dist

import shardoptim
from shardoptim.layout import Layout

#: Models of the table, in print order (names of benchmarks/_shapes.py).
DEFAULT_MODELS = ("gpt2-small", "llama-3.2-1b", "llama-3.1-8b")
DEFAULT_RANKS = (8, 64, 512, 4096)
#: Targets of issue 16, part 3.
BUILD_S_TARGET = 2.0
BUILD_S_MODEL = "llama-3.1-8b"
STATE_TOLERANCE = 1e-3
TRAFFIC_TOLERANCE = 1e-2
#: A site counts as superlinear when it grows by more than this factor times the growth of N.
SUPERLINEAR_FACTOR = 1.5
#: Sites that grew by less than this many bytes are not reported as growing.
GROWTH_FLOOR_NBYTES = 64 << 10
#: Hybrid rows of the full run (without --shard-size): S, and the models and N they run at.
DEFAULT_HYBRID_SHARD_SIZE = 8
DEFAULT_HYBRID_MODELS = ("gpt2-small", "llama-3.1-8b")
DEFAULT_HYBRID_RANKS = (512, 4096)
#: Stage-1 hybrid rows: the most bytes a rank may send across its replicate group per step (the
#: optimizer sends only the hyperparameter sync there, float64 metadata of a few KiB).
REPLICATE_METADATA_NBYTES = 1 << 20
#: Bytes of torch.optim.AdamW's per-tensor "step" (a 0-d float32 tensor).
STEP_NBYTES = 4
MIB = 1 << 20


# ---------------------------------------------------------------------------------- fake group


def _fake_store() -> dist.Store:
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as err:
        raise RuntimeError(
            f"the rank simulation needs torch's fake process group (module "
            f"torch.testing._internal.distributed.fake_pg, backend 'fake'), which torch {torch.__version__} "
            f"does not provide ({err}); install torch==2.13.0 or a release that has it"
        ) from err
    return FakeStore()


@contextlib.contextmanager
def fake_group(rank: int, world_size: int) -> Iterator[None]:
    """Make this process rank `rank` of `world_size` in torch's fake process group, then tear it down.

    Raises:
        RuntimeError: the fake process group is missing from this torch, or a process group is
            already initialised in this process.
    """
    store = _fake_store()
    if dist.is_initialized():
        raise RuntimeError(
            "a torch.distributed process group is already initialised in this process; run the rank "
            "simulation in a fresh process (it creates and destroys its own fake group)"
        )
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=store)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- recorder


@dataclass(frozen=True, slots=True)
class Collective:
    """One recorded call into torch.distributed."""

    phase: str
    op: str
    dtype: str
    numel: int
    """Elements of the full buffer: the output of an all-gather, the input of a reduce-scatter."""
    nbytes: int
    sent_nbytes: int | None
    """Bytes this rank sends under the ring algorithm for `op` (None: no model for this op)."""
    group: str = "world"
    """The group the call went to: "world" (the default group), a name given to the recorder
    ("shard", "replicate"), or "other" (a group the recorder was not told about)."""


def ring_sent_nbytes(op: str, nbytes: int, world_size: int) -> int | None:
    """Return the bytes one rank sends for `op` on a buffer of `nbytes`, under ring algorithms.

    `nbytes` is the full buffer (all-gather output, reduce-scatter input, the tensor otherwise;
    for all_gather_object the pickled object of one rank). All-gather and reduce-scatter: (N-1)/N of
    the buffer; all-reduce twice that; broadcast and reduce: the whole buffer (the root, and every
    rank forwarding in a pipelined ring); all_gather / all_gather_object: (N-1) x one rank's part
    (all_gather_object adds one 8-byte size per rank); send: the buffer; receive and barrier: 0.
    """
    n = world_size
    if n == 1:
        return 0
    if op in (
        "all_gather_single",
        "all_gather_into_tensor",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
    ):
        return nbytes * (n - 1) // n
    if op == "all_reduce":
        return 2 * nbytes * (n - 1) // n
    if op in ("broadcast", "reduce", "isend", "send"):
        return nbytes
    if op == "all_gather":
        return nbytes * (n - 1)
    if op == "all_gather_object":
        return (nbytes + 8) * (n - 1)
    if op in ("irecv", "recv", "barrier"):
        return 0
    return None


#: torch.distributed functions the recorder intercepts (any that exists in this torch).
_RECORDED = (
    "all_gather_single",
    "all_gather_into_tensor",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_object",
    "barrier",
    "isend",
    "irecv",
    "send",
    "recv",
    "gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_single",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
    "monitored_barrier",
    "batch_isend_irecv",
    "all_reduce_coalesced",
)


def _tensor_bytes(tensor: Any) -> tuple[str, int, int]:
    if isinstance(tensor, torch.Tensor):
        return (
            str(tensor.dtype).removeprefix("torch."),
            tensor.numel(),
            tensor.numel() * tensor.element_size(),
        )
    return "-", 0, 0


def _argument(args: Sequence[Any], kwargs: dict[str, Any], position: int, *names: str) -> Any:
    if len(args) > position:
        return args[position]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return None


#: Position of the `group` argument of the recorded functions that take one (when not a keyword).
_GROUP_POSITION = {
    "all_gather_single": 2,
    "all_gather_into_tensor": 2,
    "reduce_scatter_single": 3,
    "reduce_scatter_tensor": 3,
    "all_reduce": 2,
    "broadcast": 2,
    "reduce": 3,
    "all_gather": 2,
    "all_gather_object": 2,
    "barrier": 0,
    "isend": 2,
    "irecv": 2,
    "send": 2,
    "recv": 2,
}


def _call_group(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Return the process group argument of one call (None: the default group)."""
    if "group" in kwargs:
        return kwargs["group"]
    position = _GROUP_POSITION.get(op)
    return args[position] if position is not None and len(args) > position else None


def _describe_call(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, int, int]:
    """Return (dtype, numel, nbytes) of the buffer that sizes the traffic of one call."""
    if op in ("reduce_scatter_single", "reduce_scatter_tensor", "all_to_all_single"):
        return _tensor_bytes(_argument(args, kwargs, 1, "input", "input_tensor"))
    if op == "all_gather":
        return _tensor_bytes(_argument(args, kwargs, 1, "tensor"))
    if op == "all_gather_object":
        obj = _argument(args, kwargs, 1, "obj")
        return "pickle", 0, len(pickle.dumps(obj))
    return _tensor_bytes(_argument(args, kwargs, 0, "output_tensor", "tensor", "output"))


class _DistProxy:
    """Stands in for the torch.distributed module inside shardoptim modules: recorded functions
    are the recorder's wrappers, every other attribute is torch.distributed's own."""

    def __init__(self, overrides: dict[str, Callable[..., Any]]) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)


class CollectiveRecorder:
    """Record every torch.distributed call made from a shardoptim module while active.

    Replaces, in every imported shardoptim module, the `torch.distributed` module reference and any
    module-level alias of a recorded function (e.g. shardoptim.transports' `all_gather_single`) with
    recording wrappers that then call torch's own function. All shardoptim submodules are imported
    on entry so that lazily imported ones are covered too. `phase` labels the records.

    Each record names the group of its call: "world" for the default group (traffic modelled on
    `world_size` ranks), the name given to `name_group` for those groups, "other" for any other
    group; calls on a subgroup are modelled on that subgroup's size.

    NOTE: the fake group's all_gather_object returns this rank's object in every slot. For a group
    named with `peer_object`, the slots of the other ranks are then filled with what those ranks
    would send (see `hybrid_peer_object`), so checks that compare ranks see real peers.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.phase = ""
        self.records: list[Collective] = []
        self._undo: list[tuple[object, str, object]] = []
        self._id_to_group_name: dict[int, str] = {}
        self._id_to_peer_object: dict[int, Callable[[object, int, int], object]] = {}

    def name_group(
        self,
        group: dist.ProcessGroup,
        name: str,
        *,
        peer_object: Callable[[object, int, int], object] | None = None,
    ) -> None:
        """Label the records of calls on `group` with `name` (e.g. "shard", "replicate").

        Args:
            group: a process group this rank belongs to.
            name: the label of its records.
            peer_object: `peer_object(obj, global_rank, peer_global_rank)` returns what the rank
                `peer_global_rank` sends in an all_gather_object on `group` in which this rank
                (`global_rank`) sends `obj`; None leaves the fake group's answer (this rank's `obj`
                in every slot).
        """
        self._id_to_group_name[id(group)] = name
        if peer_object is not None:
            self._id_to_peer_object[id(group)] = peer_object

    def _group_of(self, group: Any) -> tuple[str, int]:
        if group is None or group is dist.group.WORLD:
            return "world", self.world_size
        return self._id_to_group_name.get(id(group), "other"), dist.get_world_size(group)

    def _wrap(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            dtype, numel, nbytes = _describe_call(op, args, kwargs)
            pg = _call_group(op, args, kwargs)
            group, group_size = self._group_of(pg)
            sent = ring_sent_nbytes(op, nbytes, group_size)
            self.records.append(Collective(self.phase, op, dtype, numel, nbytes, sent, group))
            out = fn(*args, **kwargs)
            peer_object = self._id_to_peer_object.get(id(pg)) if pg is not None else None
            if op == "all_gather_object" and peer_object is not None:
                object_list = _argument(args, kwargs, 0, "object_list")
                obj = _argument(args, kwargs, 1, "obj")
                me = dist.get_rank()
                for peer in range(len(object_list)):
                    object_list[peer] = peer_object(obj, me, dist.get_global_rank(pg, peer))
            return out

        return recorded

    def __enter__(self) -> CollectiveRecorder:
        _import_all_shardoptim_modules()
        real = {name: getattr(dist, name) for name in _RECORDED if hasattr(dist, name)}
        id_to_wrapper = {id(fn): self._wrap(name, fn) for name, fn in real.items()}
        proxy = _DistProxy({name: id_to_wrapper[id(fn)] for name, fn in real.items()})
        for name, module in list(sys.modules.items()):
            if not (name == "shardoptim" or name.startswith("shardoptim.")) or module is None:
                continue
            for attr, value in list(vars(module).items()):
                if value is dist:
                    self._patch(module, attr, proxy)
                elif callable(value) and id(value) in id_to_wrapper:
                    self._patch(module, attr, id_to_wrapper[id(value)])
        return self

    def _patch(self, module: object, attr: str, value: object) -> None:
        self._undo.append((module, attr, getattr(module, attr)))
        setattr(module, attr, value)

    def __exit__(self, *exc: object) -> None:
        for module, attr, value in reversed(self._undo):
            setattr(module, attr, value)
        self._undo.clear()

    def in_phase(self, phase: str) -> list[Collective]:
        return [r for r in self.records if r.phase == phase]


def hybrid_peer_object(obj: object, global_rank: int, peer_global_rank: int) -> object:
    """Return what a replicate-group peer sends in the hybrid grid check, given what this rank sends.

    The check (shardoptim.hybrid.Replicas.create) all-gathers (shard rank, shard group size,
    global ranks of the shard group). Under `hybrid_groups` (blocks of consecutive ranks) the peer
    holds the same shard rank in a block shifted by `peer_global_rank - global_rank`.

    Raises:
        RuntimeError: `obj` is not such a triple (the library's check changed; teach this
            function what the peers send).
    """
    if not (
        isinstance(obj, tuple)
        and len(obj) == 3
        and isinstance(obj[0], int)
        and isinstance(obj[1], int)
        and isinstance(obj[2], tuple)
        and global_rank in obj[2]
    ):
        raise RuntimeError(
            f"the rank simulation does not know what the replicate group's peers send in this "
            f"all_gather_object (this rank sends {obj!r:.200}); only the hybrid grid check (shard rank, "
            "shard group size, shard group's global ranks) is modelled: extend hybrid_peer_object()"
        )
    shift = peer_global_rank - global_rank
    return (obj[0], obj[1], tuple(m + shift for m in obj[2]))


def _import_all_shardoptim_modules() -> None:
    for info in pkgutil.walk_packages(shardoptim.__path__, prefix="shardoptim."):
        with contextlib.suppress(ImportError):  # optional integrations (their framework is absent)
            importlib.import_module(info.name)


# ---------------------------------------------------------------------------------- one rank


def current_rss_nbytes() -> int:
    """Return this process's resident set size now, in bytes (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class RankRun:
    """What building and stepping the optimizer as one rank measured."""

    rank: int
    world_size: int
    build_s: float
    build_cpu_s: float
    """CPU time of this process during the construction (wall time minus waiting for a busy machine)."""
    rss_delta_nbytes: int
    state_nbytes: int
    owned_numel: int
    num_pieces: int
    impl: str
    construct: list[Collective]
    steps: list[list[Collective]]
    step_s: list[float]
    step_cpu_s: list[float]
    rank_to_numel: list[int] = field(default_factory=list)
    """Owned elements of every rank (only with accounting=True; likewise the next two)."""
    rank_to_pieces: list[int] = field(default_factory=list)
    layouts: list[Layout] = field(default_factory=list)
    num_shards: int = 0
    """Ranks the state is sharded over: the shard group's size S under hybrid sharding, else
    `world_size` (0 is read as `world_size`)."""
    groups_s: float = 0.0
    """Wall time of `shardoptim.hybrid_groups(S)` (hybrid sharding only)."""

    @property
    def shard_rank(self) -> int:
        """This rank's position in its shard group (`rank` without hybrid sharding)."""
        return self.rank % (self.num_shards or self.world_size)


def rank_to_pieces(layouts: Sequence[Layout], world_size: int) -> list[int]:
    """Return, per rank, how many parameter pieces (non-empty tensor/range overlaps) it owns."""
    counts = [0] * world_size
    for layout in layouts:
        for bucket in layout.buckets:
            bounds = bucket.bounds
            for placement in bucket.placements:
                start, end = placement.start_global, placement.start_global + placement.numel
                if start == end:
                    continue
                first = max(bisect.bisect_right(bounds, start) - 1, 0)
                last = min(bisect.bisect_left(bounds, end) - 1, world_size - 1)
                for rank in range(first, last + 1):
                    if min(end, bounds[rank + 1]) > max(start, bounds[rank]):
                        counts[rank] += 1
    return counts


def make_params(shapes: Sequence[Shape], *, device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Return one uninitialised trainable parameter per shape."""
    return [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in shapes]


def _fill_grads_(params: Sequence[torch.nn.Parameter], *, stage: int) -> None:
    """Give every parameter a gradient: set .grad (stage 1, as DDP leaves it) or run a backward."""
    if stage == 1:
        for p in params:
            p.grad = torch.empty_like(p) if p.device.type == "meta" else torch.zeros_like(p)
        return
    loss = torch.stack([p.sum() for p in params]).sum()
    loss.backward()  # the optimizer's hooks move the gradients into buckets and reduce-scatter them


def simulate_rank(
    shapes: Sequence[Shape],
    *,
    rank: int,
    world_size: int,
    stage: int,
    device: str = "meta",
    dtype: torch.dtype = torch.float32,
    steps: int = 2,
    accounting: bool = False,
    collect: bool = True,
    shard_size: int | None = None,
    **options: Any,
) -> RankRun:
    """Build ShardedOptimizer(AdamW) as `rank` of `world_size` on the fake group and run `steps` steps.

    With `shard_size` S, hybrid sharding: the groups come from `shardoptim.hybrid_groups(S)`
    (shard groups of S consecutive ranks, replicate groups of the ranks S apart, built on the fake
    group like on a real one) and the records name the group of each call ("shard", "replicate").

    Args:
        shapes: parameter shapes, in model order.
        rank, world_size: the simulated rank.
        stage: 1 or 2.
        device: "meta" (no memory), "cpu" or "cuda".
        dtype: parameter dtype.
        steps: optimizer steps to run after construction (each with gradients, see `_fill_grads_`).
        accounting: also compute owned elements and pieces of every rank from the layout (every
            rank of the shard group under hybrid sharding; the replicas own the same).
        collect: run gc.collect() before the construction (steadier RSS) and after the run (frees
            real tensors sooner); each costs up to ~0.5 s with torch loaded.
        shard_size: hybrid sharding within groups of this many ranks (None: shard over all ranks).
        **options: more ShardedOptimizer keyword arguments (e.g. bucket_numel).
    """
    with fake_group(rank, world_size), CollectiveRecorder(world_size) as recorder:
        groups_s = 0.0
        if shard_size is not None:
            recorder.phase = "groups"
            start = time.perf_counter()
            shard_group, replicate_group = shardoptim.hybrid_groups(shard_size)
            groups_s = time.perf_counter() - start
            recorder.name_group(shard_group, "shard")
            recorder.name_group(replicate_group, "replicate", peer_object=hybrid_peer_object)
            options = {**options, "shard_group": shard_group, "replicate_group": replicate_group}
        params = make_params(shapes, device=device, dtype=dtype)
        if collect:
            gc.collect()
        rss_before = current_rss_nbytes()
        recorder.phase = "construct"
        start, start_cpu = time.perf_counter(), time.process_time()
        opt = shardoptim.ShardedOptimizer(params, torch.optim.AdamW, stage=stage, lr=1e-4, **options)
        build_s, build_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        rss_delta = current_rss_nbytes() - rss_before
        defaults = opt.optim.defaults
        impl = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "for-loop"
        step_s, step_cpu_s = [], []
        for i in range(steps):
            recorder.phase = f"step{i}"
            _fill_grads_(params, stage=stage)
            start, start_cpu = time.perf_counter(), time.process_time()
            opt.step()
            step_s.append(time.perf_counter() - start)
            step_cpu_s.append(time.process_time() - start_cpu)
            opt.zero_grad()
        rank_to_numel = opt.rank_to_numel()
        layouts: list[Layout] = list(opt.placement.layouts)
        num_shards = opt.world_size  # the shard group's size
        if num_shards != (shard_size or world_size) or opt.num_replicas != world_size // num_shards:
            raise RuntimeError(
                f"rank {rank} of {world_size} with shard_size={shard_size}: the optimizer shards over "
                f"{num_shards} ranks with {opt.num_replicas} replicas; expected {shard_size or world_size} "
                f"and {world_size // (shard_size or world_size)}"
            )
        run = RankRun(
            rank=rank,
            world_size=world_size,
            build_s=build_s,
            build_cpu_s=build_cpu_s,
            rss_delta_nbytes=rss_delta,
            state_nbytes=opt.local_state_nbytes(),
            owned_numel=rank_to_numel[rank % num_shards],
            num_pieces=len(opt.optim.state),
            impl=impl,
            construct=recorder.in_phase("construct"),
            steps=[recorder.in_phase(f"step{i}") for i in range(steps)],
            step_s=step_s,
            step_cpu_s=step_cpu_s,
            num_shards=num_shards,
            groups_s=groups_s,
        )
        if accounting:
            run.rank_to_numel = rank_to_numel
            run.rank_to_pieces = rank_to_pieces(layouts, num_shards)
            run.layouts = layouts
        del opt, params
    if collect:
        gc.collect()
    return run


@dataclass(slots=True)
class TracedBuild:
    """Python heap of one construction (tracemalloc): retained after it, peak during it, by site."""

    retained_nbytes: int
    peak_nbytes: int
    site_to_nbytes: dict[tuple[str, int], int]


def trace_build(
    shapes: Sequence[Shape],
    *,
    rank: int,
    world_size: int,
    stage: int,
    device: str,
    dtype: torch.dtype,
    shard_size: int | None = None,
) -> TracedBuild:
    """Build the optimizer once under tracemalloc and return what its Python objects hold.

    With `shard_size`, the hybrid groups are built before tracing starts (not counted), and a
    recorder answers the grid check's object all-gather as the peers would (its few records are
    traced too).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_group(rank, world_size))
        options: dict[str, Any] = {}
        if shard_size is not None:
            recorder = stack.enter_context(CollectiveRecorder(world_size))
            shard_group, replicate_group = shardoptim.hybrid_groups(shard_size)
            recorder.name_group(shard_group, "shard")
            recorder.name_group(replicate_group, "replicate", peer_object=hybrid_peer_object)
            options = {"shard_group": shard_group, "replicate_group": replicate_group}
        params = make_params(shapes, device=device, dtype=dtype)
        gc.collect()
        tracemalloc.start()
        try:
            opt = shardoptim.ShardedOptimizer(params, torch.optim.AdamW, stage=stage, lr=1e-4, **options)
            gc.collect()
            retained, peak = tracemalloc.get_traced_memory()
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        del opt, params
    gc.collect()
    site_to_nbytes: dict[tuple[str, int], int] = {}
    for stat in snapshot.statistics("lineno"):
        frame = stat.traceback[0]
        site_to_nbytes[(frame.filename, frame.lineno)] = stat.size
    return TracedBuild(retained, peak, site_to_nbytes)


# ---------------------------------------------------------------------------------- one row


@dataclass(slots=True)
class Row:
    """One (model, N, stage) configuration, sharded over all N ranks or hybrid (S x R)."""

    model: str
    world_size: int
    stage: int
    device: str
    runs: list[RankRun]
    traced: TracedBuild
    total_numel: int
    num_params: int
    itemsize: int
    shard_size: int | None = None
    """Hybrid sharding: the shard group's size S (R = N / S replicas); None: sharded over all N."""

    @property
    def num_shards(self) -> int:
        """S under hybrid sharding, else N: the ranks one copy of the state is sharded over."""
        return self.shard_size or self.world_size

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.num_shards

    @property
    def model_nbytes(self) -> int:
        return self.total_numel * self.itemsize

    @property
    def build_s(self) -> float:
        return statistics.median(r.build_s for r in self.runs)

    @property
    def build_cpu_s(self) -> float:
        return statistics.median(r.build_cpu_s for r in self.runs)

    @property
    def ideal_state_nbytes(self) -> float:
        """total / N (hybrid: total / S), with total what one unsharded torch.optim.AdamW holds."""
        total = 2 * self.itemsize * self.total_numel + STEP_NBYTES * self.num_params
        return total / self.num_shards

    def predicted_state(self, numel: int, pieces: int) -> int:
        return 2 * self.itemsize * numel + STEP_NBYTES * pieces

    @property
    def rank_to_state(self) -> list[int]:
        full = self.runs[0]
        return [self.predicted_state(n, p) for n, p in zip(full.rank_to_numel, full.rank_to_pieces)]

    def state_mismatches(self) -> list[str]:
        """Built ranks whose measured state differs from the layout formula."""
        out = []
        for run in self.runs:
            predicted = self.predicted_state(run.owned_numel, run.num_pieces)
            if predicted != run.state_nbytes:
                out.append(f"rank {run.rank}: measured {run.state_nbytes} B, layout formula {predicted} B")
        return out

    @property
    def state_ratio_max(self) -> float:
        return max(self.rank_to_state) / self.ideal_state_nbytes

    @property
    def state_ratio_min(self) -> float:
        return min(self.rank_to_state) / self.ideal_state_nbytes

    @property
    def step(self) -> list[Collective]:
        return self.runs[0].steps[-1]

    @property
    def shard_group_name(self) -> str:
        """The recorder's name of the group the state is sharded over."""
        return "shard" if self.shard_size else "world"

    def step_in(self, group: str) -> list[Collective]:
        """The second step's calls on `group` ("world", "shard", "replicate", "other")."""
        return [r for r in self.step if r.group == group]

    @property
    def stray(self) -> list[Collective]:
        """Calls of any step or the construction outside the group(s) this row should use."""
        expected = {"shard", "replicate"} if self.shard_size else {"world"}
        calls = [r for run in self.runs for phase in (run.construct, *run.steps) for r in phase]
        return [r for r in calls if r.group not in expected]

    @property
    def sent_nbytes(self) -> int:
        """Bytes one rank sends per step within the group the state is sharded over."""
        return sum(r.sent_nbytes or 0 for r in self.step_in(self.shard_group_name))

    @property
    def replicate_sent_nbytes(self) -> int:
        """Bytes one rank sends per step across its replicate group (0 without hybrid sharding)."""
        return sum(r.sent_nbytes or 0 for r in self.step_in("replicate"))

    @property
    def replicate_ideal_sent_nbytes(self) -> float:
        """Stage 2: a ring all-reduce of this rank's gradient shard, 2 (R-1)/R x model bytes / S.
        Stage 1: 0 (DDP's all-reduce over all ranks is not the optimizer's)."""
        if self.stage != 2:
            return 0.0
        r = self.num_replicas
        return 2 * (r - 1) / r * self.model_nbytes / self.num_shards

    @property
    def replicate_ratio(self) -> float:
        """Replicate-group bytes over their ideal (stage 2; NaN at stage 1, where the ideal is 0)."""
        ideal = self.replicate_ideal_sent_nbytes
        return self.replicate_sent_nbytes / ideal if ideal else float("nan")

    @property
    def replicate_max_call_nbytes(self) -> int:
        """The largest buffer of one replicate-group call in the step (0 if none)."""
        return max((r.nbytes for r in self.step_in("replicate")), default=0)

    @property
    def unmodelled(self) -> list[str]:
        return sorted({r.op for run in self.runs for s in run.steps for r in s if r.sent_nbytes is None})

    @property
    def ideal_sent_nbytes(self) -> float:
        """Within the shard group (N ranks, or S under hybrid sharding), under ring algorithms."""
        passes = 2 if self.stage == 2 else 1  # reduce-scatter + all-gather, or all-gather only
        return passes * self.model_nbytes * (self.num_shards - 1) / self.num_shards

    @property
    def traffic_ratio(self) -> float:
        return self.sent_nbytes / self.ideal_sent_nbytes


def measure(
    model: str,
    shapes: Sequence[Shape],
    *,
    world_size: int,
    stage: int,
    device: str,
    dtype: torch.dtype,
    shard_size: int | None = None,
) -> Row:
    """Simulate ranks 0, N/2 and N-1 of one configuration (and trace rank 0's construction).

    With `shard_size` S (hybrid), these are: the lead replica's first rank, the first rank of
    replica R/2 and the last rank of the last replica.
    """
    ranks = sorted({0, world_size // 2, world_size - 1})
    runs = [
        simulate_rank(
            shapes,
            rank=r,
            world_size=world_size,
            stage=stage,
            device=device,
            dtype=dtype,
            accounting=(i == 0),
            shard_size=shard_size,
        )
        for i, r in enumerate(ranks)
    ]
    traced = trace_build(
        shapes, rank=0, world_size=world_size, stage=stage, device=device, dtype=dtype, shard_size=shard_size
    )
    return Row(
        model=model,
        world_size=world_size,
        stage=stage,
        device=device,
        runs=runs,
        traced=traced,
        total_numel=sum(numel_of(s) for s in shapes),
        num_params=len(shapes),
        itemsize=torch.empty(0, dtype=dtype).element_size(),
        shard_size=shard_size,
    )


# ---------------------------------------------------------------------------------- printing


def _fmt_nbytes(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.{1 if abs(nbytes) >= 10 * scale else 2}f} {unit}"
    return f"{nbytes:.0f} B"


_SHORT_OP = {
    "all_gather_single": "AG",
    "all_gather_into_tensor": "AG",
    "reduce_scatter_single": "RS",
    "reduce_scatter_tensor": "RS",
    "all_gather": "AG(list)",
    "all_gather_object": "AG(obj)",
    "all_reduce": "AR",
    "broadcast": "BC",
}


def summarize_collectives(records: Sequence[Collective]) -> str:
    """Return e.g. "26 RS f32 [9.01 MiB..147.2 MiB]; 1 AG f64 [13.3 KiB]" (count, op, dtype, sizes)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for r in records:
        groups.setdefault((_SHORT_OP.get(r.op, r.op), r.dtype.replace("float", "f")), []).append(r.nbytes)
    parts = []
    for (op, dtype), sizes in groups.items():
        lo, hi = min(sizes), max(sizes)
        span = _fmt_nbytes(lo) if lo == hi else f"{_fmt_nbytes(lo)}..{_fmt_nbytes(hi)}"
        parts.append(f"{len(sizes)} {op} {dtype} [{span}]")
    return "; ".join(parts)


def _site_name(site: tuple[str, int]) -> str:
    filename, lineno = site
    return f"{Path(filename).name}:{lineno}"


def _site_source(site: tuple[str, int]) -> str:
    return linecache.getline(site[0], site[1]).strip()[:70]


def growing_sites(
    rows: Sequence[Row], *, floor: int = GROWTH_FLOOR_NBYTES
) -> list[tuple[tuple[str, int], list[int]]]:
    """Return (site, bytes at each N of `rows`) for sites that grew by >= `floor` from the smallest N."""
    sites = {s for row in rows for s in row.traced.site_to_nbytes}
    out = []
    for site in sites:
        sizes = [row.traced.site_to_nbytes.get(site, 0) for row in rows]
        if sizes[-1] - sizes[0] >= floor:
            out.append((site, sizes))
    out.sort(key=lambda item: item[1][-1] - item[1][0], reverse=True)
    return out


def _growth_cell(rows: Sequence[Row], index: int) -> str:
    if index == 0:
        return "(baseline)"
    grown = growing_sites([rows[0], rows[index]])
    if not grown:
        return f"nothing >= {_fmt_nbytes(GROWTH_FLOOR_NBYTES)}"
    return ", ".join(f"{_site_name(site)} +{_fmt_nbytes(s[-1] - s[0])}" for site, s in grown[:2])


def print_model_table(model: str, rows: Sequence[Row], device: str) -> None:
    print(
        f"\n### {model}: {rows[0].num_params} tensors, {rows[0].total_numel:,} elements, "
        f"{_fmt_nbytes(rows[0].total_numel * rows[0].itemsize)} of parameters, device={device}\n"
    )
    print(
        "| N | stage | built ranks | build s wall (cpu), median | host MiB: traced (peak) / RSS delta | state/rank "
        "| state max/ideal (min) all ranks | collectives per step | sent/rank/step | ideal | sent/ideal "
        "| step s wall (cpu) | impl | grows with N (rank 0, traced) |"
    )
    print("|" + "---|" * 14)
    by_stage: dict[int, list[Row]] = {}
    for row in rows:
        by_stage.setdefault(row.stage, []).append(row)
    for row in sorted(rows, key=lambda r: (r.stage, r.world_size)):
        same_stage = by_stage[row.stage]
        index = same_stage.index(row)
        traced = row.traced
        rss = statistics.median(r.rss_delta_nbytes for r in row.runs)
        print(
            f"| {row.world_size} | {row.stage} | {','.join(str(r.rank) for r in row.runs)} "
            f"| {row.build_s:.3f} ({row.build_cpu_s:.3f}) "
            f"| {traced.retained_nbytes / MIB:.2f} ({traced.peak_nbytes / MIB:.2f}) / {rss / MIB:.1f} "
            f"| {_fmt_nbytes(row.runs[0].state_nbytes)} "
            f"| {row.state_ratio_max:.6f} ({row.state_ratio_min:.4f}) "
            f"| {summarize_collectives(row.step)} "
            f"| {_fmt_nbytes(row.sent_nbytes)} | {_fmt_nbytes(row.ideal_sent_nbytes)} | {row.traffic_ratio:.5f} "
            f"| {row.runs[0].step_s[-1]:.3f} ({row.runs[0].step_cpu_s[-1]:.3f}) | {row.runs[0].impl} | {_growth_cell(same_stage, index)} |"
        )
    notes = []
    for row in rows:
        first, last = row.runs[0].steps[0], row.step
        if Counter((r.op, r.nbytes) for r in first) != Counter((r.op, r.nbytes) for r in last):
            notes.append(
                f"N={row.world_size} stage {row.stage}: first step differs: {summarize_collectives(first)}"
            )
        for mismatch in row.state_mismatches():
            notes.append(f"N={row.world_size} stage {row.stage}: state formula mismatch, {mismatch}")
        if row.unmodelled:
            notes.append(f"N={row.world_size} stage {row.stage}: no traffic model for {row.unmodelled}")
    notes.append(
        "sizes are each call's full buffer (all-gather output, reduce-scatter input); the f64 call is the "
        "per-step hyperparameter sync (at stage 2 one flag per parameter rides along)"
    )
    construct = {summarize_collectives(r.runs[0].construct) for r in rows}
    notes.append(f"construction collectives (every N and stage): {' | '.join(sorted(construct)) or 'none'}")
    for note in notes:
        print(f"- {note}")


def print_hybrid_table(rows: Sequence[Row]) -> None:
    """Print the hybrid rows: state against total/S and traffic per group against its ideal."""
    if not rows:
        return
    print(
        "\n## Hybrid sharding: state sharded within S ranks (shard group), R = N/S replicas (replicate group)\n"
    )
    print(
        "| model | N = S x R | stage | built ranks | groups s | build s wall (cpu), median | host MiB traced | "
        "state/rank | state max/ideal (min), ideal total/S | shard group: collectives per step | sent/rank/step "
        "| ideal | sent/ideal | replicate group: collectives per step | sent/rank/step | ideal | sent/ideal "
        "| step s wall (cpu) |"
    )
    print("|" + "---|" * 18)
    for row in rows:
        first = row.runs[0]
        ratio = "-" if row.stage == 1 else f"{row.replicate_ratio:.5f}"
        print(
            f"| {row.model} | {row.world_size} = {row.num_shards} x {row.num_replicas} | {row.stage} "
            f"| {','.join(str(r.rank) for r in row.runs)} "
            f"| {statistics.median(r.groups_s for r in row.runs):.3f} "
            f"| {row.build_s:.3f} ({row.build_cpu_s:.3f}) | {row.traced.retained_nbytes / MIB:.2f} "
            f"| {_fmt_nbytes(first.state_nbytes)} | {row.state_ratio_max:.6f} ({row.state_ratio_min:.4f}) "
            f"| {summarize_collectives(row.step_in('shard'))} "
            f"| {_fmt_nbytes(row.sent_nbytes)} | {_fmt_nbytes(row.ideal_sent_nbytes)} | {row.traffic_ratio:.5f} "
            f"| {summarize_collectives(row.step_in('replicate'))} "
            f"| {_fmt_nbytes(row.replicate_sent_nbytes)} | {_fmt_nbytes(row.replicate_ideal_sent_nbytes)} "
            f"| {ratio} | {first.step_s[-1]:.3f} ({first.step_cpu_s[-1]:.3f}) |"
        )
    notes = []
    for row in rows:
        where = f"{row.model} N={row.world_size} S={row.num_shards} stage {row.stage}"
        for run in row.runs:
            if Counter((r.op, r.group, r.nbytes) for r in run.steps[0]) != Counter(
                (r.op, r.group, r.nbytes) for r in run.steps[-1]
            ):
                notes.append(
                    f"{where} rank {run.rank}: first step differs: {summarize_collectives(run.steps[0])}"
                )
        for mismatch in row.state_mismatches():
            notes.append(f"{where}: state formula mismatch, {mismatch}")
        if row.unmodelled:
            notes.append(f"{where}: no traffic model for {row.unmodelled}")
        if row.stray:
            notes.append(
                f"{where}: calls outside the shard and replicate groups: {summarize_collectives(row.stray)}"
            )
    construct = {
        f"shard: {summarize_collectives([c for c in r.runs[0].construct if c.group == 'shard']) or 'none'}; "
        f"replicate: {summarize_collectives([c for c in r.runs[0].construct if c.group == 'replicate']) or 'none'}"
        for r in rows
    }
    notes.append(f"construction collectives (every row): {' | '.join(sorted(construct))}")
    notes.append(
        "groups s: shardoptim.hybrid_groups(S) on the fake group (walks all N/S + S rank lists, O(N); "
        "creates this rank's two groups); build s: ShardedOptimizer(...) alone. Shard-group ideal: (S-1)/S x model bytes (stage 1, "
        "all-gather) or 2 (S-1)/S (stage 2, + reduce-scatter); replicate-group ideal: stage 2 a ring "
        "all-reduce of this rank's gradient shard, 2 (R-1)/R x model bytes / S; stage 1 none. Both "
        "measured columns include the small per-step hyperparameter sync (the f64 calls) and, at stage 2 "
        "on the replicate group, the gradient-flag all-reduce (the smallest AR f32)"
    )
    notes.append(
        "the fake group's all_gather_object returns this rank's object in every slot: the grid check's "
        "one object all-gather over the replicate group is answered with what the peers would send "
        "(hybrid_peer_object)"
    )
    for note in notes:
        print(f"- {note}")


def print_growth(rows_by_key: dict[tuple[str, int], list[Row]]) -> list[str]:
    """Print what grows with N per (model, stage); return the superlinear findings."""
    print(
        "\n## What grows with N (rank 0; bytes retained after construction by allocation site, tracemalloc)\n"
    )
    superlinear = []
    for (model, stage), rows in rows_by_key.items():
        rows = sorted(rows, key=lambda r: r.world_size)
        ns = [r.world_size for r in rows]
        builds = ", ".join(f"{r.build_cpu_s:.3f}" for r in rows)
        retained = ", ".join(f"{r.traced.retained_nbytes / MIB:.2f}" for r in rows)
        print(f"- {model} stage {stage}, N = {ns}: build cpu s {builds}; retained MiB {retained}")
        for site, sizes in growing_sites(rows)[:4]:
            cells = ", ".join(_fmt_nbytes(s) for s in sizes)
            print(f"    - {_site_name(site)} `{_site_source(site)}`: {cells}")
        if len(rows) >= 3:
            lo, hi = rows[-2], rows[-1]
            factor_n = hi.world_size / lo.world_size
            for site, sizes in growing_sites([lo, hi], floor=1 << 20):
                if sizes[-1] > SUPERLINEAR_FACTOR * factor_n * max(sizes[0], 1):
                    superlinear.append(
                        f"{model} stage {stage}: {_site_name(site)} grew {sizes[-1] / max(sizes[0], 1):.1f}x "
                        f"for {factor_n:.0f}x ranks"
                    )
            if hi.build_cpu_s > 0.05 and hi.build_cpu_s > SUPERLINEAR_FACTOR * factor_n * lo.build_cpu_s:
                superlinear.append(
                    f"{model} stage {stage}: build cpu time {lo.build_cpu_s:.3f} -> {hi.build_cpu_s:.3f} s for "
                    f"{factor_n:.0f}x ranks"
                )
            counts = {len(r.runs[0].construct) for r in rows}
            if len(counts) > 1:
                superlinear.append(f"{model} stage {stage}: construction collectives vary with N: {counts}")
    return superlinear


def print_what_if(models: Sequence[str], ranks: Sequence[int]) -> None:
    """Print the layout-only padding at other shard alignments (no optimizer built)."""
    from shardoptim.config import DEFAULT_BUCKET_NUMEL, DEFAULT_STAGE2_BUCKET_NUMEL
    from shardoptim.flat_layout import build_flat_layout
    from shardoptim.layout import DEFAULT_ALIGN

    n = max(ranks)
    aligns = (DEFAULT_ALIGN, 64, 4)
    print(
        f"\n## Layout only, N={n}: largest rank's elements / ideal and padded / total at other alignments "
        f"(elements; {aligns[-1]} fp32 elements change fused AdamW's results on CPU)\n"
    )
    print(f"| model | stage | align {aligns[0]} (library) | align {aligns[1]} | align {aligns[2]} |")
    print("|---|---|---|---|---|")
    for model in models:
        numels = [numel_of(s) for s in MODELS[model]()]
        total = sum(numels)
        for stage, bucket_numel in ((1, DEFAULT_BUCKET_NUMEL), (2, DEFAULT_STAGE2_BUCKET_NUMEL)):
            cells = []
            for align in aligns:
                layout = build_flat_layout(numels, num_shards=n, bucket_numel=bucket_numel, align=align)
                cells.append(f"{layout.imbalance():.5f} / {layout.padded_numel / total:.5f}")
            print(f"| {model} | {stage} | {' | '.join(cells)} |")


def hybrid_configs(
    models: Sequence[str], ranks: Sequence[int], shard_size: int | None
) -> list[tuple[str, int, int]]:
    """Return the (model, N, S) of the hybrid rows, in run order.

    `shard_size` None: the default set (S=DEFAULT_HYBRID_SHARD_SIZE for DEFAULT_HYBRID_MODELS at
    DEFAULT_HYBRID_RANKS, those of them in `models` and `ranks`); 0: none; S: every model of
    `models` at every N of `ranks` that S divides with at least two replicas.
    """
    if shard_size == 0:
        return []
    if shard_size is None:
        s = DEFAULT_HYBRID_SHARD_SIZE
        return [
            (m, n, s)
            for m in models
            if m in DEFAULT_HYBRID_MODELS
            for n in ranks
            if n in DEFAULT_HYBRID_RANKS
        ]
    return [(m, n, shard_size) for m in models for n in ranks if n % shard_size == 0 and n >= 2 * shard_size]


def warm_up() -> float:
    """Build a tiny optimizer once (one-time imports); return how long that first build took."""
    with fake_group(0, 2):
        start = time.perf_counter()
        shardoptim.ShardedOptimizer([torch.nn.Parameter(torch.empty(64, device="meta"))], torch.optim.AdamW)
        return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="world sizes N")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--device", choices=("meta", "cpu", "cuda"), default="meta")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--max-real-gib", type=float, default=2.0, help="skip models whose parameters exceed this on cpu/cuda"
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=None,
        metavar="S",
        help="hybrid rows: shard within groups of S consecutive ranks, replicate across them, for every "
        "model and every N that S divides (N >= 2S), after the plain rows. Default: S="
        f"{DEFAULT_HYBRID_SHARD_SIZE} for {','.join(DEFAULT_HYBRID_MODELS)} at N="
        f"{','.join(map(str, DEFAULT_HYBRID_RANKS))} (those selected); 0: no hybrid rows",
    )
    args = parser.parse_args(argv)
    if args.shard_size is not None and args.shard_size < 0:
        parser.error(f"--shard-size must be 0 (off) or a positive number of ranks, got {args.shard_size}")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    ranks = sorted(int(n) for n in args.ranks.split(","))
    stages = [int(s) for s in args.stages.split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        torch.cuda.set_device(0)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(
        f"# ShardedOptimizer(AdamW) as rank r of N, one process, torch {torch.__version__}, fake process group"
    )
    print(
        f"device {args.device}, dtype {args.dtype}; what ran where: see the module docstring. "
        f"Collectives: recorded calls into torch.distributed; bytes sent under ring algorithms."
    )
    print(
        f"one-time per process: first ShardedOptimizer construction {warm_up():.2f} s "
        "(torch.optim.Optimizer.__init__ imports torch._dynamo; a plain torch.optim.AdamW pays it too); "
        "build times below are after it"
    )

    rows_by_key: dict[tuple[str, int], list[Row]] = {}
    all_rows: list[Row] = []
    for model in models:
        shapes = MODELS[model]()
        itemsize = torch.empty(0, dtype=dtype).element_size()
        model_gib = sum(numel_of(s) for s in shapes) * itemsize / (1 << 30)
        if args.device != "meta" and model_gib > args.max_real_gib:
            print(
                f"\n### {model}: skipped on {args.device}: {model_gib:.1f} GiB of parameters > "
                f"--max-real-gib {args.max_real_gib} (use --device meta)"
            )
            continue
        rows = []
        for stage in stages:
            for n in ranks:
                start = time.perf_counter()
                row = measure(model, shapes, world_size=n, stage=stage, device=args.device, dtype=dtype)
                print(f"[{model} N={n} stage {stage}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
                rows.append(row)
                rows_by_key.setdefault((model, stage), []).append(row)
        all_rows += rows
        print_model_table(model, rows, args.device)
        sys.stdout.flush()

    hybrid_rows: list[Row] = []
    for model, n, shard_size in hybrid_configs(
        [m for m in models if m in {r.model for r in all_rows}], ranks, args.shard_size
    ):
        for stage in stages:
            start = time.perf_counter()
            row = measure(
                model,
                MODELS[model](),
                world_size=n,
                stage=stage,
                device=args.device,
                dtype=dtype,
                shard_size=shard_size,
            )
            print(
                f"[{model} N={n} S={shard_size} stage {stage}: {time.perf_counter() - start:.1f} s]",
                file=sys.stderr,
            )
            hybrid_rows.append(row)
    print_hybrid_table(hybrid_rows)

    superlinear = print_growth(rows_by_key)
    print_what_if(models, ranks)

    print("\n## Targets\n")
    failed = False

    def verdict(ok: bool, text: str) -> None:
        nonlocal failed
        failed = failed or not ok
        print(f"{'PASS' if ok else 'FAIL'}: {text}")

    big = [r for r in all_rows if r.model == BUILD_S_MODEL and r.world_size == max(ranks)]
    if big:
        worst = max((run for r in big for run in r.runs), key=lambda run: run.build_cpu_s)
        verdict(
            worst.build_cpu_s < BUILD_S_TARGET,
            f"construction at N={max(ranks)} for {BUILD_S_MODEL}: slowest "
            f"built rank {worst.build_cpu_s:.3f} s of CPU (< {BUILD_S_TARGET} s; its wall time {worst.build_s:.3f} s "
            f"on a machine at load {os.getloadavg()[0]:.1f})",
        )
    else:
        print(f"SKIP: construction target ({BUILD_S_MODEL} at the largest N was not run)")
    bad_state = [r for r in all_rows if r.state_ratio_max > 1 + STATE_TOLERANCE or r.state_mismatches()]
    worst_state = max(all_rows, key=lambda r: r.state_ratio_max)
    verdict(
        not bad_state,
        f"state per rank within {STATE_TOLERANCE:.1%} of total/N (largest of all N ranks): "
        f"worst {worst_state.state_ratio_max:.6f} ({worst_state.model} N={worst_state.world_size} stage "
        f"{worst_state.stage}); over: "
        + (
            ", ".join(f"{r.model} N={r.world_size} s{r.stage} {r.state_ratio_max:.5f}" for r in bad_state)
            or "none"
        ),
    )
    bad_traffic = [r for r in all_rows if abs(r.traffic_ratio - 1) > TRAFFIC_TOLERANCE or r.unmodelled]
    worst_traffic = max(all_rows, key=lambda r: abs(r.traffic_ratio - 1))
    verdict(
        not bad_traffic,
        f"traffic per step within {TRAFFIC_TOLERANCE:.0%} of the ideal: worst "
        f"{worst_traffic.traffic_ratio:.5f} ({worst_traffic.model} N={worst_traffic.world_size} stage "
        f"{worst_traffic.stage}); over: "
        + (
            ", ".join(f"{r.model} N={r.world_size} s{r.stage} {r.traffic_ratio:.4f}" for r in bad_traffic)
            or "none"
        ),
    )
    verdict(
        not superlinear,
        "nothing in the construction grows faster than linearly in N"
        + (
            ": " + "; ".join(superlinear)
            if superlinear
            else " (retained bytes per site, build time, collectives)"
        ),
    )
    if hybrid_rows:
        hybrid_verdicts(hybrid_rows, verdict)
    return 1 if failed else 0


def hybrid_verdicts(rows: Sequence[Row], verdict: Callable[[bool, str], None]) -> None:
    """Call `verdict(ok, text)` once per target of the hybrid rows."""

    def name(r: Row) -> str:
        return f"{r.model} N={r.world_size} S={r.num_shards} s{r.stage}"

    bad_state = [r for r in rows if r.state_ratio_max > 1 + STATE_TOLERANCE or r.state_mismatches()]
    worst = max(rows, key=lambda r: r.state_ratio_max)
    verdict(
        not bad_state,
        f"hybrid: state per rank within {STATE_TOLERANCE:.1%} of total/S (largest of the S shard ranks, "
        f"every replica the same): worst {worst.state_ratio_max:.6f} ({name(worst)}); over: "
        + (", ".join(f"{name(r)} {r.state_ratio_max:.5f}" for r in bad_state) or "none"),
    )
    bad_shard = [r for r in rows if abs(r.traffic_ratio - 1) > TRAFFIC_TOLERANCE or r.unmodelled or r.stray]
    worst = max(rows, key=lambda r: abs(r.traffic_ratio - 1))
    verdict(
        not bad_shard,
        f"hybrid: shard-group traffic per step within {TRAFFIC_TOLERANCE:.0%} of (S-1)/S (stage 1) or "
        f"2 (S-1)/S (stage 2) x model bytes, and no call outside the two groups: worst "
        f"{worst.traffic_ratio:.5f} ({name(worst)}); over: "
        + (
            ", ".join(
                f"{name(r)} {r.traffic_ratio:.4f}{' +stray calls' if r.stray else ''}" for r in bad_shard
            )
            or "none"
        ),
    )
    stage2 = [r for r in rows if r.stage == 2]
    if stage2:
        bad = [r for r in stage2 if abs(r.replicate_ratio - 1) > TRAFFIC_TOLERANCE]
        worst = max(stage2, key=lambda r: abs(r.replicate_ratio - 1))
        verdict(
            not bad,
            f"hybrid stage 2: replicate-group traffic per step within {TRAFFIC_TOLERANCE:.0%} of a ring "
            f"all-reduce of the gradient shard, 2 (R-1)/R x model bytes / S: worst {worst.replicate_ratio:.5f} "
            f"({name(worst)}, {_fmt_nbytes(worst.replicate_sent_nbytes)} of "
            f"{_fmt_nbytes(worst.replicate_ideal_sent_nbytes)}); over: "
            + (", ".join(f"{name(r)} {r.replicate_ratio:.4f}" for r in bad) or "none"),
        )
    stage1 = [r for r in rows if r.stage == 1]
    if stage1:
        bad = [r for r in stage1 if r.replicate_sent_nbytes > REPLICATE_METADATA_NBYTES]
        worst = max(stage1, key=lambda r: r.replicate_sent_nbytes)
        verdict(
            not bad,
            f"hybrid stage 1: only metadata crosses the replicate group, at most "
            f"{_fmt_nbytes(REPLICATE_METADATA_NBYTES)} per rank per step: worst "
            f"{_fmt_nbytes(worst.replicate_sent_nbytes)} ({name(worst)}: "
            f"{summarize_collectives(worst.step_in('replicate')) or 'nothing'}, "
            f"{worst.replicate_sent_nbytes / worst.model_nbytes:.2e} of the model bytes); over: "
            + (", ".join(f"{name(r)} {_fmt_nbytes(r.replicate_sent_nbytes)}" for r in bad) or "none"),
        )


if __name__ == "__main__":
    sys.exit(main())
