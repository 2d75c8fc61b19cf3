"""The gradients this rank owns, at stage 1 (slices of `.grad`) or stage 2 (reduced shards).

Answers what the step, clipping and loss scaling need: each local piece's gradient, the owned
elements (disjoint across ranks), the tensors a global rescale must touch, and the per-step
agreement on which parameters got gradients and whether any is inf/nan; and holds back the
stage-2 reduction inside `no_sync`.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from shardoptim import gradnorm
from shardoptim.buffers import MemoryPerm, from_flat, memory_perm, to_flat
from shardoptim.comm import Comm
from shardoptim.grads import GradReducer
from shardoptim.pieces import Piece

if TYPE_CHECKING:
    from shardoptim.placement import Placement


class OwnedGrads:
    """Views of this rank's gradients over the optimizer's parameters and pieces.

    Args:
        comm: the shard group.
        placement: the optimizer's placed state: its parameters, this rank's pieces, and the
            pieces whose gradients count toward norms and inf/nan checks (`norm_pieces`).
        reducer: the stage-2 gradient reducer, or None at stage 1.
        whole_tensors: pieces are whole parameters (tensor sharding), shaped like them.
    """

    def __init__(
        self,
        comm: Comm,
        placement: Placement,
        reducer: GradReducer | None,
        *,
        whole_tensors: bool,
    ) -> None:
        self._comm = comm
        self._placement = placement
        self._reducer = reducer
        self._whole_tensors = whole_tensors
        # NOTE: per piece, planned once (see _plan_piece); rebuilt when the number of pieces changed
        # (add_param_group, or its rollback).
        self._plan: list[tuple[int, bool, bool, bool, MemoryPerm]] = []

    def piece_grads(
        self, active: Sequence[bool], has_grad: Sequence[bool] | None, positions: Sequence[int] | None = None
    ) -> list[torch.Tensor | None]:
        """Return the gradient of each local piece, or of those at `positions` (None: its parameter
        has none, or its bucket is inactive).

        Stage 2: its part of the reduced shard. Stage 1: its part of `.grad` in the parameter's
        dtype and memory order, with the per-piece decisions planned once: the piece of a whole 1-D
        parameter gets `.grad` itself, of a whole n-D one its flat view.
        """
        pieces = self._placement.pieces
        chosen = range(len(pieces)) if positions is None else positions
        if self._reducer is not None:
            return [self._shard_grad(pieces[i], has_grad) if active[pieces[i].bucket] else None for i in chosen]
        if len(self._plan) != len(pieces):
            self._plan = [self._plan_piece(p) for p in pieces]
        out: list[torch.Tensor | None] = []
        for i in chosen:
            piece = pieces[i]
            index, as_is, whole, cast, perm = self._plan[i]
            grad = self._placement.params[index].grad if active[piece.bucket] else None
            if grad is not None and not as_is:
                # NOTE: in the parameter's memory order, as its flat range (see buffers.memory_perm).
                grad = to_flat(grad, perm)
                if not whole:
                    grad = grad.narrow(0, piece.in_param.start, piece.in_param.numel)
            if grad is not None and cast:
                grad = grad.to(piece.local.dtype)
            out.append(grad)
        return out

    def _plan_piece(self, piece: Piece) -> tuple[int, bool, bool, bool, MemoryPerm]:
        """Return (param index, .grad serves as it is, whole parameter, needs a cast, memory order)."""
        param = self._placement.params[piece.index]
        whole = piece.in_param.start == 0 and piece.in_param.numel == param.numel()
        perm = memory_perm(param)
        # A whole 1-D parameter's gradient already is its flat range (no reshape: ~1 us per tensor).
        as_is = self._whole_tensors or (whole and param.dim() == 1)
        return piece.index, as_is, whole, piece.local.dtype != param.dtype, perm

    def flush_(self) -> None:
        """Reduce what no_sync() left in `.grad` (stage 2). Collective: call on every rank."""
        if self._reducer is not None:
            self._reducer.flush_()

    def _shard_grad(self, piece: Piece, has_grad: Sequence[bool] | None) -> torch.Tensor | None:
        """Return the stage-2 gradient of one local piece: its part of the reduced shard (None: none)."""
        assert self._reducer is not None and has_grad is not None
        shard = self._reducer.shard(piece.bucket)
        if not has_grad[piece.index] or shard is None:
            return None
        owned = shard.narrow(0, piece.start_local, piece.in_param.numel)
        if not self._whole_tensors:
            return owned
        return from_flat(owned, piece.local.shape, memory_perm(self._placement.params[piece.index]))

    def owned(self) -> list[torch.Tensor]:
        """Return this rank's gradient pieces (disjoint across ranks, all of them together)."""
        self.flush_()
        out = []
        for piece in self._placement.norm_pieces:
            if self._reducer is not None:
                shard = self._reducer.shard(piece.bucket)
                grad = None if shard is None else shard.narrow(0, piece.start_local, piece.in_param.numel)
            else:
                full = self._placement.params[piece.index].grad
                perm = memory_perm(self._placement.params[piece.index])
                grad = None if full is None or full.is_sparse else to_flat(full, perm)
                grad = None if grad is None else grad.narrow(0, piece.in_param.start, piece.in_param.numel)
            if grad is not None:
                out.append(grad)
        return out

    def rescalable(self) -> list[torch.Tensor]:
        """Return what a global rescale must touch: the shards, or every `.grad` at stage 1."""
        self.flush_()
        if self._reducer is not None:
            return self._reducer.shards()
        return [p.grad for p in self._placement.params if p.grad is not None]

    def clip_(self, max_norm: float, norm_type: float, *, error_if_nonfinite: bool) -> torch.Tensor:
        """Clip by the global norm; return the norm before clipping (see ShardedOptimizer.clip_grad_norm_).

        Collective: call on every rank of the group, in the same order.
        """
        norm_type = gradnorm.check_norm_type(norm_type)
        total = gradnorm.total_norm(self._comm, self.owned(), norm_type, device=self._placement.params[0].device)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"{self._comm.prefix}the total norm of order {norm_type} of the gradients is {total.item()}; "
                "pass error_if_nonfinite=False to clip anyway, or find the inf/nan (skip_nonfinite=True skips "
                "such steps)"
            )
        gradnorm.scale_(self.rescalable(), gradnorm.clip_coef(total, max_norm))
        return total

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Return the context in which backward accumulates gradients without communicating (stage 2).

        See ShardedOptimizer.no_sync. At stage 1, where DDP reduces the gradients, it warns and
        returns a context that does nothing.
        """
        if self._reducer is None:
            warnings.warn(
                "opt.no_sync() has no effect at stage=1, where DDP reduces the gradients; use "
                "ddp_model.no_sync() (or build the optimizer with stage=2)",
                stacklevel=3,  # NOTE: the user's call of ShardedOptimizer.no_sync, which calls this
            )
            return contextlib.nullcontext()
        return self._reducer.no_sync()

    def zero_shards_(self, *, set_to_none: bool) -> None:
        """Drop (or zero) the stage-2 gradient shards, as `Optimizer.zero_grad` does `.grad` (stage 1: nothing)."""
        if self._reducer is not None:
            self._reducer.zero_(set_to_none=set_to_none)

    def unscale_(
        self, inv_scale: torch.Tensor, found_inf: torch.Tensor, *, allow_fp16: bool
    ) -> dict[torch.device, torch.Tensor]:
        """Unscale and flag inf/nan on every rank, as GradScaler's `_unscale_grads_` does.

        Collective: call on every rank of the group, in the same order.
        """
        grads = self.rescalable()
        if not allow_fp16 and any(g.dtype == torch.float16 for g in grads):
            raise ValueError(
                "Attempting to unscale FP16 gradients: keep fp16 parameters with master_dtype=torch.float32 "
                "and stage=2 (fp32 gradient shards), as torch.amp.GradScaler requires fp32 gradients"
            )
        with torch.no_grad():
            gradnorm.unscale_and_check_(self._comm, grads, inv_scale, found_inf)
        return {found_inf.device: found_inf}

    def local_flags(self, *, check_nonfinite: bool) -> torch.Tensor | None:
        """Return this rank's step flags: per parameter "a gradient arrived" (stage 2), then inf/nan.

        None when nothing needs agreeing (stage 1 without the inf/nan check). Merge every rank's
        flags with `merge_flags`.
        """
        if self._reducer is None and not check_nonfinite:
            return None
        flags = list(self._reducer.has_grad) if self._reducer is not None else []
        nonfinite = None
        if check_nonfinite:
            tensors = self._reducer.shards() if self._reducer is not None else self.owned()
            nonfinite = gradnorm.local_nonfinite(tensors)  # on the gradients' device: no host read here
        if nonfinite is None:
            return torch.tensor(flags + [0.0], dtype=torch.float64)
        return torch.cat([torch.tensor(flags, dtype=torch.float64).to(nonfinite.device), nonfinite])

    def merge_flags(self, rank_to_flags: torch.Tensor | None) -> tuple[list[bool] | None, bool]:
        """Return (parameters with a gradient on any rank or None at stage 1, inf/nan on any rank)."""
        if rank_to_flags is None:
            return None, False
        merged = [bool(v) for v in rank_to_flags.amax(dim=0).tolist()]
        return (merged[:-1] if self._reducer is not None else None), merged[-1]
