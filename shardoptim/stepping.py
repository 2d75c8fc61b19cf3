"""The skeleton of a ShardedOptimizer step, shared by every sharding kind.

Every step, whatever the kind, does the same bookkeeping in the same order: evaluate the closure,
drop the consolidated state, agree on the hyperparameters and the step flags (one collective),
skip the step on an inf/nan, copy the options into the local optimizer, run the kind's update,
carry back the options the base step wrote, count the step and verify every `verify_every`
steps. `StepSkeleton.step` is that order, written once; a strategy per kind (shardoptim.
step_sharded, step_replicated, step_lbfgs) supplies what differs: `prepare` (before the
agreement) and `update`. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

from shardoptim.compiled import CompiledUpdate
from shardoptim.gather_queue import gather_all
from shardoptim.grads import GradReducer
from shardoptim.hparams import HparamSyncer, copy_hparams_, flow_back_hparams_, snapshot_hparams
from shardoptim.kinds import TORCH_ELEMENTWISE
from shardoptim.owned_grads import OwnedGrads
from shardoptim.placement import Placement
from shardoptim.replicated import rank0_rng

logger = logging.getLogger("shardoptim.optimizer")


@dataclass
class StepRecord:
    """What the steps so far did: counted, skipped for an inf/nan, and whether the last one was."""

    num_steps: int = 0
    num_skipped_steps: int = 0
    last_step_skipped: bool = False


@dataclass
class StepContext:
    """Everything a step strategy works on, handed in whole by the optimizer.

    `groups()` returns the wrapper's param groups (the source of truth for options), `optim` the local base
    optimizer over this rank's pieces; `verify` checks the replicas (Collective).
    """

    placement: Placement
    optim: Optimizer
    groups: Callable[[], list[dict[str, Any]]]
    hparams: HparamSyncer
    replica_hparams: HparamSyncer | None
    grads: OwnedGrads
    reducer: GradReducer | None
    uses_rng: bool
    verify: Callable[[], None]
    update: CompiledUpdate
    """Runs the base step over this rank's slice: compiled (compile=...) or eagerly."""


class StepSkeleton:
    """One kind's step: the shared order in `step`, the kind's own work in `prepare` and `update`."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.placement = ctx.placement
        self.optim = ctx.optim
        self.record = StepRecord()

    # --------------------------------------------------------------------------- the order

    def step(self, closure: Callable[[], float] | None, kwargs: dict[str, Any]) -> Any:
        """Run one step (see the module docstring); return what the kind's `update` returns.

        Collective: call on every rank of the group, in the same order.
        """
        loss = self.prepare(closure, kwargs)
        self.placement.invalidate()
        flags = self.local_flags()
        rank_to_flags = self.sync_hparams(extra=flags)
        copy_hparams_(self.ctx.groups(), self.optim.param_groups)
        has_grad, nonfinite = self.ctx.grads.merge_flags(rank_to_flags)
        self.record.last_step_skipped = nonfinite
        if nonfinite:
            self.record.num_skipped_steps += 1
            if self.placement.comm.rank == 0:
                logger.warning(
                    "step %d skipped: a gradient holds an inf or nan (%d steps skipped so far)",
                    self.record.num_steps,
                    self.record.num_skipped_steps,
                )
            return loss
        pushed = snapshot_hparams(self.optim.param_groups)
        result = self.update(closure, loss, has_grad, kwargs)
        flow_back_hparams_(self.optim.param_groups, self.ctx.groups(), pushed)
        self.count_step()
        return result

    def prepare(self, closure: Callable[[], float] | None, kwargs: dict[str, Any]) -> Any:
        """Work before the agreement (the closure, settling parameters, gradients); return the loss."""
        raise NotImplementedError

    def local_flags(self) -> torch.Tensor | None:
        """This rank's step flags (see OwnedGrads.local_flags), or None when nothing needs agreeing."""
        return self.ctx.grads.local_flags(check_nonfinite=self.placement.config.skip_nonfinite)

    def update(
        self, closure: Callable[[], float] | None, loss: Any, has_grad: list[bool] | None, kwargs: dict[str, Any]
    ) -> Any:
        """The kind's update once options and flags agree; return what `step` returns."""
        raise NotImplementedError

    def count_step(self) -> None:
        """Count a step taken; every `verify_every` steps check the replicas (Collective then)."""
        self.placement.mark_stepped()
        self.record.num_steps += 1
        every = self.placement.config.verify_every
        if every and self.record.num_steps % every == 0:
            self.ctx.verify()

    # --------------------------------------------------------------------------- shared parts

    def sync_hparams(self, *, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Make the options identical on every rank: first across replicas (hybrid), then in the shard group.

        Returns the shard group's gathered `extra` (see HparamSyncer.sync_).
        Collective: call on every rank, in the same order.
        """
        if self.ctx.replica_hparams is not None:
            self.ctx.replica_hparams.sync_(self.ctx.groups())
        return self.ctx.hparams.sync_(self.ctx.groups(), extra=extra)

    def run_base_step(self, step_kwargs: dict[str, Any]) -> tuple[Any, Exception | None]:
        """Run the base step (under rank 0's random state when it draws); return (result, failure).

        torch.optim's own classes raise at once; a third-party class's exception is returned,
        labelled, for `agree_on_step`. Collective only for classes that draw random numbers.
        """
        failure: Exception | None = None
        result = None
        try:
            with self._rank0_rng():
                result = self.ctx.update.step(**step_kwargs)
        except Exception as err:
            if type(self.optim) in TORCH_ELEMENTWISE:
                raise
            groups = len(self.ctx.groups())
            failure = RuntimeError(
                f"{self.placement.comm.prefix}{self.placement.optimizer_class.__name__}.step() failed on this rank's "
                f"part of param groups 0-{groups - 1}: {type(err).__name__}: {err}"
            )
            failure.__cause__ = err
        return result, failure

    def agree_on_step(self, failure: Exception | None) -> None:
        """Raise on every rank when a third-party base step failed on any rank.

        Collective for classes other than torch.optim's own (one small all-reduce on the CPU per
        step, so no rank is left waiting in the gather): call on every rank, in the same order.
        """
        if type(self.optim) in TORCH_ELEMENTWISE:
            return
        self.placement.meta.raise_if_any_failed(failure, what=f"{self.placement.optimizer_class.__name__}.step()")

    def call_base_method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run the base optimizer's method `name` on this rank's shard, then gather the parameters.

        Collective: call on every rank of the group, in the same order (the parameters are
        gathered afterwards, since such methods may rewrite them, as schedule-free's
        train()/eval() swap the weights between their two sequences). Options the method writes
        into its param groups reach the wrapper's param groups.
        """
        self.placement.settle_()
        copy_hparams_(self.ctx.groups(), self.optim.param_groups)
        before = snapshot_hparams(self.optim.param_groups)
        result = getattr(self.optim, name)(*args, **kwargs)
        flow_back_hparams_(self.optim.param_groups, self.ctx.groups(), before)
        with torch.no_grad():
            self.placement.masters.write_back_(range(len(self.placement.buckets)))
            gather_all(self.placement)
        self.placement.invalidate()
        return result

    def base_method(self, name: str) -> Callable[..., Any] | None:
        """Return the base class's public method `name`, to run through `call_base_method`, or None.

        None unless the base optimizer's class has a callable `name` that torch.optim.Optimizer
        itself does not define (e.g. schedule-free's train/eval): what ShardedOptimizer forwards.
        """
        method = getattr(type(self.optim), name, None) if not name.startswith("_") else None
        if method is None or not callable(method) or hasattr(Optimizer, name):
            return None
        return functools.partial(self.call_base_method, name)

    def _rank0_rng(self) -> contextlib.AbstractContextManager[Any]:
        """A context giving every rank the lead rank's random generator state (classes that draw).

        Collective when the class draws random numbers: call on every rank, in the same order.
        """
        if not self.ctx.uses_rng:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        devices = self.placement.devices()
        replicas = self.placement.replicas
        if replicas is not None and self.ctx.replica_hparams is not None:
            # the lead replica's state at this shard position, then rank 0's
            stack.enter_context(rank0_rng(self.ctx.replica_hparams.comm, devices, src=replicas.lead))
        stack.enter_context(rank0_rng(self.placement.meta, devices))
        return stack


def takes_closure(optim: Optimizer) -> bool:
    """Whether `optim.step` accepts a closure."""
    try:
        return "closure" in inspect.signature(optim.step).parameters
    except (TypeError, ValueError):
        return False


def run_closure(closure: Callable[[], float]) -> Any:
    """Evaluate the user's closure with grad enabled (the step itself runs under no_grad)."""
    with torch.enable_grad():
        return closure()


class CachedLoss:
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
