"""Bad input to every entry point: a clear error of the right type, and nothing half-done.

Each case asserts the error type (ValueError/TypeError for bad input, RuntimeError for wrong call
order or state) and the key words of its message; that a failed construction left the model's
parameters untouched (same storage, same values); and, where the optimizer was left alive, that
it is unchanged and its next step still equals a plain torch.optim reference bitwise. Most cases
run in this process (world size 1); the few that need a process group run on the shared `ranks2`
pool. Every case id is registered in CASE_IDS, and the last test counts them.

"""

from __future__ import annotations

import copy
import re
import shutil
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardoptim
from shardoptim import ShardedOptimizer, checkpoint, checkpoint_format, checkpoint_save
from tests._dist import RankPool

AdamW = torch.optim.AdamW
SGD = torch.optim.SGD

OPTIONS: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1}
SGD_OPTIONS: dict[str, Any] = {"lr": 0.1, "momentum": 0.9}
SHAPES = ((7, 5), (5, 9))
"""Shapes of _Net's `emb` and `w` (its `b` has w's last dim): 89 elements, uneven at any world size > 1."""
OTHER_SHAPES = ((7, 6), (6, 9))
"""Another model with the same parameter and group counts but other shapes."""
SHORT_PG_TIMEOUT_S = 4.0
"""Timeout of the process group of the one-rank-fails cases (a skipped collective waits this long)."""

CASE_IDS: list[str] = []
"""Every distinct bad input of this module, registered where it is parametrized."""


def _cases(*params: Any) -> list[Any]:
    """Register the ids of pytest.param entries (or plain string ids) and return them as a list."""
    for param in params:
        CASE_IDS.append(param if isinstance(param, str) else param.id)
    return list(params)


# Models, references and snapshots -------------------------------------------------------------------------


class _Net(torch.nn.Module):
    def __init__(self, shapes: tuple[tuple[int, int], tuple[int, int]] = SHAPES) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(shapes[0], generator=gen))
        self.w = torch.nn.Parameter(torch.randn(shapes[1], generator=gen))
        self.b = torch.nn.Parameter(torch.randn(shapes[1][1], generator=gen))


def _groups(model: _Net) -> list[dict[str, Any]]:
    return [{"params": [model.emb, model.w]}, {"params": [model.b], "lr": 3e-3}]


def _grads_(params: Iterable[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _impl_flags(opt: ShardedOptimizer) -> dict[str, Any]:
    group = opt.param_groups[0]
    return {k: group[k] for k in ("fused", "foreach") if group.get(k) is not None}


class _Twin:
    """A ShardedOptimizer and a plain torch.optim reference on identical copies of _Net, stepped together."""

    def __init__(
        self,
        cls: type[torch.optim.Optimizer] = AdamW,
        *,
        options: dict[str, Any] | None = None,
        shapes: tuple[tuple[int, int], tuple[int, int]] = SHAPES,
        **sharded_kwargs: Any,
    ) -> None:
        options = dict(OPTIONS if options is None else options)
        self.model, self.ref_model = _Net(shapes), _Net(shapes)
        self.opt = ShardedOptimizer(_groups(self.model), cls, **sharded_kwargs, **options)
        self.ref = cls(_groups(self.ref_model), **options, **_impl_flags(self.opt))
        self.num_steps = 0

    def step(self) -> None:
        _grads_(self.model.parameters(), self.num_steps)
        _grads_(self.ref_model.parameters(), self.num_steps)
        self.opt.step()
        self.ref.step()
        self.num_steps += 1

    def same(self) -> bool:
        return all(torch.equal(p, q) for p, q in zip(self.model.parameters(), self.ref_model.parameters()))

    def alive(self) -> bool:
        """Take one more step on both; True when the parameters still equal the reference bitwise."""
        self.step()
        return self.same()


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _same(a: Any, b: Any) -> bool:
    """Structural equality; tensors compare bitwise (dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _fingerprint(opt: ShardedOptimizer) -> list[Any]:
    """Everything a rejected call must leave as it was: groups, layout, local state, parameter values."""
    return [
        [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        [len(g["params"]) for g in opt.param_groups],
        [len(g["params"]) for g in opt.optim.param_groups],
        [len(opt.placement.params), len(opt.placement.buckets), len(opt.placement.pieces), opt._stepper.record.num_steps],
        [_clone(opt.optim.state.get(piece.local, {})) for piece in opt.placement.pieces],
        [p.detach().clone() for p in opt.placement.params],
    ]


def _snapshot(model: torch.nn.Module) -> list[tuple[int, torch.Tensor]]:
    return [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]


def _assert_untouched(model: torch.nn.Module, snapshot: list[tuple[int, torch.Tensor]]) -> None:
    for (name, p), (ptr, value) in zip(model.named_parameters(), snapshot):
        assert p.data_ptr() == ptr, f"{name}: a failed construction moved the parameter's storage"
        assert torch.equal(p, value), f"{name}: a failed construction changed the parameter's values"


def _assert_model_usable(model: _Net) -> None:
    """A new ShardedOptimizer over `model` matches torch.optim.AdamW over a copy, bitwise."""
    ref_model = copy.deepcopy(model)
    opt = ShardedOptimizer(_groups(model), AdamW, **OPTIONS)
    ref = AdamW(_groups(ref_model), **OPTIONS, **_impl_flags(opt))
    for step in range(2):
        _grads_(model.parameters(), step)
        _grads_(ref_model.parameters(), step)
        opt.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def _meta_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(3, device="meta"))


def _complex_param(seed: int = 1) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64, generator=gen))


# Construction ---------------------------------------------------------------------------------------------


def _flat(name: str) -> Callable[[_Net], Any]:
    return lambda m: ShardedOptimizer(m.parameters(), getattr(torch.optim, name), sharding="flat", lr=0.01)


CONSTRUCTION = _cases(
    pytest.param(
        lambda m: ShardedOptimizer([], AdamW), ValueError, "empty parameter list", id="empty_param_list"
    ),
    pytest.param(
        lambda m: ShardedOptimizer([m.emb, "w"], AdamW),
        TypeError,
        r"param_groups\[0\]\['params'\]\[1\] is a str, not a Tensor",
        id="non_tensor_param",
    ),
    pytest.param(
        lambda m: ShardedOptimizer(m.w, AdamW), TypeError, "got a single Tensor", id="single_tensor"
    ),
    pytest.param(
        lambda m: ShardedOptimizer({"params": [m.w]}, AdamW),
        TypeError,
        "got one dict",
        id="single_group_dict",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([m.w, {"params": [m.b]}], AdamW),
        TypeError,
        "mixes tensors and param-group dicts",
        id="tensors_mixed_with_groups",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([m.emb, m.w * 2], AdamW),
        ValueError,
        r"\['params'\]\[1\] \(shape \(5, 9\)\) is not a leaf tensor",
        id="non_leaf_tensor",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([m.emb, m.w, m.emb], AdamW),
        ValueError,
        r"\['params'\]\[2\] is the same tensor as param_groups\[0\]\['params'\]\[0\]",
        id="duplicate_param_same_group",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([{"params": [m.emb, m.w]}, {"params": [m.b, m.w]}], AdamW),
        ValueError,
        r"param_groups\[1\]\['params'\]\[1\] is the same tensor as param_groups\[0\]\['params'\]\[1\]",
        id="duplicate_param_two_groups",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([{"params": [m.emb]}, {"lr": 0.1}], AdamW),
        ValueError,
        "param group 1 has no 'params' key",
        id="group_missing_params",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([*m.parameters(), _meta_param()], AdamW),
        ValueError,
        r"different device types \['cpu', 'meta'\]",
        id="mixed_device_types",
    ),
    pytest.param(
        lambda m: ShardedOptimizer(m.parameters(), torch.nn.Linear),
        TypeError,
        "must be a torch.optim.Optimizer subclass",
        id="optimizer_class_not_an_optimizer",
    ),
    pytest.param(
        lambda m: ShardedOptimizer(m.parameters(), SGD([torch.zeros(1, requires_grad=True)], lr=0.1)),
        TypeError,
        "not an instance",
        id="optimizer_class_is_an_instance",
    ),
    pytest.param(
        lambda m: ShardedOptimizer(m.parameters(), AdamW, sharding="rows"),
        ValueError,
        r"sharding must be one of .* got 'rows'",
        id="sharding_unknown",
    ),
    *[
        pytest.param(
            _flat(name),
            ValueError,
            f"sharding='flat' would silently compute wrong updates for {name}",
            id=f"flat_sharding_{name}",
        )
        for name in ("Adafactor", "Muon", "SparseAdam")
    ],
    pytest.param(
        lambda m: ShardedOptimizer(m.parameters(), AdamW, hparam_sync="sometimes"),
        ValueError,
        r"hparam_sync must be one of .* got 'sometimes'",
        id="hparam_sync_unknown",
    ),
    *[
        pytest.param(
            lambda m, value=value: ShardedOptimizer(m.parameters(), AdamW, bucket_numel=value),
            ValueError,
            f"bucket_numel must be a positive int, got {value}",
            id=f"bucket_numel_{name}",
        )
        for name, value in (("zero", 0), ("negative", -5), ("float", 1.5))
    ],
    pytest.param(
        lambda m: ShardedOptimizer(m.parameters(), AdamW, verify_every=-1),
        ValueError,
        r"verify_every must be an int >= 0 .* got -1",
        id="verify_every_negative",
    ),
    pytest.param(
        lambda m: ShardedOptimizer([m.emb, torch.nn.Parameter(torch.zeros(4, 4).to_sparse())], AdamW),
        ValueError,
        r"\['params'\]\[1\] has layout torch.sparse_coo; only dense \(strided\) parameters are supported",
        id="sparse_param",
    ),
    pytest.param(
        lambda m: ShardedOptimizer(_groups(m), torch.optim.LBFGS),
        ValueError,
        "LBFGS supports one param group, got 2",
        id="lbfgs_two_groups",
    ),
    pytest.param(
        lambda m: ShardedOptimizer(m.parameters(), AdamW, process_group=object()),
        RuntimeError,
        "process_group was given but torch.distributed is not initialised",
        id="process_group_before_init",
    ),
)


@pytest.mark.parametrize(("make", "error", "match"), CONSTRUCTION)
def test_construction_rejected_model_untouched(make: Callable[[_Net], Any], error: type, match: str) -> None:
    assert not dist.is_initialized()
    model = _Net()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        make(model)
    _assert_untouched(model, snapshot)
    _assert_model_usable(model)


BASE_CHECKS = _cases(
    pytest.param(AdamW, lambda m: _groups(m), {"lr": -1.0}, id="lr_negative"),
    pytest.param(AdamW, lambda m: _groups(m), {"lr": 1e-2, "weight_decay": -0.5}, id="weight_decay_negative"),
    pytest.param(
        SGD, lambda m: _groups(m), {"lr": 0.1, "nesterov": True}, id="sgd_nesterov_without_momentum"
    ),
    pytest.param(torch.optim.Muon, lambda m: [m.w, m.b], {"lr": 0.1}, id="muon_1d_param"),
)


@pytest.mark.parametrize(("cls", "params", "options"), BASE_CHECKS)
def test_base_optimizer_check_surfaces_unchanged(
    cls: type[torch.optim.Optimizer], params: Callable[[_Net], Any], options: dict[str, Any]
) -> None:
    with pytest.raises(Exception) as expected:  # noqa: B017 - whatever torch raises is the expectation
        cls(params(_Net()), **options)
    model = _Net()
    snapshot = _snapshot(model)
    with pytest.raises(type(expected.value)) as got:
        ShardedOptimizer(params(model), cls, **options)
    assert str(got.value) == str(expected.value)
    _assert_untouched(model, snapshot)
    _assert_model_usable(model)


# step -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cast", _cases("storage_replaced_double", "storage_replaced_to_bfloat16"))
def test_step_detects_replaced_storage(cast: str) -> None:
    twin = _Twin()
    twin.step()
    before = _fingerprint(twin.opt)
    if cast == "storage_replaced_double":
        twin.model.double()
    else:
        twin.model.to(torch.bfloat16)
    _grads_(twin.model.parameters(), twin.num_steps)
    with pytest.raises(RuntimeError, match=r"parameter 0 changed from shape \(7, 5\), torch.float32") as info:
        twin.opt.step()
    assert "Build the ShardedOptimizer after moving or casting the model" in str(info.value)
    after = _fingerprint(twin.opt)
    assert _same(before[:5], after[:5]), "the rejected step changed the optimizer"


@pytest.mark.parametrize("case", _cases("sparse_grad_flat_sharding", "closure_not_callable"))
def test_step_rejected_then_alive(case: str) -> None:
    twin = _Twin(SGD, options=SGD_OPTIONS)
    twin.step()
    before = _fingerprint(twin.opt)
    if case == "sparse_grad_flat_sharding":
        _grads_(twin.model.parameters(), 99)
        twin.model.w.grad = twin.model.w.grad.to_sparse()
        with pytest.raises(
            TypeError, match=r"parameter 1 \(shape \(5, 9\)\) has a sparse gradient.*use sharding='tensor'"
        ):
            twin.opt.step()
    else:
        with pytest.raises(TypeError, match="not callable"):
            twin.opt.step("closure")  # type: ignore[call-overload]
    assert _same(before, _fingerprint(twin.opt))
    assert twin.alive()


def _lbfgs_closure(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        x.grad = None
        loss = 0.5 * ((a @ x - b) ** 2).sum()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("case", _cases("lbfgs_step_without_closure", "lbfgs_add_param_group"))
def test_lbfgs_rejects_then_alive(case: str) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 10, generator=gen, dtype=torch.float64)
    b = torch.randn(40, generator=gen, dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    y = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    options = {"lr": 0.5, "max_iter": 5, "history_size": 3}
    opt = ShardedOptimizer([x], torch.optim.LBFGS, **options)
    ref = torch.optim.LBFGS([y], **options)
    assert torch.equal(opt.step(_lbfgs_closure(x, a, b)), ref.step(_lbfgs_closure(y, a, b)))
    if case == "lbfgs_step_without_closure":
        with pytest.raises(ValueError, match=r"LBFGS needs a closure .*opt\.step\(closure\)"):
            opt.step()
    else:
        with pytest.raises(ValueError, match="LBFGS supports one param group"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert len(opt.param_groups) == len(opt.optim.param_groups) == len(opt.placement.params) == 1
    assert torch.equal(opt.step(_lbfgs_closure(x, a, b)), ref.step(_lbfgs_closure(y, a, b)))
    assert torch.equal(x, y)


COMPLEX_UNSUPPORTED = [("Adafactor", {}), ("Muon", {}), ("AdamW", {"fused": True})]
"""Base optimizers (and options) that reject complex parameters, all of them at step, not at construction."""


def _complex_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(_Net().w.detach().clone()[:4, :4].contiguous()), _complex_param()]


@pytest.mark.parametrize(
    ("name", "options"),
    COMPLEX_UNSUPPORTED,
    ids=_cases("complex_param_adafactor", "complex_param_muon", "complex_param_fused_adamw"),
)
def test_step_complex_unsupported_surfaces_torch_error(name: str, options: dict[str, Any]) -> None:
    """torch.optim raises at step for these; its error surfaces unchanged (at construction or first step)."""
    ref_params = _complex_params()
    ref = getattr(torch.optim, name)(ref_params, lr=1e-2, **options)
    _grads_(ref_params, 0)
    with pytest.raises(RuntimeError) as expected:
        ref.step()
    assert re.search(
        "does not support complex parameters|requires all the params to be floating point",
        str(expected.value),
    )
    params = _complex_params()
    with pytest.raises(type(expected.value)) as got:
        opt = ShardedOptimizer(params, getattr(torch.optim, name), lr=1e-2, **options)
        _grads_(params, 0)
        opt.step()
    assert str(expected.value) in str(got.value)


@pytest.mark.parametrize(("name", "options"), COMPLEX_UNSUPPORTED)
def test_step_complex_unsupported_leaves_params_unchanged(name: str, options: dict[str, Any]) -> None:
    params = _complex_params()
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError):
        opt = ShardedOptimizer(params, getattr(torch.optim, name), lr=1e-2, **options)
        _grads_(params, 0)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)), "the failed step updated parameters"


# add_param_group ------------------------------------------------------------------------------------------


def _fresh(numel: int = 3) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(numel))


def _same_twice() -> dict[str, Any]:
    p = _fresh()
    return {"params": [p, p]}


ADD_PARAM_GROUP = _cases(
    pytest.param(
        lambda t: {"params": [t.model.w]},
        ValueError,
        r"params \[0\] of the new group are already in this optimizer",
        id="apg_param_already_present",
    ),
    pytest.param(lambda t: {"lr": 0.1}, ValueError, "has no 'params' key", id="apg_missing_params"),
    pytest.param(lambda t: {"params": [_fresh() * 2]}, ValueError, "is not a leaf tensor", id="apg_non_leaf"),
    pytest.param(lambda t: _same_twice(), ValueError, "is the same tensor as", id="apg_duplicate_in_group"),
    pytest.param(
        lambda t: {"params": [_fresh(), 3.0]},
        TypeError,
        r"\[1\] is a float, not a Tensor",
        id="apg_non_tensor",
    ),
    pytest.param(
        lambda t: {"params": [("extra", _fresh())]},
        ValueError,
        "all optimizer param groups should be with/without names",
        id="apg_named_into_unnamed",
    ),
    pytest.param(
        lambda t: {"params": [_meta_param()]},
        ValueError,
        r"device types \['cpu', 'meta'\] differ",
        id="apg_other_device_type",
    ),
)


@pytest.mark.parametrize(("make", "error", "match"), ADD_PARAM_GROUP)
def test_add_param_group_rejected_then_alive(make: Callable[[_Twin], Any], error: type, match: str) -> None:
    twin = _Twin()
    twin.step()
    before = _fingerprint(twin.opt)
    with pytest.raises(error, match=match):
        twin.opt.add_param_group(make(twin))
    assert _same(before, _fingerprint(twin.opt)), "the rejected add_param_group changed the optimizer"
    assert twin.alive()


# state_dict / consolidate_state_dict ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    _cases(
        "state_dict_before_consolidate",
        "state_dict_stale_after_step",
        "consolidate_to_out_of_range",
        "consolidate_to_negative",
    ),
)
def test_state_dict_call_order(case: str) -> None:
    """At world size 1 state_dict() consolidates on the spot (nothing to gather); bad targets still raise."""
    twin = _Twin()
    twin.step()
    if case == "state_dict_before_consolidate":
        assert set(twin.opt.state_dict()["state"]) == set(twin.ref.state_dict()["state"])
    elif case == "state_dict_stale_after_step":
        twin.opt.consolidate_state_dict(to=0)
        first = _clone(twin.opt.state_dict())
        twin.step()
        again = twin.opt.state_dict()  # consolidated anew, not the stale dict
        assert again["state"][0]["step"] == first["state"][0]["step"] + 1
    else:
        to = 1 if case == "consolidate_to_out_of_range" else -1
        with pytest.raises(ValueError, match=rf"to={to} is not a rank of the group \(world size 1\)"):
            twin.opt.consolidate_state_dict(to=to)
        assert twin.opt.state_dict()["state"]
    assert twin.alive()


# load_state_dict ------------------------------------------------------------------------------------------


def _valid_state_dict() -> dict[str, Any]:
    source = _Twin()
    source.step()
    source.step()
    source.opt.consolidate_state_dict(to=0)
    return source.opt.state_dict()


def _plain_state_dict(
    cls: type[torch.optim.Optimizer], options: dict[str, Any], shapes: Any
) -> dict[str, Any]:
    model = _Net(shapes)
    opt = cls(_groups(model), **options)
    _grads_(model.parameters(), 0)
    opt.step()
    return opt.state_dict()


def _moved_param(sd: dict[str, Any]) -> dict[str, Any]:
    groups = copy.deepcopy(sd["param_groups"])
    groups[1]["params"] = [groups[0]["params"].pop(), *groups[1]["params"]]
    return {"state": sd["state"], "param_groups": groups}


def _group_without_params(sd: dict[str, Any]) -> dict[str, Any]:
    groups = copy.deepcopy(sd["param_groups"])
    del groups[1]["params"]
    return {"state": sd["state"], "param_groups": groups}


LOAD_STATE_DICT = _cases(
    pytest.param(lambda sd: [sd], ValueError, "'state' and 'param_groups', got list", id="load_not_a_dict"),
    pytest.param(
        lambda sd: {"state": sd["state"]},
        ValueError,
        r"'param_groups', got \['state'\]",
        id="load_missing_keys",
    ),
    pytest.param(
        lambda sd: {**sd, "param_groups": [*sd["param_groups"], copy.deepcopy(sd["param_groups"][1])]},
        ValueError,
        "state_dict has 3 param groups but this optimizer has 2",
        id="load_wrong_group_count",
    ),
    pytest.param(
        _moved_param,
        ValueError,
        "param group 0: state_dict has 1 parameters, this optimizer 2",
        id="load_wrong_param_count",
    ),
    pytest.param(
        lambda sd: _plain_state_dict(AdamW, OPTIONS, OTHER_SHAPES),
        ValueError,
        r"state of parameter 0 key '.*' has shape \(7, 6\) but the parameter has shape \(7, 5\); .*another model",
        id="load_other_model_shapes",
    ),
    pytest.param(
        lambda sd: _plain_state_dict(SGD, SGD_OPTIONS, SHAPES),
        ValueError,
        r"options \['dampening', 'momentum', 'nesterov'\] that AdamW does not take: .*different optimizer class",
        id="load_sgd_state_into_adamw",
    ),
    pytest.param(
        lambda sd: {**sd, "state": list(sd["state"].values())},
        (TypeError, ValueError),
        "state",
        id="load_state_not_a_mapping",
    ),
    pytest.param(
        _group_without_params,
        (TypeError, ValueError),
        "params",
        id="load_group_without_params",
    ),
)


@pytest.mark.parametrize(("make", "error", "match"), LOAD_STATE_DICT)
def test_load_state_dict_rejected_then_alive(
    make: Callable[[dict[str, Any]], Any], error: type | tuple[type, ...], match: str
) -> None:
    bad = make(copy.deepcopy(_valid_state_dict()))
    as_passed = _clone(bad)
    twin = _Twin()
    twin.step()
    before = _fingerprint(twin.opt)
    with pytest.raises(error, match=match):
        twin.opt.load_state_dict(bad)
    assert _same(bad, as_passed), "load_state_dict mutated the caller's dict"
    assert _same(before, _fingerprint(twin.opt)), "the rejected load changed the optimizer"
    assert twin.alive()


@pytest.mark.parametrize("case", _cases("load_caller_dict_not_mutated"))
def test_load_state_dict_shares_nothing_with_the_caller(case: str) -> None:
    source = _Twin()
    source.step()
    source.step()
    source.opt.consolidate_state_dict(to=0)
    sd = source.opt.state_dict()
    as_passed = _clone(sd)
    twin = _Twin()
    with torch.no_grad():
        for p, q in zip(twin.model.parameters(), source.model.parameters()):
            p.copy_(q)
    twin.opt.load_state_dict(sd)
    for _ in range(2):
        _grads_(twin.model.parameters(), source.num_steps)
        twin.opt.step()
        source.step()
    assert _same(sd, as_passed), "the loaded optimizer writes into the caller's state tensors"
    assert all(torch.equal(p, q) for p, q in zip(twin.model.parameters(), source.ref_model.parameters()))


@pytest.mark.parametrize(
    "name",
    ["AdamW", "Adafactor"],
    ids=_cases("load_other_model_tensor_sharding_adamw", "load_other_model_adafactor"),
)
def test_load_other_model_under_tensor_sharding(name: str) -> None:
    cls = getattr(torch.optim, name)
    other = _plain_state_dict(cls, {"lr": 1e-2}, OTHER_SHAPES)
    opt = ShardedOptimizer(_groups(_Net()), cls, sharding="tensor", lr=1e-2)
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict(other)


# Public helpers -------------------------------------------------------------------------------------------


_FULL_ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}

HELPERS = _cases(
    pytest.param(
        lambda: shardoptim.all_reduce_metric(1.0, op="median"),
        ValueError,
        "op must be 'mean', 'sum', 'max' or 'min', got 'median'",
        id="metric_bad_op",
    ),
    pytest.param(
        lambda: shardoptim.all_reduce_metric(torch.ones(3)),
        ValueError,
        r"one-element tensor, got shape \(3,\)",
        id="metric_multi_element_tensor",
    ),
    pytest.param(
        lambda: shardoptim.init_distributed(environ={"RANK": "0"}),
        ValueError,
        r"RANK is set, so env:// is used, but it needs WORLD_SIZE, MASTER_ADDR, MASTER_PORT \(missing",
        id="init_rank_without_world_size",
    ),
    pytest.param(
        lambda: shardoptim.init_distributed(environ={"RANK": "2", "WORLD_SIZE": "2", **_FULL_ENV}),
        ValueError,
        "RANK=2 is not below WORLD_SIZE=2",
        id="init_rank_not_below_world_size",
    ),
    pytest.param(
        lambda: shardoptim.init_distributed(environ={"RANK": "0", "WORLD_SIZE": "two", **_FULL_ENV}),
        ValueError,
        "WORLD_SIZE='two' is not an integer",
        id="init_world_size_not_an_integer",
    ),
    pytest.param(
        lambda: shardoptim.init_distributed(environ={"SHARDOPTIM_LAUNCHER": "pbs"}),
        ValueError,
        "SHARDOPTIM_LAUNCHER='pbs' is not a known launcher",
        id="init_unknown_launcher",
    ),
)


@pytest.mark.parametrize(("call", "error", "match"), HELPERS)
def test_helpers_reject(call: Callable[[], Any], error: type, match: str) -> None:
    assert not dist.is_initialized()
    with pytest.raises(error, match=match):
        call()
    assert not dist.is_initialized(), "a rejected init_distributed left a process group behind"


# checkpoint.load (2 ranks) --------------------------------------------------------------------------------


def _check_save_checkpoint(
    rank: int, world_size: int, *, path: str, format_version: int | None = None
) -> None:
    twin = _Twin()
    twin.step()
    twin.step()
    old = checkpoint_save.FORMAT_VERSION
    try:
        if format_version is not None:
            checkpoint_save.FORMAT_VERSION = format_version
        checkpoint.save(path, twin.opt, model=twin.model)
    finally:
        checkpoint_save.FORMAT_VERSION = old


def _check_checkpoint_load(rank: int, world_size: int, *, path: str, case: str) -> dict[str, Any]:
    """Load a bad checkpoint into a twin that took a step; report the error and what it changed."""
    if case == "ckpt_other_optimizer_class":
        twin = _Twin(SGD, options=SGD_OPTIONS)
    else:
        twin = _Twin(shapes=OTHER_SHAPES if case == "ckpt_other_model" else SHAPES)
    twin.step()
    extra = None
    if case == "ckpt_missing_extra":
        extra = {"sched": torch.optim.lr_scheduler.StepLR(twin.opt, step_size=2)}
    before = _fingerprint(twin.opt)
    model_before = _snapshot(twin.model)
    try:
        checkpoint.load(path, twin.opt, model=twin.model, extra=extra)
        error, message = "", ""
    except Exception as err:
        error, message = type(err).__name__, str(err)
    unchanged = _same(before, _fingerprint(twin.opt)) and all(
        torch.equal(p, value) for p, (_, value) in zip(twin.model.parameters(), model_before)
    )
    return {"error": error, "message": message, "unchanged": unchanged, "alive": twin.alive()}


@pytest.fixture(scope="module")
def good_checkpoint(ranks2: RankPool, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad_inputs") / "good"
    ranks2.run(_check_save_checkpoint, path=str(path))
    return path


def _prepare_checkpoint(case: str, good: Path, tmp_path: Path, pool: RankPool) -> Path:
    """Return the path to load for `case` (a damaged copy of the good checkpoint, or another path)."""
    path = tmp_path / "ckpt"
    if case == "ckpt_missing_path":
        return path
    if case == "ckpt_path_is_file":
        path.write_text("not a checkpoint\n")
        return path
    if case == "ckpt_newer_format":
        pool.run(_check_save_checkpoint, path=str(path), format_version=checkpoint_format.FORMAT_VERSION + 1)
        return path
    shutil.copytree(good, path)
    if case == "ckpt_incomplete":
        (path / "COMPLETE").unlink()
    elif case == "ckpt_truncated":
        for file in path.glob("*.distcp"):
            data = file.read_bytes()
            file.write_bytes(data[: len(data) // 2])
    elif case == "ckpt_no_metadata":
        (path / ".metadata").unlink()
    return path


CHECKPOINT_LOAD = _cases(
    pytest.param(FileNotFoundError, r"no checkpoint at .*ckpt", id="ckpt_missing_path"),
    pytest.param(ValueError, r"is incomplete \(no COMPLETE marker\)", id="ckpt_incomplete"),
    pytest.param(ValueError, "not a shardoptim checkpoint directory", id="ckpt_path_is_file"),
    pytest.param(ValueError, "corrupt or truncated", id="ckpt_truncated"),
    pytest.param(ValueError, "cannot read its metadata", id="ckpt_no_metadata"),
    pytest.param(
        ValueError,
        f"has format version {checkpoint_format.FORMAT_VERSION + 1}, newer than this shardoptim reads",
        id="ckpt_newer_format",
    ),
    pytest.param(
        ValueError,
        r"is of another model: .*parameter 0 is emb \(7, 5\) in the checkpoint, emb \(7, 6\) here",
        id="ckpt_other_model",
    ),
    pytest.param(ValueError, "holds AdamW state, but this optimizer is SGD", id="ckpt_other_optimizer_class"),
    pytest.param(
        ValueError,
        r"has no extras \['sched'\] \(it has \[\]\)",
        id="ckpt_missing_extra",
    ),
)


@pytest.mark.parametrize(("error", "match"), CHECKPOINT_LOAD)
def test_checkpoint_load_rejected_then_alive(
    ranks2: RankPool,
    good_checkpoint: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    error: type,
    match: str,
) -> None:
    case = request.node.callspec.id
    path = _prepare_checkpoint(case, good_checkpoint, tmp_path, ranks2)
    for rank, result in enumerate(ranks2.run(_check_checkpoint_load, path=str(path), case=case)):
        assert result["error"] == error.__name__, f"rank {rank}: {result}"
        assert re.search(match, result["message"]), f"rank {rank}: {result['message']}"
        assert result["unchanged"], f"rank {rank}: the rejected load changed the optimizer or the model"
        assert result["alive"], f"rank {rank}: the optimizer no longer matches the reference"


# Cases that need a process group (2 ranks) ----------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[str, str]:
    try:
        call()
    except Exception as err:
        return type(err).__name__, str(err)
    return "", ""


def _check_distributed_case(rank: int, world_size: int, *, case: str) -> dict[str, Any]:
    """Run one bad call on every rank; report each rank's error, whether it changed anything, and a step."""
    twin = _Twin(hparam_sync="check" if case == "hparam_check_mismatch" else "broadcast")
    twin.step()
    before = _fingerprint(twin.opt)
    if case == "apg_different_groups_on_ranks":
        outcome = _outcome(lambda: twin.opt.add_param_group({"params": [_fresh(3 + rank)]}))
    elif case == "consolidate_to_out_of_range_2_ranks":
        outcome = _outcome(lambda: twin.opt.consolidate_state_dict(to=world_size))
    else:
        assert case == "hparam_check_mismatch"
        twin.opt.param_groups[1]["lr"] = 3e-3 * (1 + rank)
        _grads_(twin.model.parameters(), 99)
        outcome = _outcome(twin.opt.step)
        twin.opt.param_groups[1]["lr"] = 3e-3
    return {
        "error": outcome[0],
        "message": outcome[1],
        "unchanged": _same(before, _fingerprint(twin.opt)),
        "alive": twin.alive(),
    }


DISTRIBUTED = _cases(
    pytest.param(
        ValueError,
        r"add_param_group got different groups on different ranks",
        id="apg_different_groups_on_ranks",
    ),
    pytest.param(
        ValueError,
        r"to=2 is not a rank of the group \(world size 2\)",
        id="consolidate_to_out_of_range_2_ranks",
    ),
    pytest.param(
        RuntimeError,
        r"hparam_sync='check': param_groups\[1\]\['lr'\] differs across ranks \(rank 0: 0.003, rank 1: 0.006\)",
        id="hparam_check_mismatch",
    ),
)


@pytest.mark.parametrize(("error", "match"), DISTRIBUTED)
def test_distributed_bad_input_rejected_on_every_rank(
    ranks2: RankPool, request: pytest.FixtureRequest, error: type, match: str
) -> None:
    case = request.node.callspec.id
    for rank, result in enumerate(ranks2.run(_check_distributed_case, case=case)):
        assert result["error"] == error.__name__, f"rank {rank}: {result}"
        assert re.search(match, result["message"]), f"rank {rank}: {result['message']}"
        assert result["unchanged"], f"rank {rank}: the rejected call changed the optimizer"
        assert result["alive"], f"rank {rank}: the optimizer no longer matches the reference"


def _check_muon_1d_param(rank: int, world_size: int) -> tuple[str, str]:
    model = _Net()
    return _outcome(lambda: ShardedOptimizer([model.w, model.b], torch.optim.Muon, lr=0.1))


@pytest.mark.parametrize("case", _cases("muon_1d_param_2_ranks"))
def test_base_optimizer_rejection_on_every_rank(ranks2: RankPool, case: str) -> None:
    for rank, (error, message) in enumerate(ranks2.run(_check_muon_1d_param)):
        assert error == "ValueError" and "Muon only supports 2D parameters" in message, (
            f"rank {rank}: {error}"
        )


def _check_one_owner_fails_step(rank: int, world_size: int, *, case: str) -> tuple[str, str, float]:
    """Build and step a model whose bad tensor lives on one rank only, on a group with a short timeout.

    Returns this rank's error (type and message, "" if none) and the seconds its step took.
    """
    group = dist.new_group(timeout=timedelta(seconds=SHORT_PG_TIMEOUT_S))
    error, message, start = "", "", time.monotonic()
    try:
        torch.manual_seed(0)
        if case == "sparse_grad_owned_by_one_rank":
            emb = torch.nn.Embedding(4, 2, sparse=True)  # 8 elements: all in rank 0's range
            lin = torch.nn.Linear(64, 64)
            opt = ShardedOptimizer([*emb.parameters(), *lin.parameters()], SGD, process_group=group, lr=0.1)
            (emb(torch.tensor([1, 2])).sum() + lin(torch.ones(64)).sum()).backward()
        else:
            params = [_complex_param(), torch.nn.Parameter(torch.randn(4, 4))]  # one whole tensor per rank
            opt = ShardedOptimizer(params, torch.optim.Adafactor, process_group=group, lr=1e-2)
            _grads_(params, 0)
        start = time.monotonic()
        opt.step()
    except Exception as err:
        error, message = type(err).__name__, str(err)
    seconds = time.monotonic() - start
    try:
        dist.barrier()  # NOTE: keep the group open until every rank is done with it
    finally:
        dist.destroy_process_group(group)
    return error, message, seconds


@pytest.mark.parametrize(
    ("error", "match"),
    _cases(
        pytest.param(TypeError, "sparse gradient.*sharding='tensor'", id="sparse_grad_owned_by_one_rank"),
        pytest.param(
            RuntimeError, "does not support complex parameters", id="complex_param_owned_by_one_rank"
        ),
    ),
)
def test_step_error_on_one_owner_reaches_every_rank(
    ranks2: RankPool, request: pytest.FixtureRequest, error: type, match: str
) -> None:
    case = request.node.callspec.id
    for rank, (name, message, seconds) in enumerate(ranks2.run(_check_one_owner_fails_step, case=case)):
        assert name == error.__name__ and re.search(match, message), f"rank {rank}: {name}: {message}"
        assert seconds < SHORT_PG_TIMEOUT_S / 2, (
            f"rank {rank} needed {seconds:.1f} s (a timeout, not a check)"
        )


# Count ----------------------------------------------------------------------------------------------------


def test_at_least_25_distinct_bad_inputs() -> None:
    duplicates = sorted({case for case in CASE_IDS if CASE_IDS.count(case) > 1})
    assert not duplicates, f"case ids registered twice: {duplicates}"
    assert len(CASE_IDS) >= 25, f"only {len(CASE_IDS)} bad inputs: {CASE_IDS}"
