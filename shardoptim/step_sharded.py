"""The step of the sharded kinds ("flat" and "tensor"): update this rank's pieces, gather the buckets.

Before the agreement: the closure, settling moved parameters, rejecting sparse gradients the flat
layout cannot slice, and at stage 2 flushing the gradient reduction. The update points each
local piece's `.grad` at its gradient, runs the base step (once, or once per bucket for
torch.optim's own classes where gathers overlap), keeps and writes back master copies, and
gathers every active bucket. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from shardoptim.gather_queue import GatherQueue
from shardoptim.kinds import TORCH_ELEMENTWISE
from shardoptim.master import MASTER_KEY
from shardoptim.pieces import Bucket
from shardoptim.stepping import CachedLoss, StepContext, StepSkeleton, run_closure, takes_closure


class ShardedStep(StepSkeleton):
    """The step of flat and whole-tensor sharding (see the module docstring)."""

    def __init__(self, ctx: StepContext) -> None:
        super().__init__(ctx)
        self._warned_full_grads = False

    def prepare(self, closure: Callable[[], float] | None, kwargs: dict[str, Any]) -> Any:
        loss = None if closure is None else run_closure(closure)
        self.placement.settle_()
        self._check_grads()
        reducer = self.ctx.reducer
        if reducer is not None:
            reducer.hook_trainable_()
            reducer.flush_()
            self._warn_full_grads()
        return loss

    def update(
        self, closure: Callable[[], float] | None, loss: Any, has_grad: list[bool] | None, kwargs: dict[str, Any]
    ) -> Any:
        if closure is not None and takes_closure(self.optim):
            kwargs = {**kwargs, "closure": CachedLoss(loss)}
        with torch.no_grad():
            self._update_and_gather(has_grad, kwargs)
        return loss

    def _warn_full_grads(self) -> None:
        if self._warned_full_grads or all(p.grad is None for p in self.placement.params):
            return
        self._warned_full_grads = True
        warnings.warn(
            "stage=2: parameters carry a full .grad at step(), outside opt.no_sync(). The optimizer reduces "
            "gradients itself during backward and ignores .grad; a model wrapped in DistributedDataParallel "
            "reduces them a second time for nothing. Do not wrap a stage-2 model in DDP (and clip with "
            "opt.clip_grad_norm_, not torch.nn.utils.clip_grad_norm_, which sees no gradients at stage 2)",
            stacklevel=4,
        )

    def _check_grads(self) -> None:
        """Reject gradients flat sharding cannot slice, on every rank (grads are the same everywhere)."""
        if self.placement.kind != "flat":
            return
        for index, param in enumerate(self.placement.params):
            if param.grad is not None and param.grad.is_sparse:
                raise TypeError(
                    f"{self.placement.comm.prefix}parameter {index} (shape {tuple(param.shape)}) has a sparse "
                    "gradient, which flat sharding cannot slice; use sharding='tensor' (e.g. with "
                    "torch.optim.SparseAdam)"
                )

    def attach_grads(self, active: list[bool], has_grad: list[bool] | None) -> list[bool]:
        """Point each local piece's .grad at its gradient; return per-bucket 'has work'."""
        work = [False] * len(self.placement.buckets)
        for piece, grad in zip(self.placement.pieces, self.ctx.grads.piece_grads(active, has_grad)):
            piece.local.grad = grad
            if grad is not None:
                work[piece.bucket] = True
        return work

    def _steps_per_bucket(self) -> bool:
        """Whether to call the base step once per bucket (to overlap each gather with the next update).

        Only for torch.optim's own classes, whose step has no per-call side effects beyond the
        per-parameter state, and only where gathers can overlap (NCCL, gloo broadcasts).
        """
        buckets = self.placement.buckets
        if type(self.optim) not in TORCH_ELEMENTWISE or len(buckets) < 2:
            return False
        return not self.placement.comm.gathers_synchronously(buckets[0].segments.device)

    def _update_and_gather(self, has_grad: list[bool] | None, step_kwargs: dict[str, Any]) -> None:
        placement = self.placement
        # NOTE: a bucket is gathered when any of its parameters requires grad now. requires_grad is
        # set by model code, the same on every rank, so every rank enters the same collectives;
        # buckets of frozen parameters cost no communication until they are unfrozen.
        active = [any(placement.params[i].requires_grad for i in b.param_indices) for b in placement.buckets]
        has_work = self.attach_grads(active, has_grad)
        per_bucket = self._steps_per_bucket()
        groups = self.optim.param_groups
        saved = [g["params"] for g in groups]
        gathers = GatherQueue(placement.comm, placement.storage, placement.params)
        try:
            if not per_bucket:
                # NOTE: also on a rank with no gradient to apply (or no tensor at all): the base step
                # then still writes its per-call group values (counters), as it does unsharded, so
                # every rank's param_groups keep the same keys.
                failure = self._local_step(step_kwargs, [b for b, work in enumerate(has_work) if work])
                self.agree_on_step(failure)
            for b, bucket in enumerate(placement.buckets):
                if per_bucket and has_work[b]:
                    for group_index, group in enumerate(groups):
                        group["params"] = bucket.group_to_locals.get(group_index, [])
                    self.agree_on_step(self._local_step(step_kwargs, [b]))
                if active[b]:
                    gathers.add(b, bucket)
        finally:
            for group, plist in zip(groups, saved):
                group["params"] = plist
            for piece in placement.pieces:
                piece.local.grad = None
        gathers.finish()

    def _local_step(self, step_kwargs: dict[str, Any], buckets: list[int]) -> Exception | None:
        """Run the base optimizer's step over its current groups; keep and write back `buckets`' masters.

        Returns the failure of a third-party base step (for `agree_on_step`), else None.
        """
        _, failure = self.run_base_step(step_kwargs)
        if failure is not None:
            return failure
        masters = self.placement.masters
        with_masters = [b for b in buckets if masters.has(b)]
        for b in with_masters:
            self._keep_master_in_state(self.placement.buckets[b])
        masters.write_back_(with_masters)
        return None

    def _keep_master_in_state(self, bucket: Bucket) -> None:
        """Expose each just-stepped master piece as state[MASTER_KEY], so checkpoints carry it.

        Only pieces that had a gradient: their state is initialised by now, so the extra key
        cannot make a lazily initialising optimizer skip its own initialisation.
        """
        for locals_ in bucket.group_to_locals.values():
            for local in locals_:
                if local.grad is not None:
                    self.optim.state[local].setdefault(MASTER_KEY, local)
