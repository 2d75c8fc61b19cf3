"""shardoptim.verify and `shardoptim-verify`: find the SGDP difference under a forced flat layout, exact by default.

The issue's reproduction: Linear(16,33) -> LayerNorm(33) -> tanh -> Linear(33,7), full-batch MSE x10,
5 steps, SGDP with lr=0.01, momentum=0.9 at 2 ranks. The suite does not need timm: the SGDP-like
class of tests/_coupled.py has the same trigger (and the CLI test uses pytorch_optimizer's SGDP
when installed). verify spawns its own ranks (about 5-10 s per call).
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import shardoptim
from shardoptim.verify_cli import main
from tests import _coupled

_MODEL, _LOSS = "tests._coupled:model", "tests._coupled:loss_x10"


def test_verify_finds_sgdp_difference_when_forced_flat() -> None:
    result = shardoptim.verify(
        _coupled.SGDPLike,
        _coupled.model,
        _coupled.loss_x10,
        steps=5,
        world_size=2,
        sharding="flat",
        lr=0.01,
        momentum=0.9,
    )
    flat, tensor = result.runs
    assert (flat.layout, flat.verdict) == ("flat", "different"), result.report()
    assert (flat.first_step, flat.first_param) == (1, "0.weight"), result.report()
    assert flat.max_rel_diff > 1e-6
    by_name = {p.name: p for p in flat.params}
    assert by_name["0.weight"].verdict == "different" and by_name["0.bias"].verdict == "exact"
    assert (tensor.layout, tensor.verdict) == ("tensor", "exact"), result.report()
    assert result.recommended == "tensor"
    assert result.verdict == "different"
    text = result.report()
    assert (
        "DIFFERENT" in text
        and "first differs at step 1 in 0.weight" in text
        and "recommended: sharding='tensor'" in text
    )


def test_verify_adamw_exact() -> None:
    result = shardoptim.verify(
        torch.optim.AdamW, _MODEL, _LOSS, steps=5, world_size=2, lr=1e-3, weight_decay=0.1
    )
    assert len(result.runs) == 1 and result.runs[0].layout == "flat", result.report()
    assert result.verdict == "exact" and result.runs[0].max_rel_diff == 0.0, result.report()
    assert result.recommended == "flat"
    assert result.to_dict()["runs"][0]["verdict"] == "exact"


def test_cli_sgdp_exact_under_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    sgdp = (
        "pytorch_optimizer:SGDP"
        if importlib.util.find_spec("pytorch_optimizer")
        else "tests._coupled:SGDPLike"
    )
    options = ["--opt", "lr=0.01", "--opt", "momentum=0.9"]
    if sgdp.startswith("pytorch_optimizer"):
        options += ["--opt", "nesterov=True", "--opt", "weight_decay=0"]
    status = main([sgdp, "--model", _MODEL, "--loss", _LOSS, "--steps", "5", "--world-size", "2", *options])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "sharding='auto' -> layout tensor: EXACT" in out and "recommended: sharding='tensor'" in out, out


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no_colon", "--model", _MODEL, "--loss", _LOSS]) == 2
    assert "module:attribute" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["torch.optim:AdamW", "--model", _MODEL, "--loss", _LOSS, "--opt", "not an option"])
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        shardoptim.verify(torch.optim.AdamW, _MODEL, _LOSS, world_size=0)
    with pytest.raises(ValueError, match="sharding must be one of"):
        shardoptim.verify(torch.optim.AdamW, _MODEL, _LOSS, sharding="rows")


def test_verify_reports_a_failing_rank_without_waiting_for_the_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)a rank failed.*FailsAtStep3 fails on purpose"):
        shardoptim.verify(
            _coupled.FailsAtStep3, _MODEL, _LOSS, steps=4, sharding="tensor", lr=0.1, timeout_s=120
        )
    assert time.monotonic() - start < 60, "the other rank was left waiting for the collective timeout"
