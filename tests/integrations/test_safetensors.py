"""Every tensor survives serializers that de-duplicate by storage, with the default ShardedOptimizer.

safetensors (`save_file`, `save_model`), Hugging Face `save_pretrained` and Accelerate's default
`save_state` treat tensors that share one storage as one. With the default
`parameters_as_bucket_view=False` each parameter keeps its own storage, so all of them are written.
One process, no process group (world size 1), also after the model was moved once the optimizer
existed (as Trainer and Accelerate do with `model.to(torch.device("cpu", 0))`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

import shardoptim

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("safetensors") is None, reason="needs safetensors (pip install -e '.[test]')"
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 5x7 + 7 + 7 + 7 + 7x3 + 3: sizes that do not divide evenly into buckets or ranks.
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    )


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, model[0].in_features, generator=gen)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()


def _assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def _trained(move: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Train with ShardedOptimizer (moving the model after building it if `move`); return the model and
    the parameters a plain AdamW reaches from the same start."""
    model, reference = _model(), _model()
    opt = shardoptim.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    if move:
        model.to(torch.device("cpu", 0))  # copies every parameter into new storage
    _train(model, opt)
    _train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True))
    _assert_same(dict(model.state_dict()), dict(reference.state_dict()))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("move", [False, True], ids=["built_after_placement", "moved_after_building"])
def test_parameters_keep_their_own_storage(move: bool) -> None:
    model, _ = _trained(move)
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(ptrs) == len(list(model.parameters()))


@pytest.mark.parametrize("move", [False, True], ids=["built_after_placement", "moved_after_building"])
def test_safetensors_save_file_and_save_model(tmp_path: Path, move: bool) -> None:
    from safetensors.torch import load_file, save_file, save_model

    model, expected = _trained(move)
    save_file(model.state_dict(), str(tmp_path / "file.safetensors"))
    _assert_same(load_file(str(tmp_path / "file.safetensors")), expected)
    save_model(model, str(tmp_path / "model.safetensors"))
    _assert_same(load_file(str(tmp_path / "model.safetensors")), expected)


@pytest.fixture(scope="module")
def gpt2() -> Any:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("needs transformers (pip install -e '.[test]')")
    from tests.integrations._common import hide_broken_torchvision, tiny_gpt2

    hide_broken_torchvision()
    return tiny_gpt2


def test_save_pretrained_round_trips_every_tensor(tmp_path: Path, gpt2: Any) -> None:
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    model, reference = gpt2(), gpt2()
    opt = shardoptim.ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(2):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    model.save_pretrained(tmp_path / "sharded")
    reference.save_pretrained(tmp_path / "plain")
    keys = {}
    for name in ("sharded", "plain"):
        with safe_open(str(tmp_path / name / "model.safetensors"), framework="pt") as f:
            keys[name] = sorted(f.keys())
    # Only the tied lm_head.weight (= transformer.wte.weight) is written once, as without sharding.
    assert keys["sharded"] == keys["plain"]
    assert set(model.state_dict()) - set(keys["sharded"]) == {"lm_head.weight"}
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "sharded")
    _assert_same(dict(loaded.state_dict()), dict(model.state_dict()))
    _assert_same(dict(loaded.state_dict()), dict(reference.state_dict()))
