"""ShardedGradScaler: torch.amp.GradScaler for optimizers whose gradients are sharded.

At stage 2 the gradients live in each rank's shard, not in `param.grad`, so the stock scaler
finds nothing to unscale. This subclass asks a ShardedOptimizer to unscale what it owns and to
agree on inf/nan across ranks (one all-reduce), so `scaler.step` skips the step on every rank
or on none. Any other optimizer is handled exactly as by torch.amp.GradScaler.
"""

from __future__ import annotations

import torch
from torch.amp import GradScaler

__all__ = ["ShardedGradScaler"]


class ShardedGradScaler(GradScaler):
    """A drop-in torch.amp.GradScaler that also handles ShardedOptimizer(stage=2).

    Use it exactly like torch.amp.GradScaler: `scaler.scale(loss).backward()`,
    `scaler.unscale_(opt)` (optional, e.g. before `opt.clip_grad_norm_`), `scaler.step(opt)`,
    `scaler.update()`. `unscale_` and `step` are collectives for a ShardedOptimizer: call them on
    every rank of its group, in the same order.
    """

    def _unscale_grads_(
        self,
        optimizer: torch.optim.Optimizer,
        inv_scale: torch.Tensor,
        found_inf: torch.Tensor,
        allow_fp16: bool,
    ) -> dict[torch.device, torch.Tensor]:
        from shardoptim.optimizer import ShardedOptimizer

        if isinstance(optimizer, ShardedOptimizer):
            return optimizer.unscale_grads_(inv_scale, found_inf, allow_fp16=allow_fp16)
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
