"""opt.clip_grad_norm_ over bf16, fp16 and mixed gradients, against torch.nn.utils.clip_grad_norm_.

One process, no process group. torch norms a bf16/fp16 gradient in its own dtype and rounds the
per-tensor norms to it; shardoptim norms them in fp32, so the totals agree with torch to a few
units of bf16/fp16 rounding and with an fp64 reference to fp32 rounding. The clipped gradients
are read back through one SGD step (lr=1) from zeroed weights: the new weights are minus the
clipped gradients, whatever layout (stage 1 `.grad`, stage 2 shards, master weights) held them.
That SGD is foreach, not fused: torch 2.12-2.13's CPU fused SGD skips the vectorised part of
bf16/fp16 tensors (pytorch/pytorch#191763).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from shardoptim import ShardedGradScaler, ShardedOptimizer

#: name -> the dtype of each of the three layers.
MIXES: dict[str, tuple[torch.dtype, torch.dtype, torch.dtype]] = {
    "bf16": (torch.bfloat16,) * 3,
    "fp16": (torch.float16,) * 3,
    "fp32+bf16": (torch.float32, torch.bfloat16, torch.float32),
}

#: SGD options for reading gradients back: p <- p - g (foreach: see the module docstring).
SGD = dict(lr=1.0, foreach=True)

#: Relative agreement with torch's total norm: a few roundings of the per-tensor norms.
NORM_RTOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


class _Net(torch.nn.Module):
    """Three linear layers of the given dtypes (sizes not multiples of anything)."""

    def __init__(self, dtypes: tuple[torch.dtype, torch.dtype, torch.dtype]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(
            [
                torch.nn.Linear(13, 29).to(dtypes[0]),
                torch.nn.Linear(29, 7).to(dtypes[1]),
                torch.nn.Linear(7, 3).to(dtypes[2]),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x.to(layer.weight.dtype))
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x.float()


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(8, 13, generator=torch.Generator().manual_seed(1))
    return model(x).pow(2).sum()


def _backward(model: torch.nn.Module) -> None:
    _loss(model).backward()


def _lowest(dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    return torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16


def _grads_after_clip(opt: ShardedOptimizer, model: torch.nn.Module) -> list[torch.Tensor]:
    """Return minus the gradients the optimizer holds now, read through an SGD step from zero weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # bumps the version: master weights re-read the zeros at the step
    opt.step()
    return [-p.detach().double() for p in model.parameters()]


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("master_dtype", [None, torch.float32], ids=["no-master", "fp32-master"])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mix", list(MIXES))
def test_clip_matches_torch(mix: str, stage: int, master_dtype: torch.dtype | None, norm_type: float) -> None:
    dtypes = MIXES[mix]
    model = _Net(dtypes)
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(
        model.parameters(), torch.optim.SGD, stage=stage, master_dtype=master_dtype, bucket_numel=300, **SGD
    )
    _backward(model)
    _backward(ref)
    unclipped = [p.grad.double() for p in ref.parameters() if p.grad is not None]
    exact = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, norm_type) for g in unclipped]), norm_type
    )
    max_norm = 0.3 * exact.item()  # clips by about 0.3: unclipped gradients would be far off
    factor = max_norm / (exact.item() + 1e-6)

    ours = opt.clip_grad_norm_(max_norm, norm_type)
    theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)

    assert ours.dtype == torch.float32  # bf16/fp16 pieces are normed in fp32
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=0)
    rtol_torch = NORM_RTOL[_lowest(dtypes)]
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol_torch, atol=0)
    got = _grads_after_clip(opt, model)
    for i, (mine, before, q) in enumerate(zip(got, unclipped, ref.parameters())):
        assert q.grad is not None
        # The exact clipped gradient, rounded once to the parameter dtype; torch's differs by the
        # rounding of its total norm in bf16/fp16 as well.
        eps, tiny = torch.finfo(q.dtype).eps, torch.finfo(q.dtype).tiny  # tiny: fp16 subnormals
        torch.testing.assert_close(
            mine, before * factor, rtol=eps + 1e-5, atol=tiny, msg=lambda m, i=i: f"param {i} vs exact: {m}"
        )
        torch.testing.assert_close(
            mine, q.grad.double(), rtol=rtol_torch + 2 * eps, atol=tiny, msg=lambda m, i=i: f"param {i}: {m}"
        )


@pytest.mark.parametrize("stage", [1, 2])
def test_all_bf16_total_norm_with_nothing_to_clip(stage: int) -> None:
    model = _Net(MIXES["bf16"])
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=stage, **SGD)
    _backward(model)
    _backward(ref)
    ours = opt.clip_grad_norm_(1e9)
    theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=NORM_RTOL[torch.bfloat16], atol=0)
    for got, want in zip(_grads_after_clip(opt, model), ref.parameters()):
        assert want.grad is not None
        torch.testing.assert_close(got, want.grad.double(), rtol=0, atol=0)  # factor 1: untouched


@pytest.mark.parametrize(
    "stage,master_dtype,refused",
    [(1, None, True), (2, None, True), (1, torch.float32, True), (2, torch.float32, False)],
)
def test_grad_scaler_refuses_fp16_gradients(
    stage: int, master_dtype: torch.dtype | None, refused: bool
) -> None:
    """GradScaler needs fp32 gradients: fp16 gradients are refused (README), clipping them is not."""
    model = _Net(MIXES["fp16"])
    opt = ShardedOptimizer(
        model.parameters(), torch.optim.SGD, stage=stage, master_dtype=master_dtype, lr=0.1
    )
    scaler = ShardedGradScaler("cpu", init_scale=4.0)
    scaler.scale(_loss(model)).backward()
    if refused:
        with pytest.raises(
            ValueError, match="Attempting to unscale FP16 gradients.*master_dtype=torch.float32"
        ):
            scaler.unscale_(opt)
    else:
        scaler.unscale_(opt)
    assert math.isfinite(opt.clip_grad_norm_(1.0).item())
