"""The probe's synthetic inputs: tensor shapes, the gradient schedule, and cutting tensors into pieces.

The schedule drives a class through the conditions real training produces, at the user's own
hyperparameters, so that couplings which act only under some of them show up:

- random gradients at three magnitudes (moderate, 10x, 1/20x: around typical clip thresholds);
- gradients orthogonal to each weight (what a weight followed by a normalization gets: SGDP and
  AdamP project the update only then) and parallel to it;
- more steps than a typical warm-up before a trust ratio, a projection or a clip starts;
- then a spike of 4 orders of magnitude up (a global clip or a spike guard acts) and one of 4
  orders down (below running norms and thresholds).

The cross-tensor checks also run the whole schedule with every gradient 1000x smaller
(SMALL_GRADS), as a trained network's are: a statistic that normalizes by them (a variance over
all tensors) is then small and what it scales shows. A gradient is a function of its own
tensor's current values only (orthogonal and parallel steps
read the weight), so scaling one tensor's gradient or leaving it out cannot move another tensor's
gradient: only the class can couple them. Pure torch: must not import torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "GRAD_SCHEDULE",
    "SMALL_GRADS",
    "MATRIX_SHAPES",
    "SHAPES",
    "Case",
    "join",
    "make_case",
    "piece_counts",
    "scaled",
    "split",
]

#: Shapes probed by default: a weight, a bias (not divisible by 2 or 3) and another weight.
#: NOTE: both sides of the first weight are >= 16, where size-triggered behaviour such as timm's
#: AdafactorBigVision factoring its second moment (min_dim_size_to_factor=16) starts.
SHAPES: tuple[tuple[int, ...], ...] = ((20, 17), (7,), (6, 5))
#: Shapes for classes that take only matrices (e.g. Muon).
MATRIX_SHAPES: tuple[tuple[int, ...], ...] = ((20, 17), (6, 5), (5, 7))

Direction = Literal["random", "orthogonal", "parallel"]
#: (scale, direction) per step: the first three steps as before (moderate, 10x, a drop), then
#: orthogonal and parallel gradients through a warm-up of 12 steps, then a spike up and one down.
GRAD_SCHEDULE: tuple[tuple[float, Direction], ...] = (
    (1.0, "random"),
    (10.0, "random"),
    (0.05, "random"),
    (1.0, "orthogonal"),
    (1.0, "parallel"),
    (1.0, "orthogonal"),
    (1.0, "random"),
    (1.0, "orthogonal"),
    (1.0, "random"),
    (1.0, "orthogonal"),
    (1.0, "random"),
    (1.0, "orthogonal"),
    (1e4, "random"),
    (1.0, "orthogonal"),
    (1e-4, "random"),
    (1.0, "random"),
)
#: The cross-tensor checks are repeated with all gradients scaled by this.
SMALL_GRADS = 1e-3
_SEED = 1234


@dataclass(frozen=True, slots=True)
class Case:
    """Fixed synthetic inputs: initial tensors and, per step, the random part of the gradients."""

    inits: list[torch.Tensor]
    """Initial values of the probed tensors (whole shapes)."""
    directions: list[list[torch.Tensor]]
    """[step][tensor]: the random gradient of that step, before its direction and scale apply."""

    @property
    def num_steps(self) -> int:
        return len(self.directions)

    def grad(self, step: int, index: int, weight: torch.Tensor) -> torch.Tensor:
        """Return the gradient of tensor `index` at `step`, given that tensor's current values.

        Orthogonal: the random direction with its component along `weight` removed; parallel:
        `weight` itself; both rescaled to the random direction's norm, then the step's scale.
        """
        scale, direction = GRAD_SCHEDULE[step]
        raw = self.directions[step][index]
        if direction == "random":
            return raw * scale
        w = weight.detach().to(raw.dtype)
        w_sq = float((w * w).sum())
        if not math.isfinite(w_sq) or w_sq == 0.0:
            return raw * scale
        g = raw - w * (float((raw * w).sum()) / w_sq) if direction == "orthogonal" else w.clone()
        g_norm = float(g.norm())
        if not math.isfinite(g_norm) or g_norm == 0.0:
            return raw * scale
        return g * (float(raw.norm()) / g_norm * scale)


def scaled(case: Case, factor: float) -> Case:
    """The same case with every gradient `factor` times as large (the same initial tensors)."""
    return Case(inits=case.inits, directions=[[d * factor for d in step] for step in case.directions])


def make_case(shapes: Sequence[tuple[int, ...]]) -> Case:
    """Varied, non-iid values: a ramp along each tensor makes its pieces' norms differ from the whole's."""
    gen = torch.Generator().manual_seed(_SEED)
    inits: list[torch.Tensor] = []
    ramps: list[torch.Tensor] = []
    for i, shape in enumerate(shapes):
        numel = math.prod(shape)
        ramp = torch.linspace(0.25, 2.0, numel).reshape(shape) * (1.0 + 0.5 * i)
        inits.append(torch.randn(shape, generator=gen) * ramp + 0.1)
        ramps.append(ramp.flip(-1) if len(shape) > 0 else ramp)
    directions = [[torch.randn(ramp.shape, generator=gen) * ramp for ramp in ramps] for _ in GRAD_SCHEDULE]
    return Case(inits=inits, directions=directions)


def _split_points(numel: int) -> list[int]:
    """Cut points into 2-3 unequal contiguous pieces (like flat shards crossing a tensor)."""
    cuts = sorted({max(1, numel * 2 // 7), max(1, numel * 3 // 5)} - {numel})
    return [c for c in cuts if 0 < c < numel]


def piece_counts(shapes: Sequence[torch.Size]) -> list[int]:
    """Return how many pieces `split` cuts each tensor of these shapes into."""
    return [len(_split_points(math.prod(shape))) + 1 for shape in shapes]


def split(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Flatten every tensor and cut it into 2-3 unequal contiguous 1-D pieces (copies)."""
    pieces: list[torch.Tensor] = []
    for t in tensors:
        flat = t.reshape(-1)
        bounds = [0, *_split_points(flat.numel()), flat.numel()]
        pieces.extend(flat[a:b].clone() for a, b in zip(bounds, bounds[1:]))
    return pieces


def join(pieces: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Inverse of `split`: whole tensors of `shapes` from their pieces (detached copies)."""
    out: list[torch.Tensor] = []
    at = 0
    for shape, count in zip(shapes, piece_counts(shapes)):
        out.append(torch.cat([p.detach().reshape(-1) for p in pieces[at : at + count]]).reshape(shape))
        at += count
    return out
