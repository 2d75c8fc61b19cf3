"""The options of a ShardedOptimizer beyond the base optimizer's own, validated in one place.

`ShardedOptimizer(...)` takes these as keyword arguments (the drop-in signature of
torch.distributed.optim.ZeroRedundancyOptimizer) and freezes them into a `ShardConfig`. Pure
checks: must not import torch.distributed or the rest of shardoptim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

#: 1: every rank keeps full gradients (averaged by DDP or the user); 2: each rank keeps only the
#: gradient shard it owns, reduce-scattered by the optimizer during backward.
Stage = Literal[1, 2]
#: Which library moves the flat CPU collectives: "auto" picks mpi4py under an MPI launcher when it
#: measures faster, "torch" always uses torch.distributed, "mpi" requires mpi4py.
CommBackend = Literal["auto", "torch", "mpi"]

#: Default soft cap on the elements of one bucket at stage 1: 16 Mi elements (64 MiB of fp32),
#: large enough that a collective runs near full bandwidth.
DEFAULT_BUCKET_NUMEL = 1 << 24
#: Default at stage 2: 4 Mi elements (16 MiB of fp32, DDP's 25 MB order). A full gradient bucket
#: lives only while it is filled and reduced, so smaller buckets keep gradient memory near total/N.
DEFAULT_STAGE2_BUCKET_NUMEL = 1 << 22

_MASTER_DTYPES = (torch.float32, torch.float64)
#: The `torch.compile` keywords a `compile={...}` dict may hold (mode and options only with inductor).
COMPILE_KEYS = ("backend", "mode", "options", "dynamic", "fullgraph")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardConfig:
    """Options of a ShardedOptimizer (everything but the parameters, class and base options)."""

    parameters_as_bucket_view: bool = False
    """True: parameters are views into the flat buckets; False: each keeps a storage of its own."""
    sharding: str = "auto"
    """Partitioning: "flat" element ranges, "tensor" whole tensors, "replicated" unsharded on every
    rank, "auto" per optimizer class (flat only for classes known elementwise)."""
    hparam_sync: str = "broadcast"
    """Make group options equal to rank 0's before each step ("broadcast"), raise ("check"), or trust."""
    bucket_numel: int = DEFAULT_BUCKET_NUMEL
    """Soft cap on elements per bucket (one collective each)."""
    verify_every: int = 0
    """Run verify_replicas() after every this many steps (0: never)."""
    stage: Stage = 1
    """ZeRO stage: 1 shards optimizer state, 2 also shards gradients (no DDP needed)."""
    master_dtype: torch.dtype | None = None
    """Keep this rank's shard of low-precision parameters in this dtype and update it there."""
    skip_nonfinite: bool = False
    """Skip the step on every rank when any gradient shard holds an inf or nan."""
    comm_backend: CommBackend = "auto"
    """Library for the flat CPU collectives (mpi4py under mpirun, or torch.distributed)."""
    entry_timeout_s: float = 60.0
    """How long the rank a consolidation or checkpoint targets waits for the others to call it too."""
    compile: bool | Mapping[str, Any] = False
    """Run the base step over this rank's slice as a compiled graph (True, or `torch.compile`
    keywords: backend, mode, options, dynamic, fullgraph); never passed to the base class."""

    @classmethod
    def from_options(cls, **options: Any) -> ShardConfig:
        """Validate keyword options into a config; raise ValueError/TypeError naming the bad one.

        `sharding` and `hparam_sync` are checked where they are used (shardoptim.kinds and
        shardoptim.hparams); `bucket_numel=None` picks the default for the stage.
        """
        stage = options.get("stage", 1)
        if "bucket_numel" not in options or options["bucket_numel"] is None:
            options["bucket_numel"] = DEFAULT_STAGE2_BUCKET_NUMEL if stage == 2 else DEFAULT_BUCKET_NUMEL
        config = cls(**options)
        config._validate()
        return config

    def _validate(self) -> None:
        if self.comm_backend not in get_args(CommBackend):
            raise ValueError(
                f"comm_backend must be one of {list(get_args(CommBackend))}, got {self.comm_backend!r}"
            )
        if isinstance(self.stage, bool) or self.stage not in get_args(Stage):
            raise ValueError(
                f"stage must be 1 (shard optimizer state) or 2 (also shard gradients), got {self.stage!r}"
            )
        bucket = self.bucket_numel
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket_numel must be a positive int, got {bucket!r}")
        every = self.verify_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"verify_every must be an int >= 0 (0 turns the check off), got {every!r}")
        if self.master_dtype is not None and self.master_dtype not in _MASTER_DTYPES:
            raise TypeError(
                f"master_dtype must be torch.float32, torch.float64 or None, got {self.master_dtype!r}; "
                "master weights exist to update low-precision parameters in higher precision"
            )
        if not isinstance(self.parameters_as_bucket_view, bool):
            raise TypeError(
                f"parameters_as_bucket_view must be True or False, got {self.parameters_as_bucket_view!r}"
            )
        timeout = self.entry_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(
                f"entry_timeout_s must be a number of seconds > 0, got {timeout!r}; it bounds how long a "
                "consolidation or checkpoint waits for every rank to call it"
            )
        if not isinstance(self.skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {self.skip_nonfinite!r}")
        _validate_compile(self.compile)

    def compile_options(self) -> dict[str, Any] | None:
        """Return the `torch.compile` keywords of the local update, or None when it runs eagerly."""
        if self.compile is False:
            return None
        return {} if self.compile is True else dict(self.compile)


def _validate_compile(value: object) -> None:
    """Raise TypeError/ValueError naming what is wrong with a `compile=` option."""
    if isinstance(value, bool):
        return
    if not isinstance(value, Mapping):
        raise TypeError(
            f"compile must be True, False or a dict of torch.compile options (e.g. {{'mode': "
            f"'max-autotune-no-cudagraphs'}}), got {type(value).__name__} {value!r}"
        )
    unknown = sorted(str(k) for k in value if k not in COMPILE_KEYS)
    if unknown:
        raise ValueError(f"compile got unknown keys {unknown}; the keys it takes are {list(COMPILE_KEYS)}")
    backend = value.get("backend", "inductor")
    if not isinstance(backend, str):
        raise TypeError(f"compile['backend'] must be the name of a torch.compile backend, got {backend!r}")
    if backend != "inductor" and ("mode" in value or "options" in value):
        raise ValueError(
            f"compile['mode'] and compile['options'] need backend 'inductor', got backend {backend!r}"
        )
    mode = value.get("mode", "default")
    if mode is not None and mode not in _COMPILE_MODES:
        raise ValueError(f"compile['mode'] must be one of {list(_COMPILE_MODES)}, got {mode!r}")
    options = value.get("options", {})
    if not isinstance(options, Mapping):
        raise TypeError(f"compile['options'] must be a dict of inductor options, got {options!r}")
    if value.get("dynamic") not in (None, True, False):
        raise ValueError(f"compile['dynamic'] must be None, True or False, got {value.get('dynamic')!r}")
    if not isinstance(value.get("fullgraph", False), bool):
        raise TypeError(f"compile['fullgraph'] must be True or False, got {value.get('fullgraph')!r}")
