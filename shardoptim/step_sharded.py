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
        # NOTE: planned per number of pieces (add_param_group, or its rollback, changes it): the
        # positions of the pieces that are views (their .grad is attached and cleared every step),
        # and the (parameter, bucket) of those that are parameters themselves (nothing to attach).
        self._planned_for = -1
        self._view_positions: list[int] = []
        self._param_pieces: list[tuple[torch.Tensor, int]] = []

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
        # NOTE: a compiled update gets no closure (the loss is computed already; see shardoptim.compiled).
        if closure is not None and takes_closure(self.optim) and not self.ctx.update.compiles:
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
        grads = [p.grad for p in self.placement.params]
        if not any(g is not None and g.is_sparse for g in grads):  # one quick pass; the loop names the first
            return
        for index, param in enumerate(self.placement.params):
            if param.grad is not None and param.grad.is_sparse:
                raise TypeError(
                    f"{self.placement.comm.prefix}parameter {index} (shape {tuple(param.shape)}) has a sparse "
                    "gradient, which flat sharding cannot slice; use sharding='tensor' (e.g. with "
                    "torch.optim.SparseAdam)"
                )

    def _plan(self) -> None:
        pieces = self.placement.pieces
        if self._planned_for == len(pieces):
            return
        self._view_positions = [i for i, piece in enumerate(pieces) if not piece.is_param]
        self._param_pieces = [(piece.local, piece.bucket) for piece in pieces if piece.is_param]
        self._planned_for = len(pieces)

    def attach_grads(
        self, active: list[bool], has_grad: list[bool] | None, hidden: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[bool]:
        """Point each view piece's .grad at its gradient; return per-bucket 'has work'.

        A parameter updated as itself keeps its `.grad`, except in an inactive bucket (none of its
        parameters requires grad now: it is not gathered), where the gradient is moved to `hidden`
        for the step (restore it with `restore_hidden`), as the bucket's views get none.
        """
        self._plan()
        work = [False] * len(self.placement.buckets)
        positions = self._view_positions
        pieces = self.placement.pieces
        for i, grad in zip(positions, self.ctx.grads.piece_grads(active, has_grad, positions)):
            piece = pieces[i]
            piece.local.grad = grad
            if grad is not None:
                work[piece.bucket] = True
        for param, b in self._param_pieces:
            grad = param.grad
            if grad is None:
                continue
            if active[b]:
                work[b] = True
            else:
                hidden.append((param, grad))
                param.grad = None
        return work

    def clear_grads(self, hidden: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Undo `attach_grads`: the views' .grad back to None, the hidden gradients back in place."""
        pieces = self.placement.pieces
        for i in self._view_positions:
            pieces[i].local.grad = None
        for param, grad in hidden:
            param.grad = grad

    def _steps_per_bucket(self) -> bool:
        """Whether to call the base step once per bucket (to overlap each gather with the next update).

        Only for torch.optim's own classes, whose step has no per-call side effects beyond the
        per-parameter state, and only where gathers can overlap (NCCL, gloo broadcasts); never
        with compile=True (one compiled graph over every bucket, not one per bucket).
        """
        buckets = self.placement.buckets
        if self.ctx.update.compiles or type(self.optim) not in TORCH_ELEMENTWISE or len(buckets) < 2:
            return False
        return not self.placement.comm.gathers_synchronously(buckets[0].segments.device)

    def _update_and_gather(self, has_grad: list[bool] | None, step_kwargs: dict[str, Any]) -> None:
        placement = self.placement
        # NOTE: a bucket is gathered when any of its parameters requires grad now. requires_grad is
        # set by model code, the same on every rank, so every rank enters the same collectives;
        # buckets of frozen parameters cost no communication until they are unfrozen.
        active = [any(placement.params[i].requires_grad for i in b.param_indices) for b in placement.buckets]
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        has_work = self.attach_grads(active, has_grad, hidden)
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
            self.clear_grads(hidden)
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
