"""Packing of param_group hyperparameters (shardoptim.hparam_pack, hparam_flow, hparams), in one process without a process group."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import shardoptim
from shardoptim.comm import Comm
from shardoptim.hparam_flow import copy_hparams_
from shardoptim.hparam_pack import pack_hparams, unpack_hparams_
from shardoptim.hparams import HparamSyncer


def _adam_like_groups() -> list[dict[str, Any]]:
    """Two groups with every packed kind: float, int, bool, tuple, list, tensor; plus unpacked options."""
    return [
        {
            "params": [torch.zeros(3)],
            "lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.01,
            "amsgrad": False,
            "maximize": True,
            "foreach": None,
            "fused": True,
            "step_size": 3,
            "initial_lr": 1e-3,
        },
        {
            "params": [torch.zeros(2)],
            "lr": torch.tensor(0.02, dtype=torch.float64),
            "betas": (0.8, 0.95),
            "eps": 1e-6,
            "weight_decay": 0.0,
            "amsgrad": True,
            "maximize": False,
            "foreach": None,
            "fused": True,
            "step_size": 7,
            "initial_lr": 0.02,
            "etas": [0.5, 1.2],
            "name": "head",
            "scale_fn": math.sqrt,
        },
    ]


def _other_values(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same schema as _adam_like_groups() with every packed value changed (what rank 0 would send)."""
    other = _adam_like_groups()
    other[0].update(
        lr=5e-4,
        betas=(0.85, 0.99),
        eps=1e-7,
        weight_decay=0.2,
        amsgrad=True,
        maximize=False,
        fused=False,
        step_size=11,
        initial_lr=7e-4,
    )
    other[1].update(
        lr=torch.tensor(0.125, dtype=torch.float64),
        betas=(0.7, 0.9),
        amsgrad=False,
        step_size=1,
        etas=[0.25, 2.0],
        name="other",
        scale_fn=math.exp,
    )
    return other


def test_round_trip_restores_values_and_types() -> None:
    src = _other_values(_adam_like_groups())
    packed, entries = pack_hparams(src)
    dst = _adam_like_groups()
    unpack_hparams_(dst, packed, entries)
    for s, d in zip(src, dst):
        for key in (
            "lr",
            "betas",
            "eps",
            "weight_decay",
            "amsgrad",
            "maximize",
            "fused",
            "step_size",
            "initial_lr",
            "etas",
        ):
            if key not in s:
                continue
            if isinstance(s[key], torch.Tensor):
                assert torch.equal(d[key], s[key]), key
            else:
                assert d[key] == s[key], key
                assert type(d[key]) is type(s[key]), (key, type(d[key]), type(s[key]))
    assert isinstance(dst[0]["betas"], tuple) and isinstance(dst[1]["etas"], list)
    assert type(dst[0]["step_size"]) is int and type(dst[0]["amsgrad"]) is bool
    assert all(type(b) is float for b in dst[0]["betas"])


def test_round_trip_of_own_values_is_identity() -> None:
    groups = _adam_like_groups()
    packed, entries = pack_hparams(groups)
    before = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    tensor_lr = groups[1]["lr"]
    unpack_hparams_(groups, packed, entries)
    assert groups[1]["lr"] is tensor_lr
    for b, g in zip(before, groups):
        for key, value in b.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(g[key], value)
            else:
                assert g[key] == value and type(g[key]) is type(value), key


def test_awkward_floats_survive_bitwise() -> None:
    # float64 carries every Python float exactly, so a scheduler's lr is reproduced bit for bit.
    values = [1e-300, 5e-324, 0.1 + 0.2, -0.0, 1 / 3, 1e300, float("inf")]
    src = [{"params": [], "lr": v, "betas": (v, 0.5)} for v in values]
    dst = [{"params": [], "lr": 1.0, "betas": (0.0, 0.0)} for _ in values]
    unpack_hparams_(dst, *pack_hparams(src))
    for s, d in zip(src, dst):
        assert math.copysign(1.0, d["lr"]) == math.copysign(1.0, s["lr"])
        assert d["lr"] == s["lr"] and d["betas"] == s["betas"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tensor_lr_updated_in_place(dtype: torch.dtype) -> None:
    lr = torch.tensor(0.01, dtype=dtype)
    storage = lr.data_ptr()
    dst = [{"params": [], "lr": lr}]
    src = [{"params": [], "lr": torch.tensor(0.5, dtype=dtype)}]
    unpack_hparams_(dst, *pack_hparams(src))
    assert dst[0]["lr"] is lr, "a tensor lr must stay the same tensor (the local optimizer may hold it)"
    assert isinstance(dst[0]["lr"], torch.Tensor)
    assert lr.dtype == dtype and lr.shape == () and lr.data_ptr() == storage
    assert lr.item() == 0.5


def test_small_tensor_keeps_shape() -> None:
    t = torch.zeros(2, 3)
    dst = [{"params": [], "w": t}]
    src = [{"params": [], "w": torch.arange(6.0).reshape(2, 3)}]
    unpack_hparams_(dst, *pack_hparams(src))
    assert dst[0]["w"] is t and torch.equal(t, torch.arange(6.0).reshape(2, 3))


def test_non_numeric_options_not_packed() -> None:
    groups = [
        {
            "params": [torch.zeros(1)],
            "lr": 0.1,
            "name": "enc",
            "foreach": None,
            "fn": math.sqrt,
            "lam": lambda e: 0.5,
            "mixed": (1.0, "a"),
            "empty": (),
            "big": torch.zeros(65),
            "cplx": torch.zeros(1, dtype=torch.complex64),
            "param_names": ["w"],
        }
    ]
    _, entries = pack_hparams(groups)
    assert [key for _, key, _, _ in entries] == ["lr"]
    packed, entries = pack_hparams(groups)
    assert packed[1].item() == 1 and packed[2].item() == 0.1


def test_non_numeric_options_untouched_by_unpack() -> None:
    dst = _adam_like_groups()
    src = _other_values(_adam_like_groups())
    unpack_hparams_(dst, *pack_hparams(src))
    assert dst[1]["name"] == "head" and dst[1]["scale_fn"] is math.sqrt
    assert dst[0]["foreach"] is None


def test_params_never_packed() -> None:
    groups = [{"params": [torch.zeros(1)], "lr": 0.1}]
    _, entries = pack_hparams(groups)
    assert all(key != "params" for _, key, _, _ in entries)


def test_layout_of_packed_vector() -> None:
    packed, entries = pack_hparams(_adam_like_groups())
    assert packed.dtype == torch.float64 and packed.device.type == "cpu" and packed.dim() == 1
    num_values = sum(n for *_, n in entries)
    assert packed[1].item() == num_values
    assert torch.count_nonzero(packed[2 + num_values :]) == 0, "padding must be zeros"
    # keys sorted within each group, groups in order
    keys = [(g, k) for g, k, _, _ in entries]
    assert keys == sorted(keys)


def test_fingerprint_changes_with_keys() -> None:
    base = pack_hparams([{"params": [], "lr": 0.1, "momentum": 0.9}])[0][0].item()
    same_values_changed = pack_hparams([{"params": [], "lr": 0.5, "momentum": 0.1}])[0][0].item()
    assert same_values_changed == base, "the fingerprint depends on the schema, not on the values"
    variants = {
        "new key": [{"params": [], "lr": 0.1, "momentum": 0.9, "initial_lr": 0.1}],
        "removed key": [{"params": [], "lr": 0.1}],
        "renamed key": [{"params": [], "lr": 0.1, "dampening": 0.9}],
        "type int": [{"params": [], "lr": 0.1, "momentum": 1}],
        "type bool": [{"params": [], "lr": 0.1, "momentum": True}],
        "type tensor": [{"params": [], "lr": torch.tensor(0.1), "momentum": 0.9}],
        "tuple": [{"params": [], "lr": 0.1, "momentum": (0.9, 0.9)}],
        "extra group": [{"params": [], "lr": 0.1, "momentum": 0.9}, {"params": [], "lr": 0.1}],
        "key in other group": [{"params": [], "lr": 0.1}, {"params": [], "momentum": 0.9}],
    }
    prints = {name: pack_hparams(groups)[0][0].item() for name, groups in variants.items()}
    for name, fp in prints.items():
        assert fp != base, f"fingerprint unchanged by: {name}"
    assert len(set(prints.values())) == len(prints), prints
    # exactly representable in the float64 slot
    assert float(int(base)) == base and 0 <= base < 2**32


def test_fingerprint_ignores_non_numeric_keys() -> None:
    base = pack_hparams([{"params": [], "lr": 0.1}])[0][0].item()
    assert pack_hparams([{"params": [], "lr": 0.1, "name": "x", "foreach": None}])[0][0].item() == base


@pytest.mark.parametrize("num_values", [0, 1, 10, 61, 62, 63, 64, 126, 127, 200, 1000])
def test_capacity_power_of_two_at_least_64(num_values: int) -> None:
    groups = [{"params": [], **{f"k{i:04d}": float(i + 1) for i in range(num_values)}}]
    packed, entries = pack_hparams(groups)
    capacity = packed.numel()
    assert capacity >= 64 and capacity & (capacity - 1) == 0, capacity
    assert capacity >= num_values + 2
    assert len(entries) == num_values and packed[1].item() == num_values
    dst = [{"params": [], **{f"k{i:04d}": 0.0 for i in range(num_values)}}]
    unpack_hparams_(dst, packed, entries)
    assert dst == groups


def test_copy_hparams_keeps_local_params() -> None:
    src = _adam_like_groups()
    local_params = [[torch.ones(1)], [torch.ones(2)]]
    dst: list[dict[str, Any]] = [{"params": p, "lr": 0.0} for p in local_params]
    copy_hparams_(src, dst)
    for s, d, p in zip(src, dst, local_params):
        assert d["params"] is p
        assert {k for k in d if k != "params"} == {k for k in s if k != "params"}
    assert dst[1]["lr"] is src[1]["lr"]
    with pytest.raises(RuntimeError, match="2 groups into 1 groups"):
        copy_hparams_(src, dst[:1])


@pytest.mark.parametrize("mode", ["broadcast", "check", "off"])
def test_sync_is_a_noop_on_one_process(mode: Any) -> None:
    groups = _adam_like_groups()
    lr = groups[1]["lr"]
    HparamSyncer(Comm(), mode).sync_(groups)
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] is lr


def test_all_reduce_metric_single_process() -> None:
    assert shardoptim.all_reduce_metric(2.5) == 2.5
    assert shardoptim.all_reduce_metric(torch.tensor([3.0]), op="max") == 3.0
    assert shardoptim.all_reduce_metric(torch.tensor(4.0), op="sum") == 4.0
    with pytest.raises(ValueError, match="op must be"):
        shardoptim.all_reduce_metric(1.0, op="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one-element tensor"):
        shardoptim.all_reduce_metric(torch.zeros(2))
