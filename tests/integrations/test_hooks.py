"""The Trainer callback and the Accelerate hook on one process (no process group, world size 1).

The frameworks themselves run in test_frameworks.py; here the hooks are called directly, with
stand-ins for the framework objects they read (args, control, accelerator), to pin down when they
consolidate and which mistakes they report.
"""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import shardoptim

REPO = Path(__file__).resolve().parents[2]
FRAMEWORK_MODULES = ("transformers", "accelerate", "lightning", "pytorch_lightning", "safetensors")


def _model_and_optimizer() -> tuple[torch.nn.Module, shardoptim.ShardedOptimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = shardoptim.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 5)).square().sum().backward()
    opt.step()
    opt.zero_grad()


class _Wrapper:
    """Stands in for accelerate's AcceleratedOptimizer, which keeps the real one in `.optimizer`."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer


def test_importing_the_integrations_imports_no_framework() -> None:
    code = (
        "import sys, shardoptim, shardoptim.integrations, shardoptim.integrations.transformers, "
        "shardoptim.integrations.accelerate, shardoptim.integrations.lightning\n"
        f"print(sorted(m for m in {FRAMEWORK_MODULES!r} if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.fixture(scope="module")
def callback_class() -> Any:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (pip install -e '.[test]')")
    from tests.integrations._common import hide_broken_torchvision

    hide_broken_torchvision()
    from shardoptim.integrations.transformers import ShardedOptimizerCallback

    return ShardedOptimizerCallback


def _args(**kw: Any) -> SimpleNamespace:
    defaults: dict[str, Any] = {"world_size": 1, "save_only_model": False, "save_strategy": "steps"}
    return SimpleNamespace(**{**defaults, **kw})


def test_callback_is_a_trainer_callback_and_pickles(callback_class: Any) -> None:
    from transformers import TrainerCallback

    callback = callback_class()
    assert isinstance(callback, TrainerCallback)
    assert type(pickle.loads(pickle.dumps(callback))) is callback_class
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = shardoptim.integrations.transformers.Nope  # type: ignore[attr-defined]


def _spy(opt: shardoptim.ShardedOptimizer) -> list[int]:
    """Record the `to` of every consolidate_state_dict call on `opt` (which still runs)."""
    calls: list[int] = []
    consolidate = opt.consolidate_state_dict

    def spy(to: int = 0) -> None:
        calls.append(to)
        consolidate(to=to)

    opt.consolidate_state_dict = spy  # type: ignore[method-assign]
    return calls


def test_callback_consolidates_only_when_trainer_is_about_to_save(callback_class: Any) -> None:
    model, opt = _model_and_optimizer()
    calls = _spy(opt)
    _step(model, opt)
    callback = callback_class()  # finds the optimizer inside Trainer's wrapper
    kwargs = {"optimizer": _Wrapper(opt), "model": model}
    callback.on_step_end(_args(), None, SimpleNamespace(should_save=False), **kwargs)
    assert calls == []
    callback.on_step_end(_args(), None, SimpleNamespace(should_save=True), **kwargs)
    assert calls == [0]
    full = opt.state_dict()
    assert len(full["state"]) == 4 and set(full["state"][0]) >= {"exp_avg", "exp_avg_sq"}
    # save_only_model: Trainer writes no optimizer file, so there is nothing to gather.
    callback.on_step_end(_args(save_only_model=True), None, SimpleNamespace(should_save=True), **kwargs)
    assert calls == [0]
    callback.on_epoch_end(_args(), None, SimpleNamespace(should_save=False), **kwargs)
    assert calls == [0]
    callback.on_epoch_end(_args(), None, SimpleNamespace(should_save=True), **kwargs)
    assert calls == [0, 0]


def test_callback_consolidates_after_each_evaluation_when_saving_the_best(callback_class: Any) -> None:
    model, opt = _model_and_optimizer()
    calls = _spy(opt)
    _step(model, opt)
    callback = callback_class(opt)
    callback.on_evaluate(_args(save_strategy="steps"), None, SimpleNamespace(should_save=False))
    assert calls == []
    callback.on_evaluate(_args(save_strategy="best"), None, SimpleNamespace(should_save=False))
    assert calls == [0]


def test_callback_ignores_other_optimizers(callback_class: Any) -> None:
    model = torch.nn.Linear(3, 2)
    plain = torch.optim.AdamW(model.parameters())
    callback = callback_class()
    for event in ("on_train_begin", "on_step_end", "on_epoch_end"):
        getattr(callback, event)(
            _args(world_size=2), None, SimpleNamespace(should_save=True), optimizer=_Wrapper(plain)
        )
    with pytest.raises(TypeError, match="ShardedOptimizer"):
        callback_class(plain)


def test_callback_reports_an_optimizer_built_before_the_process_group(callback_class: Any) -> None:
    _, opt = _model_and_optimizer()  # world size 1
    with pytest.raises(RuntimeError, match=r"shards over 1 rank\(s\) but Trainer runs 2 processes"):
        callback_class().on_train_begin(_args(world_size=2), None, SimpleNamespace(), optimizer=_Wrapper(opt))


class _FakeAccelerator:
    """The part of accelerate.Accelerator that register() uses."""

    def __init__(self, optimizers: list[Any], num_processes: int = 1) -> None:
        self._optimizers = optimizers
        self.num_processes = num_processes
        self.hooks: list[Any] = []

    def register_save_state_pre_hook(self, hook: Any) -> str:
        self.hooks.append(hook)
        return "handle"


def test_accelerate_hook_consolidates_every_prepared_sharded_optimizer() -> None:
    from shardoptim.integrations.accelerate import register

    (m1, o1), (m2, o2) = _model_and_optimizer(), _model_and_optimizer()
    calls1, calls2 = _spy(o1), _spy(o2)
    plain = torch.optim.SGD(torch.nn.Linear(2, 2).parameters())
    accelerator = _FakeAccelerator([_Wrapper(o1), _Wrapper(plain)])
    assert register(accelerator) == "handle"
    accelerator._optimizers.append(_Wrapper(o2))  # prepared after register(): found at save time
    _step(m1, o1)
    _step(m2, o2)
    (hook,) = accelerator.hooks
    hook([m1, m2], [m1.state_dict(), m2.state_dict()], "unused_dir")
    assert calls1 == calls2 == [0]
    assert len(o1.state_dict()["state"]) == len(o2.state_dict()["state"]) == 4


def test_accelerate_hook_with_explicit_optimizers() -> None:
    from shardoptim.integrations.accelerate import register

    (m1, o1), (m2, o2) = _model_and_optimizer(), _model_and_optimizer()
    calls1, calls2 = _spy(o1), _spy(o2)
    accelerator = _FakeAccelerator([_Wrapper(o2)])
    register(accelerator, o1)
    _step(m1, o1)
    _step(m2, o2)
    accelerator.hooks[0]([], [], "unused_dir")
    assert (calls1, calls2) == ([0], [])


def test_accelerate_register_rejects_mistakes() -> None:
    from shardoptim.integrations.accelerate import register

    _, opt = _model_and_optimizer()
    with pytest.raises(TypeError, match="ShardedOptimizer"):
        register(_FakeAccelerator([]), torch.optim.SGD(torch.nn.Linear(2, 2).parameters()))
    with pytest.raises(RuntimeError, match=r"shards over 1 rank\(s\) but Accelerate runs 2 processes"):
        register(_FakeAccelerator([], num_processes=2), opt)
