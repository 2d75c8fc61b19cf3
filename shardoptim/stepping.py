"""The step of a ShardedOptimizer: sync options, update the owned shard, gather; and what it calls.

A mixin of ShardedOptimizer (kept apart so each module stays readable): the per-step flow for
the sharded kinds, LBFGS and the replicated kind, forwarding of base-class methods (train/eval),
the agreement on a failed third-party step, and the parameters' settling before each step. It
reads the optimizer's own attributes, declared below for type checking. Must not be imported
by anything but shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast, overload

import torch
from torch.optim import Optimizer

from shardoptim.comm import Comm, PendingGather
from shardoptim.compiled import CompiledUpdate
from shardoptim.config import ShardConfig
from shardoptim.grads import GradReducer
from shardoptim.hparams import HparamSyncer, copy_hparams_, flow_back_hparams_, snapshot_hparams
from shardoptim.hybrid import Replicas
from shardoptim.kinds import TORCH_ELEMENTWISE, Kind
from shardoptim.master import MASTER_KEY, MasterShards
from shardoptim.owned_grads import OwnedGrads
from shardoptim.pieces import Bucket, Piece
from shardoptim.replicated import rank0_rng
from shardoptim.storage import ParamStorage

logger = logging.getLogger("shardoptim.optimizer")


class Stepping:
    """Step machinery of ShardedOptimizer (see the module docstring)."""

    if TYPE_CHECKING:
        config: ShardConfig
        optim: Optimizer
        _update: CompiledUpdate
        param_groups: list[dict[str, Any]]
        num_skipped_steps: int
        last_step_skipped: bool
        _kind: Kind
        _comm: Comm
        _hparams: HparamSyncer
        _replica_hparams: HparamSyncer | None
        _replicas: Replicas | None
        _optimizer_class: type[Optimizer]
        _params: list[torch.Tensor]
        _buckets: list[Bucket]
        _pieces: list[Piece]
        _masters: MasterShards
        _reducer: GradReducer | None
        _grads: OwnedGrads
        _storage: ParamStorage
        _consolidated: dict[str, Any] | None
        _consolidated_to: int | None
        _has_state: bool
        _num_steps: int
        _uses_rng: bool
        _warned_full_grads: bool

        def verify_replicas(self) -> None: ...

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
        if self._kind == "lbfgs":
            if kwargs:
                raise TypeError(f"the sharded LBFGS step takes only a closure, got keyword arguments {sorted(kwargs)}")
            return self._step_lbfgs(closure)
        if self._kind == "replicated":
            return cast("float | None", self._step_replicated(closure, kwargs))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle()
        self._check_grads()
        if self._reducer is not None:
            self._reducer.hook_trainable_()
            self._reducer.flush_()
            self._warn_full_grads()
        self._consolidated = None
        self._consolidated_to = None
        # NOTE: the step flags (which parameters got gradients, inf/nan) ride in the same
        # all-gather as the hyperparameters: one collective per step for both.
        flags = self._grads.local_flags(check_nonfinite=self.config.skip_nonfinite)
        rank_to_flags = self._sync_hparams(extra=flags)
        copy_hparams_(self.param_groups, self.optim.param_groups)
        has_grad, nonfinite = self._grads.merge_flags(rank_to_flags)
        self.last_step_skipped = nonfinite
        if nonfinite:
            self.num_skipped_steps += 1
            if self._comm.rank == 0:
                logger.warning(
                    "step %d skipped: a gradient holds an inf or nan (%d steps skipped so far)",
                    self._num_steps,
                    self.num_skipped_steps,
                )
            return loss
        # NOTE: a compiled update gets no closure (the loss is computed already; see shardoptim.compiled).
        if closure is not None and _takes_closure(self.optim) and not self._update.compiles:
            kwargs = {**kwargs, "closure": _CachedLoss(loss)}
        pushed = snapshot_hparams(self.optim.param_groups)
        with torch.no_grad():
            self._update_and_gather(has_grad, kwargs)
        flow_back_hparams_(self.optim.param_groups, self.param_groups, pushed)
        self._count_step()
        return loss

    def _step_lbfgs(self, closure: Callable[[], float] | None) -> float:
        if closure is None:
            raise ValueError(
                "LBFGS needs a closure that re-evaluates the model and returns the loss: "
                "opt.step(closure); see examples/lbfgs_fit.py"
            )
        self._settle()
        self._consolidated = None
        self._consolidated_to = None
        self._sync_hparams()
        copy_hparams_(self.param_groups, self.optim.param_groups)
        self._has_state = True
        loss = self.optim.step(closure)
        self._count_step()
        return loss

    def _count_step(self) -> None:
        """Count a step taken; every `verify_every` steps check the replicas (Collective then)."""
        self._has_state = True
        self._num_steps += 1
        if self.config.verify_every and self._num_steps % self.config.verify_every == 0:
            self.verify_replicas()

    if not TYPE_CHECKING:  # keeps mypy strict about the wrapper's own attributes

        def __getattr__(self, name: str) -> Any:
            """Forward public methods that only the base class defines (e.g. schedule-free's train/eval).

            `hasattr(opt, "train")` is True exactly when the base optimizer has `train`, as
            frameworks that call it (Trainer, Accelerate) expect.
            """
            optim = self.__dict__.get("optim")
            method = getattr(type(optim), name, None) if optim is not None and not name.startswith("_") else None
            if method is None or not callable(method) or hasattr(Optimizer, name):
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            return functools.partial(self._call_base_method, name)

    def _call_base_method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run the base optimizer's method `name` on this rank's shard, then gather the parameters.

        Collective: call on every rank of the group, in the same order (the parameters are
        gathered afterwards, since such methods may rewrite them, as schedule-free's
        train()/eval() swap the weights between their two sequences). Options the method writes
        into its param groups reach `opt.param_groups`.
        """
        self._settle()
        copy_hparams_(self.param_groups, self.optim.param_groups)
        before = snapshot_hparams(self.optim.param_groups)
        result = getattr(self.optim, name)(*args, **kwargs)
        flow_back_hparams_(self.optim.param_groups, self.param_groups, before)
        with torch.no_grad():
            self._masters.write_back_(range(len(self._buckets)))
            self._gather_all()
        self._consolidated = None
        self._consolidated_to = None
        return result

    def _gather_all(self) -> None:
        """All-gather every bucket so each rank holds the full parameters (Collective)."""
        gathers = _GatherQueue(self._comm, self._storage, self._params)
        for b, bucket in enumerate(self._buckets):
            gathers.add(b, bucket)
        gathers.finish()

    def _settle(self) -> None:
        """Bring parameters moved or written from outside since the last step back into the buckets."""
        changed = self._storage.settle_(self._params, prefix=self._comm.prefix)
        if changed:
            with torch.no_grad():
                self._masters.reread_(set(changed))

    def _warn_full_grads(self) -> None:
        if self._warned_full_grads or all(p.grad is None for p in self._params):
            return
        self._warned_full_grads = True
        warnings.warn(
            "stage=2: parameters carry a full .grad at step(), outside opt.no_sync(). The optimizer reduces "
            "gradients itself during backward and ignores .grad; a model wrapped in DistributedDataParallel "
            "reduces them a second time for nothing. Do not wrap a stage-2 model in DDP (and clip with "
            "opt.clip_grad_norm_, not torch.nn.utils.clip_grad_norm_, which sees no gradients at stage 2)",
            stacklevel=3,
        )

    def _check_grads(self) -> None:
        """Reject gradients flat sharding cannot slice, on every rank (grads are the same everywhere)."""
        if self._kind != "flat":
            return
        for index, param in enumerate(self._params):
            if param.grad is not None and param.grad.is_sparse:
                raise TypeError(
                    f"{self._comm.prefix}parameter {index} (shape {tuple(param.shape)}) has a sparse gradient, "
                    "which flat sharding cannot slice; use sharding='tensor' (e.g. with torch.optim.SparseAdam)"
                )

    def _attach_grads(self, active: list[bool], has_grad: list[bool] | None) -> list[bool]:
        """Point each local piece's .grad at its gradient; return per-bucket 'has work'."""
        work = [False] * len(self._buckets)
        for piece, grad in zip(self._pieces, self._grads.piece_grads(active, has_grad)):
            piece.local.grad = grad
            if grad is not None:
                work[piece.bucket] = True
        return work

    def _steps_per_bucket(self) -> bool:
        """Whether to call the base step once per bucket (to overlap each gather with the next update).

        Only for torch.optim's own classes, whose step has no per-call side effects beyond the
        per-parameter state, and only where gathers can overlap (NCCL, gloo broadcasts); never
        with compile=True (one compiled graph over every bucket, not one per bucket).
        """
        if self._update.compiles or type(self.optim) not in _TORCH_STEPWISE or len(self._buckets) < 2:
            return False
        return not self._comm.gathers_synchronously(self._buckets[0].segments.device)

    def _update_and_gather(self, has_grad: list[bool] | None, step_kwargs: dict[str, Any]) -> None:
        # NOTE: a bucket is gathered when any of its parameters requires grad now. requires_grad is
        # set by model code, the same on every rank, so every rank enters the same collectives;
        # buckets of frozen parameters cost no communication until they are unfrozen.
        active = [any(self._params[i].requires_grad for i in b.param_indices) for b in self._buckets]
        has_work = self._attach_grads(active, has_grad)
        per_bucket = self._steps_per_bucket()
        groups = self.optim.param_groups
        saved = [g["params"] for g in groups]
        gathers = _GatherQueue(self._comm, self._storage, self._params)
        try:
            if not per_bucket:
                # NOTE: also on a rank with no gradient to apply (or no tensor at all): the base step
                # then still writes its per-call group values (counters), as it does unsharded, so
                # every rank's param_groups keep the same keys.
                failure = self._local_step_(step_kwargs, [b for b, work in enumerate(has_work) if work])
                self._agree_on_step_(failure)
            for b, bucket in enumerate(self._buckets):
                if per_bucket and has_work[b]:
                    for group_index, group in enumerate(groups):
                        group["params"] = bucket.group_to_locals.get(group_index, [])
                    self._agree_on_step_(self._local_step_(step_kwargs, [b]))
                if active[b]:
                    gathers.add(b, bucket)
        finally:
            for group, plist in zip(groups, saved):
                group["params"] = plist
            for piece in self._pieces:
                piece.local.grad = None
        gathers.finish()

    def _local_step_(self, step_kwargs: dict[str, Any], buckets: list[int]) -> Exception | None:
        """Run the base optimizer's step over its current groups; keep and write back `buckets`' masters.

        Returns the failure of a third-party base step (for `_agree_on_step_`), else None.
        """
        _, failure = self._run_base_step(step_kwargs)
        if failure is not None:
            return failure
        with_masters = [b for b in buckets if self._masters.has(b)]
        for b in with_masters:
            self._keep_master_in_state(self._buckets[b])
        self._masters.write_back_(with_masters)
        return None

    def _sync_hparams(self, *, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Make the options identical on every rank: first across replicas (hybrid), then in the shard group.

        Returns the shard group's gathered `extra` (see HparamSyncer.sync_).
        Collective: call on every rank, in the same order.
        """
        if self._replica_hparams is not None:
            self._replica_hparams.sync_(self.param_groups)
        return self._hparams.sync_(self.param_groups, extra=extra)

    def _rank0_rng(self) -> contextlib.AbstractContextManager[Any]:
        """A context giving every rank the lead rank's random generator state (classes that draw).

        Collective when the class draws random numbers: call on every rank, in the same order.
        """
        if not self._uses_rng:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        devices = self._devices()
        if self._replicas is not None:  # the lead replica's state at this shard position, then rank 0's
            stack.enter_context(rank0_rng(self._replicas.comm, devices, src=self._replicas.lead))
        stack.enter_context(rank0_rng(self._comm, devices))
        return stack

    def _run_base_step(self, step_kwargs: dict[str, Any]) -> tuple[Any, Exception | None]:
        """Run the base step (under rank 0's random state when it draws); return (result, failure).

        torch.optim's own classes raise at once; a third-party class's exception is returned,
        labelled, for `_agree_on_step_`. Collective only for classes that draw random numbers.
        """
        failure: Exception | None = None
        result = None
        try:
            with self._rank0_rng():
                result = self._update.step(**step_kwargs)
        except Exception as err:
            if type(self.optim) in _TORCH_STEPWISE:
                raise
            failure = RuntimeError(
                f"{self._comm.prefix}{self._optimizer_class.__name__}.step() failed on this rank's part of param "
                f"groups 0-{len(self.param_groups) - 1}: {type(err).__name__}: {err}"
            )
            failure.__cause__ = err
        return result, failure

    def _agree_on_step_(self, failure: Exception | None) -> None:
        """Raise on every rank when a third-party base step failed on any rank.

        Collective for classes other than torch.optim's own (one small all-gather per step, so no
        rank is left waiting in the gather): call on every rank, in the same order.
        """
        if type(self.optim) in _TORCH_STEPWISE:
            return
        self._comm.raise_if_any_failed(failure, what=f"{self._optimizer_class.__name__}.step()")

    def _devices(self) -> list[torch.device]:
        return sorted({p.device for p in self._params}, key=str)

    def _step_replicated(self, closure: Callable[[], float] | None, kwargs: dict[str, Any]) -> Any:
        """Step the unsharded base optimizer on every rank (kind "replicated"; see shardoptim.replicated).

        Collective: call on every rank of the group, in the same order.
        """
        through = closure is not None and _takes_closure(self.optim)
        if through and self.config.skip_nonfinite:
            raise ValueError(
                f"skip_nonfinite=True needs the gradients before the step, but {self._optimizer_class.__name__} "
                "evaluates the closure inside its step; compute the loss and backward before opt.step() instead"
            )
        loss = None
        if closure is not None and not through:
            with torch.enable_grad():
                loss = closure()
        self._consolidated = None
        self._consolidated_to = None
        flags = self._grads.local_flags(check_nonfinite=self.config.skip_nonfinite)
        rank_to_flags = self._sync_hparams(extra=flags)
        copy_hparams_(self.param_groups, self.optim.param_groups)
        _, nonfinite = self._grads.merge_flags(rank_to_flags)
        self.last_step_skipped = nonfinite
        if nonfinite:
            self.num_skipped_steps += 1
            return loss
        if through:
            kwargs = {**kwargs, "closure": closure}
        pushed = snapshot_hparams(self.optim.param_groups)
        result, failure = self._run_base_step(kwargs)
        self._agree_on_step_(failure)
        flow_back_hparams_(self.optim.param_groups, self.param_groups, pushed)
        self._count_step()
        return result if through else loss

    def _keep_master_in_state(self, bucket: Bucket) -> None:
        """Expose each just-stepped master piece as state[MASTER_KEY], so checkpoints carry it.

        Only pieces that had a gradient: their state is initialised by now, so the extra key
        cannot make a lazily initialising optimizer skip its own initialisation.
        """
        for locals_ in bucket.group_to_locals.values():
            for local in locals_:
                if local.grad is not None:
                    self.optim.state[local].setdefault(MASTER_KEY, local)


#: torch.optim's own classes: their step has no per-call side effects beyond per-parameter state.
_TORCH_STEPWISE = TORCH_ELEMENTWISE


def _takes_closure(optim: Optimizer) -> bool:
    try:
        return "closure" in inspect.signature(optim.step).parameters
    except (TypeError, ValueError):
        return False


class _CachedLoss:
    """The closure handed to a base step: returns the loss the wrapper already computed, once.

    A base class that calls the closure more than once per step expects it to re-evaluate the
    model at new weights, which a cached loss cannot do: refuse instead of computing garbage.
    """

    def __init__(self, loss: Any) -> None:
        self._loss = loss
        self._calls = 0

    def __call__(self) -> Any:
        self._calls += 1
        if self._calls > 1:
            raise RuntimeError(
                "the base optimizer called the closure more than once in one step (it re-evaluates the model "
                "at perturbed weights, as SAM-like optimizers do), which ShardedOptimizer cannot do exactly: "
                "each rank holds only its shard of the update. Use this optimizer without ShardedOptimizer"
            )
        return self._loss


#: Own-storage mode: gathers through a scratch bucket that are synchronous (MPI) share a round
#: while their scratch buckets total under this many bytes (one large bucket goes alone, so its
#: scratch is the only one alive), and at most _SCRATCH_IN_FLIGHT asynchronous ones are in
#: flight: the whole buckets alive at once stay bounded whatever the model. Shared-memory gathers
#: need no scratch: they read and write the parameters in place.
_GATHER_BATCH_NBYTES = 4 << 20
_SCRATCH_IN_FLIGHT = 2


class _GatherQueue:
    """The gathers of one step, in bucket order: synchronous ones batched, the others in flight.

    Collective: every rank adds the same buckets in the same order, then calls `finish`.
    """

    def __init__(self, comm: Comm, storage: ParamStorage, params: list[torch.Tensor]) -> None:
        self._comm = comm
        self._storage = storage
        self._params = params
        self._batched: list[tuple[Bucket, torch.Tensor | None]] = []
        self._batched_nbytes = 0
        self._pending: deque[tuple[Bucket, torch.Tensor, PendingGather]] = deque()

    def add(self, b: int, bucket: Bucket) -> None:
        """Start gathering bucket `b` (after its local update)."""
        device = bucket.segments.device
        if self._comm.world_size == 1:
            self._storage.finish_gather_(bucket, None)
            return
        if self._comm.gathers_in_place(device):
            self._batched.append((bucket, None))  # one round for several; no scratch at all
            return
        bounded = bucket.buffer is None
        synchronous = self._comm.gathers_synchronously(device)
        nbytes = bucket.numel * bucket.segments.element_size()
        if synchronous and bounded and self._batched_nbytes + nbytes > _GATHER_BATCH_NBYTES:
            self._flush()  # before taking this bucket's scratch: the previous ones go back first
        whole = self._storage.gather_target(bucket, self._comm.rank)
        if synchronous:
            self._batched.append((bucket, whole))  # no overlap to gain: one round for several
            self._batched_nbytes += nbytes
        else:
            handle = self._comm.gather_bucket_async(whole, bucket.bounds, what=f"parameter gather (bucket {b})")
            self._pending.append((bucket, whole, handle))
            if bounded and len(self._pending) > _SCRATCH_IN_FLIGHT:
                self._finish_oldest()

    def finish(self) -> None:
        """Wait for every gather and copy the values out into the parameters (own storage)."""
        self._flush()
        while self._pending:
            self._finish_oldest()
        self._storage.in_step_(self._params)

    def _flush(self) -> None:
        if not self._batched:
            return
        self._comm.gather_buckets_(
            [(bucket.segments if whole is None else whole, bucket.bounds) for bucket, whole in self._batched],
            what="parameter gather",
        )
        for bucket, whole in self._batched:
            self._storage.finish_gather_(bucket, whole)
        self._batched.clear()
        self._batched_nbytes = 0

    def _finish_oldest(self) -> None:
        bucket, whole, handle = self._pending.popleft()
        handle.wait()
        self._storage.finish_gather_(bucket, whole)
