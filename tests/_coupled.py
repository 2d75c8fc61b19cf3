"""Optimizer classes whose update couples elements or tensors only under some conditions (issue 21).

Each looks elementwise on random data and is not, in one of the ways real classes are not:

- `SGDPLike`: per tensor, by structure: removes the radial part of a weight's update only when
  its gradient is nearly orthogonal to the weight (timm's SGDP: a weight before a LayerNorm);
- `DelayedTrustRatio`: per tensor, after a warm-up: scales each tensor's update by |w| / |update|
  (a LAMB trust ratio) from step `warmup + 1` on;
- `ClipPerTensor`: per tensor, by magnitude: clips a tensor's gradient norm above `threshold`;
- `GlobalClip`: across tensors, by magnitude: clips the norm of all of a group's gradients
  together above `threshold` (a spike guard), so one tensor's gradient changes another's update.

Also the model of the issue's reproduction and a training loop with a gradient spike mid-run.
Module-level, so spawned ranks can unpickle them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer


class SGDPLike(Optimizer):
    """SGD with momentum whose update loses its radial part when |cos(grad, weight)| < delta / sqrt(numel)."""

    def __init__(self, params: Any, lr: float = 0.01, momentum: float = 0.9, delta: float = 0.1) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = buf.clone()
                if p.dim() > 1:
                    w, g = p.reshape(-1), p.grad.reshape(-1)
                    cos = (w @ g).abs() / (w.norm() * g.norm()).clamp_min(1e-12)
                    if float(cos) < group["delta"] / math.sqrt(w.numel()):
                        u = update.reshape(-1)
                        update = (u - w * ((w @ u) / (w @ w).clamp_min(1e-12))).reshape(p.shape)
                p.add_(update, alpha=-group["lr"])
        return None


class DelayedTrustRatio(Optimizer):
    """Sign-free Adam-like step; from step warmup + 1 on, each tensor's update is scaled by |w| / |update|."""

    def __init__(self, params: Any, lr: float = 0.01, warmup: int = 8, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "warmup": warmup, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                avg = state.setdefault("exp_avg_sq", torch.zeros_like(p))
                avg.mul_(group["beta"]).addcmul_(p.grad, p.grad, value=1 - group["beta"])
                update = p.grad / (avg.sqrt() + 1e-8)
                if state["step"] > group["warmup"]:
                    update = update * (p.norm() / update.norm().clamp_min(1e-12)).clamp(max=10.0)
                p.add_(update, alpha=-group["lr"])
        return None


class ClipPerTensor(Optimizer):
    """SGD whose gradient is clipped per tensor to norm `threshold` when above it."""

    def __init__(self, params: Any, lr: float = 0.01, threshold: float = 5.0) -> None:
        super().__init__(params, {"lr": lr, "threshold": threshold})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                norm = float(p.grad.norm())
                factor = group["threshold"] / norm if norm > group["threshold"] else 1.0
                p.add_(p.grad, alpha=-group["lr"] * factor)
        return None


class GlobalClip(Optimizer):
    """SGD whose gradients are clipped together (one norm over the group) when above `threshold`."""

    def __init__(self, params: Any, lr: float = 0.01, threshold: float = 1e3) -> None:
        super().__init__(params, {"lr": lr, "threshold": threshold})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            norm = float(torch.stack([g.norm() for g in grads]).norm())
            factor = group["threshold"] / norm if norm > group["threshold"] else 1.0
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * factor)
        return None


#: The classes and the options the tests use, by name.
COUPLED: dict[str, tuple[type[Optimizer], dict[str, Any]]] = {
    "SGDPLike": (SGDPLike, {"lr": 0.01, "momentum": 0.9}),
    "DelayedTrustRatio": (DelayedTrustRatio, {"lr": 0.01, "warmup": 8}),
    "ClipPerTensor": (ClipPerTensor, {"lr": 0.01, "threshold": 5.0}),
    "GlobalClip": (GlobalClip, {"lr": 0.01, "threshold": 1e3}),
}

#: Steps per run (more than DelayedTrustRatio's warm-up) and the step whose loss is scaled by SPIKE.
STEPS = 12
SPIKE_STEP = 9
SPIKE = 1e4


def model() -> torch.nn.Module:
    """The issue's model: Linear(16,33) -> LayerNorm(33) -> tanh -> Linear(33,7) (scale-invariant first weight)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 33), torch.nn.LayerNorm(33), torch.nn.Tanh(), torch.nn.Linear(33, 7)
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(64, 16, generator=gen), torch.randn(64, 7, generator=gen)


def loss(net: torch.nn.Module) -> torch.Tensor:
    """Full-batch MSE (the same on every rank: what DDP's averaged gradients would be)."""
    x, y = batch()
    return ((net(x) - y) ** 2).mean()


def train(net: torch.nn.Module, opt: Any, *, scale: float, steps: int = STEPS) -> None:
    """`steps` steps of loss * scale, the loss of step SPIKE_STEP scaled by SPIKE too."""
    for step in range(steps):
        opt.zero_grad()
        (loss(net) * scale * (SPIKE if step == SPIKE_STEP else 1.0)).backward()
        opt.step()


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest max|a - b| / max|b| over the parameters."""
    return max(
        float((p.detach() - q.detach()).abs().max()) / max(float(q.detach().abs().max()), 1e-12)
        for p, q in zip(a.parameters(), b.parameters())
    )


def loss_x10(net: torch.nn.Module) -> torch.Tensor:
    """The issue's reproduction: the full-batch MSE x10."""
    return loss(net) * 10.0


class FailsAtStep3(torch.optim.SGD):
    """SGD that raises at its third step (for verify's failure path)."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise RuntimeError("FailsAtStep3 fails on purpose")
        return super().step(closure)
