"""ShardedOptimizer: any torch.optim optimizer, its state sharded across data-parallel ranks.

A thin torch.optim facade: it normalises the user's parameters and options, picks the sharding
kind, has a `Placement` (shardoptim.placement) lay the parameters out, builds the local base
optimizer over this rank's pieces, and hands both to the kind's step strategy
(shardoptim.step_sharded, step_replicated, step_lbfgs); each of those steps is written out in
shardoptim.construct. The modules that read the shards (state_dict, consolidated, checkpoint,
replicas) get the Placement from `opt.placement`; the gradients go through `OwnedGrads`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from shardoptim import construct
from shardoptim.accounting import local_state_nbytes, memory_nbytes
from shardoptim.compiled import CompiledUpdate
from shardoptim.config import DEFAULT_BUCKET_NUMEL, CommBackend, ShardConfig, Stage
from shardoptim.hparams import HparamSync
from shardoptim.kinds import Kind
from shardoptim.params import as_param_groups, validate_params
from shardoptim.probe import ProbeVerdict

__all__ = ["DEFAULT_BUCKET_NUMEL", "ShardedOptimizer"]

logger = logging.getLogger(__name__)


class ShardedOptimizer(Optimizer):
    """Shard the state of any torch.optim optimizer across the ranks of a process group.

    Every rank keeps identical full parameters; each rank keeps optimizer state only for the part
    of the parameters it owns, runs the base optimizer's update on that part, and the updated parts
    are then gathered back to every rank. Build it on every rank, after the model is on its device.

    Args:
        params: anything torch.optim accepts: tensors, (name, tensor) pairs or param-group dicts.
        optimizer_class: the base optimizer class, e.g. torch.optim.AdamW.
        process_group: the ranks to shard over; None is the default group (or a single process
            when torch.distributed is not initialised). `shard_group` is another name for it.
        parameters_as_bucket_view: False (default): every parameter keeps a storage of its own, as
            with plain torch.optim (on one host moved once into shared memory that the peers read;
            with NCCL or across hosts gathers pass through a bounded scratch bucket). True:
            parameters become views into the flat buckets and share storage, so serializers that
            de-duplicate tensors by storage (safetensors, save_pretrained, save_state) keep one.
        overlap_with_ddp: accepted for ZeroRedundancyOptimizer's signature; True is refused (use
            stage=2, which overlaps the gradient reduction with backward without DDP).
        sharding: "flat" cuts buckets into equal element ranges (for elementwise optimizers),
            "tensor" gives each parameter whole to one rank, "replicated" runs the class unsharded
            on every rank (for updates that couple tensors), "auto" picks per class: flat only
            for classes known elementwise, else the probe picks tensor or replicated (see
            shardoptim.kinds).
        hparam_sync: "broadcast" (default) makes every group's numeric options equal to rank 0's
            before each step; "check" raises if they differ; "off" trusts the user.
        bucket_numel: soft cap on elements per bucket (one collective each); None: 16 Mi at
            stage 1, 4 Mi at stage 2.
        verify_every: run `verify_replicas()` after every this many steps (0: never).
        stage: 1 shards the optimizer state (gradients arrive averaged, e.g. from DDP); 2 also
            shards the gradients: no DDP, the optimizer reduce-scatters them during backward.
        master_dtype: e.g. torch.float32: update bf16/fp16 parameters through master copies of
            this rank's shard in this dtype (checkpoints hold the master copies).
        skip_nonfinite: skip the step on every rank when any gradient holds an inf or nan.
        comm_backend: "auto" moves flat CPU collectives with mpi4py under mpirun when that
            measures faster, "torch" always uses torch.distributed, "mpi" requires mpi4py.
        entry_timeout_s: how long the target rank of `consolidate_state_dict` (or rank 0 of a
            sharded checkpoint) waits for every other rank to call it too before it raises, naming
            the likely mistake (a collective called inside `if rank == 0:`); default 60 s.
        compile: True (or a dict of `torch.compile` keywords, e.g. {"mode": "max-autotune-no-cudagraphs"})
            runs the base step over this rank's slice as a compiled graph, compiled once per layout
            (see shardoptim.compiled); never passed to the base class. Not for LBFGS.
        replicate_group: hybrid sharding: the state is sharded within `process_group` (e.g. the
            ranks of one node) and replicated across this group, which holds the rank at the same
            shard position in every other shard group (`shardoptim.hybrid_groups()` builds both
            from LOCAL_WORLD_SIZE). Stage 2 averages the gradient shards across it.
        device_mesh: instead of the groups, a torch DeviceMesh: 1-D shards over it, 2-D is
            (replicate, shard), FSDP's hybrid-sharding convention (or named "replicate"/"shard").
        **defaults: options for the base optimizer (lr, betas, ...). When neither `fused` nor
            `foreach` is given, fused=True is used where the class supports it, else foreach=True.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[Optimizer],
        process_group: dist.ProcessGroup | None = None,
        parameters_as_bucket_view: bool = False,
        overlap_with_ddp: bool = False,
        *,
        sharding: str = "auto",
        hparam_sync: HparamSync = "broadcast",
        bucket_numel: int | None = None,
        verify_every: int = 0,
        stage: Stage = 1,
        master_dtype: torch.dtype | None = None,
        skip_nonfinite: bool = False,
        comm_backend: CommBackend = "auto",
        entry_timeout_s: float = 60.0,
        compile: bool | dict[str, Any] = False,
        shard_group: dist.ProcessGroup | None = None,
        replicate_group: dist.ProcessGroup | None = None,
        device_mesh: Any = None,
        **defaults: Any,
    ) -> None:
        construct.refuse_overlap_with_ddp(overlap_with_ddp)
        self.config = ShardConfig.from_options(
            parameters_as_bucket_view=parameters_as_bucket_view,
            sharding=sharding,
            hparam_sync=hparam_sync,
            bucket_numel=bucket_numel,
            verify_every=verify_every,
            stage=stage,
            master_dtype=master_dtype,
            skip_nonfinite=skip_nonfinite,
            comm_backend=comm_backend,
            entry_timeout_s=entry_timeout_s,
            compile=compile,
        )
        groups = as_param_groups(params)
        choice = construct.settle_kind(optimizer_class, self.config, defaults, groups)
        #: What probing the base class found: the verdict that decided the layout (None for classes
        #: of known kind, or a sharding the user chose); `probe_verdicts`: one per distinct group.
        self.probe_verdict: ProbeVerdict | None = choice.deciding
        self.probe_verdicts: tuple[ProbeVerdict, ...] = choice.verdicts
        self._probe_defaults = dict(defaults)  # the constructor's options, to probe added groups with
        #: Why the class runs unsharded on every rank ("" unless sharding is "replicated").
        self.replication_reason = construct.replication_reason(choice)
        params_list = validate_params(groups)
        #: The placed state: parameters, buckets, pieces, layouts, storage, masters (shardoptim.placement).
        self.placement = construct.open_placement(
            self.config, choice.kind, optimizer_class, process_group, shard_group, replicate_group, device_mesh
        )
        self._reducer = construct.grad_reducer(self.placement)
        self._building = True
        #: Implementation flags the wrapper chose itself, with the class's own default: consolidated
        #: param_groups record the default (what the user asked for), not the wrapper's choice.
        resolved, self.injected_flags = construct.base_options(
            optimizer_class, defaults, groups, params_list, choice.kind
        )
        super().__init__(groups, resolved)
        self._building = False

        #: The base optimizer over this rank's pieces.
        self.optim = construct.local_optimizer(self.placement, params_list, self.param_groups, resolved)
        self._update = CompiledUpdate(self.optim, self.config.compile_options())
        self.placement.bind_(0, self._reducer)
        construct.adopt_local_defaults(self.defaults, self.param_groups, self.optim)
        self._stepper = construct.build_stepper(
            self.placement,
            self.optim,
            groups=lambda: self.param_groups,
            hparam_sync=hparam_sync,
            reducer=self._reducer,
            uses_rng=any(v.uses_rng for v in self.probe_verdicts),
            update=self._update,
            verify=lambda: self.verify_replicas(),
        )
        self.placement.open_entry()  # last: a construction that failed on some rank took no entry namespace
        construct.log_layout(self.placement, replication_reason=self.replication_reason)

    def rank_to_numel(self) -> list[int]:
        """Return the parameter elements whose state each rank owns (all groups; no communication)."""
        return self.placement.rank_to_numel()

    # ----------------------------------------------------------------------------------- API

    @overload
    def step(self, closure: None = None, **kwargs: Any) -> None: ...

    @overload
    def step(self, closure: Callable[[], float], **kwargs: Any) -> float: ...

    # NOTE: never traced by torch.compile: the step talks to other ranks (process groups are opaque
    # to dynamo) and walks Python lists of pieces. `torch.compile(opt.step)` thus runs it as written.
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def step(self, closure: Callable[[], float] | None = None, **kwargs: Any) -> float | None:
        """Run one optimizer step on every rank: sync options, update the owned shard, gather.

        Collective: call on every rank of the group, in the same order. Under
        `torch.compile(opt.step)` it runs eagerly (a graph break), with the same results.

        Args:
            closure: re-evaluates the model and returns the loss; called exactly once on every
                rank (with grad enabled) before the update. A base class whose step takes a
                closure gets one that returns this loss.
            **kwargs: passed on to the base optimizer's step (as ZeroRedundancyOptimizer does).

        Returns:
            The closure's loss, or None without a closure. With skip_nonfinite=True a step whose
            gradients hold an inf or nan changes nothing on any rank; `last_step_skipped` says so.
        """
        return self._stepper.step(closure, kwargs)  # type: ignore[no-any-return]

    @property
    def num_skipped_steps(self) -> int:
        """Steps skipped because a gradient held an inf or nan (skip_nonfinite=True)."""
        return self._stepper.record.num_skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step() was skipped for an inf or nan gradient."""
        return self._stepper.record.last_step_skipped

    if not TYPE_CHECKING:  # keeps mypy strict about the wrapper's own attributes

        def __getattr__(self, name: str) -> Any:
            """Forward public methods that only the base class defines (e.g. schedule-free's train/eval).

            `hasattr(opt, "train")` is True exactly when the base optimizer has `train`, as
            frameworks that call it (Trainer, Accelerate) expect. Collective, as the method runs
            on this rank's shard and the parameters are then gathered (see
            StepSkeleton.base_method and call_base_method).
            """
            stepper = self.__dict__.get("_stepper")
            method = None if stepper is None else stepper.base_method(name)
            if method is None:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            return method

    @property
    def compiled_update(self) -> CompiledUpdate:
        """The local update's compiled step (compile=...): whether it compiles, its counts, why it fell back."""
        return self._update

    @property
    def sharding(self) -> Kind:
        """How the state is sharded: "flat", "tensor", "replicated" or "lbfgs"."""
        return self.placement.kind

    @property
    def rank(self) -> int:
        return self.placement.comm.rank

    @property
    def world_size(self) -> int:
        """Ranks the state is sharded over (the shard group's size)."""
        return self.placement.comm.world_size

    @property
    def num_replicas(self) -> int:
        """Full copies of the state across the replicate group (1 without hybrid sharding)."""
        replicas = self.placement.replicas
        return 1 if replicas is None else replicas.size

    @property
    def replica_rank(self) -> int:
        """This rank's position in its replicate group (0 without hybrid sharding)."""
        replicas = self.placement.replicas
        return 0 if replicas is None else replicas.comm.rank

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group on every rank; its parameters get buckets of their own.

        Collective: call on every rank of the group, in the same order, with the same group.
        """
        if self._building:
            super().add_param_group(param_group)
            return
        probe_defaults = self._probe_defaults if self.probe_verdicts else None
        group, new_params = construct.checked_new_group(self.placement, param_group, probe_defaults=probe_defaults)
        super().add_param_group(group)
        construct.place_new_group(self.placement, new_params, self.param_groups, self.optim, self._reducer)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the full optimizer state onto rank `to`, for a following `state_dict()` there.

        Collective: call on every rank of the group, in the same order, not inside `if rank ==
        to:` (hand-written loops: call it before the rank-0 save block, or use `full_state_dict`).
        Called on rank `to` alone it raises `shardoptim.EntryError` after `entry_timeout_s`
        (default 60 s) instead of waiting for the group's timeout. Streams tensor by tensor (no
        shard is pickled); the result is kept on rank `to` until the next `step`. With hybrid
        sharding `to` is a rank of the shard group, and only the lead replica (the shard group of
        global rank 0) gathers: every other rank's `state_dict()` then returns `{}`.
        """
        from shardoptim.consolidated import consolidate_onto

        consolidate_onto(self, to=to)

    def full_state_dict(self, to: int = 0) -> dict[str, Any] | None:
        """Return the full optimizer state on rank `to` and None on every other rank.

        One call for hand-written loops: `consolidate_state_dict(to)` then `state_dict()` there.
        The dict is the base optimizer's own format (a plain torch.optim optimizer loads it).

        Collective: call on every rank of the group, in the same order, outside `if rank == to:`:
            sd = opt.full_state_dict(to=0)
            if rank == 0:
                torch.save({"model": model.state_dict(), "optimizer": sd}, path)
        """
        self.consolidate_state_dict(to=to)
        return self.state_dict() if self.placement.comm.rank == to and self.placement.consolidated is not None else None

    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer state in the base optimizer's own format, without communicating.

        - After `consolidate_state_dict(to=r)` (since the last step): the full state on rank r,
          and `{}` on every other rank (which `load_state_dict` accepts as a no-op).
        - Before any state exists (no step taken, nothing loaded): `{"state": {}, "param_groups":
          [...]}` on every rank, as a fresh torch.optim optimizer returns.
        - In a group of one rank: the full state (consolidated on the spot).

        Safe to call on one rank only (e.g. rank 0 saving a checkpoint): it never communicates;
        the collective is `consolidate_state_dict`, which every rank must call before.

        Raises:
            RuntimeError: state exists on several ranks but was not consolidated since the last step.
        """
        from shardoptim.consolidated import current

        return current(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a consolidated state_dict (or a plain torch.optim one) saved at any world size.

        Call on every rank with the full dict; each rank keeps the part it owns. The caller's
        dict is not modified. `{}` (what `state_dict()` returns on a rank that is not the
        consolidation target) is a no-op.
        """
        from shardoptim.consolidated import load

        load(self, state_dict)

    def verify_replicas(self) -> None:
        """Raise on every rank, naming the first parameter that differs, if replicas diverged.

        Compares an exact checksum of every parameter and the packed hyperparameters.

        Collective: call on every rank of the group, in the same order.
        """
        from shardoptim.replicas import verify_replicas

        verify_replicas(self)

    def local_state_nbytes(self) -> int:
        """Return the bytes of optimizer-state tensors held by this rank (its shard only).

        Master weights are not counted here; see `memory_nbytes()`.
        """
        return local_state_nbytes(self.optim)

    def memory_nbytes(self) -> dict[str, int]:
        """Return this rank's bytes of "params", "grads", "state" and "master".

        "params" counts the full buckets, plus the parameters' own storage when they are not
        bucket views (parameters_as_bucket_view=False).

        "grads" counts at stage 2 the gradient shards and the full gradient buckets kept for reuse
        (the grads.POOL_SIZE largest per dtype), at stage 1 the parameters' `.grad`.
        """
        return memory_nbytes(self.placement, self.optim, self._reducer)

    @property
    def stage(self) -> int:
        return self.config.stage

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Return a context in which backward accumulates gradients locally, without communicating.

        Stage 2 only: gradients stay whole in `.grad` (memory of a full gradient) and are reduced
        once, by the next backward outside the block or by `step()`. At stage 1 gradient
        communication belongs to DDP: use `ddp_model.no_sync()`.
        """
        return self._stepper.ctx.grads.no_sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as torch.optim does; at stage 2 also the gradient shards."""
        super().zero_grad(set_to_none)
        self._stepper.ctx.grads.zero_shards_(set_to_none=set_to_none)

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, *, error_if_nonfinite: bool = False
    ) -> torch.Tensor:
        """Clip the gradients of all parameters by their global norm, like torch.nn.utils.clip_grad_norm_.

        Collective: call on every rank of the group, in the same order (one small all-gather).
        The norm is over every rank's gradient pieces together, so it is the norm of the full
        unsharded gradients (bitwise torch's at world size 1); stage 2 scales the shards, stage 1
        every parameter's `.grad`. norm_type: p > 0 or inf.

        Returns:
            The total norm before clipping (0-dim fp32 tensor, fp64 for fp64 gradients), the same
            on every rank.
        """
        return self._stepper.ctx.grads.clip_(max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)

    def unscale_grads_(
        self, inv_scale: torch.Tensor, found_inf: torch.Tensor, *, allow_fp16: bool = False
    ) -> dict[torch.device, torch.Tensor]:
        """Unscale the gradients and flag inf/nan on every rank (used by shardoptim.ShardedGradScaler).

        Collective: call on every rank of the group, in the same order.
        """
        return self._stepper.ctx.grads.unscale_(inv_scale, found_inf, allow_fp16=allow_fp16)
