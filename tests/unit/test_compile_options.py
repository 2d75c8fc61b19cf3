"""`compile=` is validated by ShardConfig, never reaches the base class, and is refused for LBFGS."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer
from shardoptim.config import ShardConfig


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("yes", TypeError, "compile must be True, False or a dict"),
        ({"mod": "default"}, ValueError, r"unknown keys \['mod'\]"),
        ({"mode": "fastest"}, ValueError, "compile\\['mode'\\] must be one of"),
        ({"backend": "aot_eager", "mode": "max-autotune"}, ValueError, "need backend 'inductor'"),
        ({"options": 3}, TypeError, "compile\\['options'\\]"),
        ({"fullgraph": "yes"}, TypeError, "compile\\['fullgraph'\\]"),
        ({"dynamic": 1.5}, ValueError, "compile\\['dynamic'\\]"),
    ],
)
def test_bad_compile_values_rejected(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShardConfig.from_options(compile=value)


def test_good_compile_values() -> None:
    assert ShardConfig.from_options().compile_options() is None
    assert ShardConfig.from_options(compile=True).compile_options() == {}
    mode = {"mode": "max-autotune-no-cudagraphs"}
    assert ShardConfig.from_options(compile=mode).compile_options() == mode


def test_compile_not_passed_to_base_class() -> None:
    seen: dict[str, Any] = {}

    class Records(torch.optim.SGD):
        def __init__(self, params: Any, **kwargs: Any) -> None:
            seen.update(kwargs)
            super().__init__(params, **kwargs)

    opt = ShardedOptimizer(
        [torch.nn.Parameter(torch.ones(4))], Records, sharding="flat", lr=0.1, compile=False
    )
    assert "compile" not in seen and "compile" not in opt.param_groups[0]


def test_lbfgs_refuses_compile() -> None:
    with pytest.raises(ValueError, match="not supported with LBFGS"):
        ShardedOptimizer([torch.nn.Parameter(torch.ones(4))], torch.optim.LBFGS, compile=True)


def test_fused_class_is_not_compiled() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ShardedOptimizer([torch.nn.Parameter(torch.ones(4))], torch.optim.AdamW, lr=0.1, compile=True)
    assert opt.optim.param_groups[0]["fused"] is True
    assert not opt.compiled_update.compiles and "fused" in opt.compiled_update.fallback_reason
    assert sum("compile=True has no effect for AdamW" in str(w.message) for w in caught) == 1


class _NoisySGD(torch.optim.SGD):
    """SGD with gradient noise: a step that draws random numbers."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad + 0.01 * torch.randn_like(p), alpha=-group["lr"])
        return None


def _noisy_run(compile: bool) -> tuple[torch.Tensor, bool]:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64))
    opt = ShardedOptimizer([param], _NoisySGD, lr=0.1, sharding="tensor", compile=compile)
    for _ in range(4):
        param.grad = torch.ones(64)
        opt.step()
    return param.detach().clone(), opt.compiled_update.compiles


def test_compiled_random_draws_match_eager() -> None:
    eager, _ = _noisy_run(False)
    compiled, compiles = _noisy_run(True)
    assert compiles and torch.equal(eager, compiled)
