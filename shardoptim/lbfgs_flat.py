"""This rank's flat pieces of L-BFGS's vectors, and the global reductions over them.

ShardedLBFGS keeps only this rank's elements of every flat vector (gradient, direction, history).
`FlatPieces` turns the owner's local parameter and gradient views into those flat vectors, writes
steps back into the views (and all-gathers the parameters), and reduces this rank's partial
values (sums, maxima, dot products, the closure's loss) over the shard group so that every rank
takes the same decisions. The algorithm itself is in shardoptim.lbfgs.

Must not import shardoptim.optimizer at run time: the owner hands in a `ShardAccess`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from typing import Protocol

import torch
from torch import Tensor

from shardoptim.comm import Comm

__all__ = ["FLAT_DTYPES", "FlatPieces", "ShardAccess", "max_abs"]

#: Real dtypes a flat vector may have; each rank sends one presence flag per entry, once.
FLAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ShardAccess(Protocol):
    """What ShardedLBFGS needs from its owner (ShardedOptimizer provides it)."""

    @property
    def comm(self) -> Comm: ...

    def local_params(self) -> list[Tensor]:
        """Return this rank's 1-D views of the parameters, in a fixed order (writes update the model)."""
        ...

    def local_grads(self) -> list[Tensor]:
        """Return the 1-D gradient slices matching `local_params()` (zeros where a grad is None)."""
        ...

    def gather_params(self) -> None:
        """Make every rank's full parameters equal to the owners' pieces (Collective)."""
        ...


def max_abs(v: Tensor) -> Tensor:
    """Return max(|v|) as a 0-dim tensor; 0 for an empty piece (a rank that owns nothing)."""
    return v.abs().max() if v.numel() else v.new_zeros(())


class FlatPieces:
    """This rank's pieces as flat vectors, and the reductions that make their scalars global.

    Partial sums travel in float64; each result becomes a 0-dim tensor of the flat dtype wherever
    torch.optim.LBFGS has one, so at world size 1 the values are bitwise torch's.

    Args:
        shard: the owner's pieces, gradients, parameter gather and process group.
        device: where this rank's flat vectors live (its pieces' device).
    """

    def __init__(self, shard: ShardAccess, device: torch.device) -> None:
        self._shard = shard
        self._comm = shard.comm
        self.device = device
        """Where this rank's flat vectors live."""
        self._dtype: torch.dtype | None = None
        self.num_reductions = 0
        """All-reduces issued so far (one per batch of scalars)."""
        self.num_gathers = 0
        """Parameter all-gathers issued so far (one per trial point, plus one per accepted step)."""

    # ------------------------------------------------------------------------------- flat vectors

    def flat_dtype(self) -> torch.dtype:
        """Return the dtype of every flat vector: the promotion of all ranks' parameter dtypes.

        torch.cat promotes LBFGS's flat gradient the same way on one process. Collective (once).
        """
        if self._dtype is None:
            present = [0.0] * len(FLAT_DTYPES)
            for p in self._shard.local_params():
                real = torch.view_as_real(p).dtype if p.is_complex() else p.dtype
                if real not in FLAT_DTYPES:
                    raise TypeError(
                        f"{self._comm.prefix}LBFGS needs floating-point parameters, got {p.dtype}; "
                        f"use one of {[str(d) for d in FLAT_DTYPES]}"
                    )
                present[FLAT_DTYPES.index(real)] = 1.0
            counts, _ = self.reduce(present, [], what="LBFGS parameter dtypes")
            used = [dtype for dtype, count in zip(FLAT_DTYPES, counts) if count > 0]
            self._dtype = reduce(torch.promote_types, used) if used else torch.get_default_dtype()
        return self._dtype

    def flat_grad(self) -> Tensor:
        """Return this rank's gradient slices as one flat vector of the flat dtype (complex as real)."""
        views = []
        for g in self._shard.local_grads():
            views.append(torch.view_as_real(g).view(-1) if g.is_complex() else g.view(-1))
        dtype = self.flat_dtype()
        if not views:
            return torch.zeros(0, dtype=dtype, device=self.device)
        return torch.cat([v.to(dtype) for v in views], 0)

    def add_(self, step_size: Tensor | float, update: Tensor) -> None:
        """Add step_size * update to this rank's pieces, then all-gather the parameters (Collective)."""
        offset = 0
        for p in self._shard.local_params():
            if p.is_complex():
                p = torch.view_as_real(p)
            numel = p.numel()
            p.add_(update[offset : offset + numel].view_as(p), alpha=float(step_size))
            offset += numel
        assert offset == update.numel(), (offset, update.numel())
        self._shard.gather_params()
        self.num_gathers += 1

    def clone_params(self) -> list[Tensor]:
        """Return contiguous copies of this rank's pieces."""
        return [p.clone(memory_format=torch.contiguous_format) for p in self._shard.local_params()]

    def set_params_(self, params_data: Sequence[Tensor]) -> None:
        """Copy `params_data` (from `clone_params`) into this rank's pieces; no gather."""
        for p, pdata in zip(self._shard.local_params(), params_data, strict=True):
            p.copy_(pdata)

    # ------------------------------------------------------------------------------- reductions

    def reduce(
        self, sums: Sequence[Tensor | float], maxes: Sequence[Tensor | float], *, what: str
    ) -> tuple[list[float], list[float]]:
        """Return the global sums and maxima of this rank's partial values, in one all-reduce.

        Collective: call on every rank of the group, in the same order; same result on every rank.
        Values travel as float64. Maxima propagate nan like torch's `.max()`.
        """
        num_sums, num_maxes = len(sums), len(maxes)
        world_size, rank = self._comm.world_size, self._comm.rank
        device = self._comm.device
        local = torch.cat(
            [
                v.detach().to(device=device, dtype=torch.float64).reshape(1)
                if isinstance(v, Tensor)
                else torch.tensor([v], dtype=torch.float64, device=device)
                for v in (*sums, *maxes)
            ]
        )
        # NOTE: one collective for both kinds: each rank writes its maxima into its own slots of a
        # summed vector (x + 0 is exact) and every rank takes the max locally. A MAX all-reduce
        # would cost a second collective and does not propagate nan reliably (gloo uses std::max).
        packed = local.new_zeros(num_sums + world_size * num_maxes)
        packed[:num_sums] = local[:num_sums]
        packed[num_sums + rank * num_maxes : num_sums + (rank + 1) * num_maxes] = local[num_sums:]
        self._comm.all_reduce_(packed, op="sum", what=what)
        self.num_reductions += 1
        out_sums: list[float] = packed[:num_sums].tolist()
        out_maxes: list[float] = (
            packed[num_sums:].view(world_size, num_maxes).amax(dim=0).tolist() if num_maxes else []
        )
        return out_sums, out_maxes

    def scalar(self, value: float) -> Tensor:
        """Return a reduced value as the 0-dim tensor torch would hold (flat dtype, on the CPU)."""
        return torch.tensor(value, dtype=self.flat_dtype())

    def dot(self, a: Tensor, b: Tensor, *, what: str) -> Tensor:
        """Return the global dot product of two flat vectors (Collective)."""
        return self.scalar(self.reduce([a.dot(b)], [], what=what)[0][0])

    def reduce_eval(
        self, loss: float, flat_grad: Tensor, sums: Sequence[Tensor], *, what: str
    ) -> tuple[float, Tensor, list[Tensor]]:
        """Reduce a closure's loss and max|grad| with `sums`; return (loss, max|grad|, sums).

        Collective. Raises ValueError on every rank when the ranks' closures returned different losses.
        """
        out_sums, (grad_max, loss_max, neg_loss_min) = self.reduce(
            sums, [max_abs(flat_grad), loss, -loss], what=what
        )
        loss_min = -neg_loss_min
        if loss_max != loss_min and not math.isnan(loss_max):
            raise ValueError(
                f"{self._comm.prefix}the LBFGS closure returned different losses on different ranks (from "
                f"{loss_min!r} to {loss_max!r}); every rank must evaluate the same objective. With "
                "a data-parallel closure (e.g. DDP), average the loss over ranks before returning it: "
                "dist.all_reduce(loss); loss /= world_size"
            )
        return loss_max, self.scalar(grad_max), [self.scalar(v) for v in out_sums]
