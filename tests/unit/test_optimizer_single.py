"""ShardedOptimizer in one process without torch.distributed: construction rules and errors."""

from __future__ import annotations

import copy

import pytest
import torch

import shardoptim
from shardoptim import ShardedOptimizer
from shardoptim.kinds import resolve_impl_flags, resolve_kind


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


@pytest.mark.parametrize("as_view", [False, True])
def test_single_process_matches_torch_and_storage_mode(as_view: bool) -> None:
    model, ref = _model(), _model()
    before = [p.data_ptr() for p in model.parameters()]
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, parameters_as_bucket_view=as_view, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    buffer = opt.placement.buckets[0].buffer
    if as_view:
        assert buffer is not None
        for p in model.parameters():
            assert buffer.data_ptr() <= p.data_ptr() < buffer.data_ptr() + buffer.numel() * 4
    else:  # own storage: the parameters keep the storage they came with, and no bucket copy exists
        assert buffer is None and [p.data_ptr() for p in model.parameters()] == before
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(ptrs) == (1 if as_view else 4)  # own storage: no two parameters share one
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(torch.ones(4, 8)).sum().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_defaults_merged_for_schedulers() -> None:
    opt = ShardedOptimizer(_model().parameters(), torch.optim.Adam, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.999)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert opt.param_groups[0]["fused"] is True
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["betas"][0] != 0.9 or opt.param_groups[0]["lr"] != 1e-3


def test_impl_flags() -> None:
    p = [torch.zeros(3)]
    assert resolve_impl_flags(torch.optim.AdamW, {}, [{"params": p}]) == {"fused": True}
    assert resolve_impl_flags(torch.optim.NAdam, {}, [{"params": p}]) == {"foreach": True}
    assert resolve_impl_flags(torch.optim.AdamW, {"foreach": True}, [{"params": p}]) == {"foreach": True}
    assert resolve_impl_flags(torch.optim.AdamW, {"fused": False}, [{"params": p}]) == {"fused": False}
    assert resolve_impl_flags(torch.optim.AdamW, {}, [{"params": p, "foreach": False}]) == {}
    # An explicit None is a choice too: the class picks, as a plain AdamW(params) does.
    assert resolve_impl_flags(torch.optim.AdamW, {"fused": None}, [{"params": p}]) == {"fused": None}
    assert resolve_impl_flags(torch.optim.AdamW, {}, [{"params": [torch.zeros(2, dtype=torch.int64)]}]) == {
        "foreach": True
    }
    assert resolve_impl_flags(torch.optim.LBFGS, {}, [{"params": p}]) == {}


def test_user_choice_respected() -> None:
    opt = ShardedOptimizer(_model().parameters(), torch.optim.AdamW, lr=1e-3, foreach=False)
    assert opt.optim.param_groups[0]["foreach"] is False
    assert opt.optim.param_groups[0]["fused"] is None


def test_auto_kinds(caplog: pytest.LogCaptureFixture) -> None:
    for name in ("SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Rprop", "ASGD", "NAdam", "RAdam"):
        assert resolve_kind(getattr(torch.optim, name), "auto") == "flat", name
    for name in ("Adafactor", "Muon", "SparseAdam"):
        assert resolve_kind(getattr(torch.optim, name), "auto") == "tensor", name
    assert resolve_kind(torch.optim.LBFGS, "auto") == "lbfgs"

    class Mine(torch.optim.SGD):
        pass

    assert resolve_kind(Mine, "auto") == "tensor"  # unknown: ShardedOptimizer probes it (test_probe.py)
    shardoptim.register_elementwise(Mine)
    assert resolve_kind(Mine, "auto") == "flat"
    shardoptim.register_per_tensor(Mine)
    assert resolve_kind(Mine, "auto") == "tensor"


def test_error_param_listed_twice() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"same tensor as param_groups\[0\]\['params'\]\[0\]"):
        ShardedOptimizer([w, w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="same tensor"):
        ShardedOptimizer([{"params": [w]}, {"params": [w]}], torch.optim.SGD, lr=0.1)


def test_error_mixed_device_types() -> None:
    with pytest.raises(ValueError, match=r"different device types \['cpu', 'meta'\]"):
        ShardedOptimizer(
            [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))],
            torch.optim.SGD,
            lr=0.1,
        )


def test_error_not_an_optimizer_class() -> None:
    with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
        ShardedOptimizer(_model().parameters(), torch.nn.Linear, lr=0.1)  # type: ignore[arg-type]
    opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="not an instance"):
        ShardedOptimizer(_model().parameters(), opt, lr=0.1)  # type: ignore[arg-type]


def test_error_flat_forced_on_whole_tensor_optimizer() -> None:
    with pytest.raises(ValueError, match="sharding='flat' would silently compute wrong updates for Adafactor"):
        ShardedOptimizer(_model().parameters(), torch.optim.Adafactor, sharding="flat", lr=0.01)


def test_error_bad_options() -> None:
    with pytest.raises(ValueError, match="sharding must be one of"):
        ShardedOptimizer(_model().parameters(), torch.optim.SGD, sharding="rows", lr=0.1)
    with pytest.raises(ValueError, match="hparam_sync must be one of"):
        ShardedOptimizer(_model().parameters(), torch.optim.SGD, hparam_sync="sometimes", lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_numel must be a positive int"):
        ShardedOptimizer(_model().parameters(), torch.optim.SGD, bucket_numel=0, lr=0.1)


def test_error_storage_replaced_after_build() -> None:
    model = _model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    model.double()
    model(torch.ones(1, 8, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="Build the ShardedOptimizer after moving or casting the model"):
        opt.step()


@pytest.mark.parametrize("as_view", [False, True])
def test_moved_parameters_are_rebound_at_the_next_step(as_view: bool) -> None:
    """Trainer and Accelerate call model.to(cpu:0) after the optimizer is built: it copies every tensor."""
    model, ref = _model(), _model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, parameters_as_bucket_view=as_view, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for step in range(3):
        if step == 1:
            old = [p.data_ptr() for p in model.parameters()]
            model.to(torch.device("cpu", 0))
            assert all(p.data_ptr() != q for p, q in zip(model.parameters(), old))
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(torch.ones(4, 8)).sum().backward()
            o.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    homes = [piece.local for piece in opt.placement.pieces]  # views into the bucket, or into each parameter's home
    for p, home in zip(model.parameters(), homes):
        assert p.untyped_storage().data_ptr() == home.untyped_storage().data_ptr()
    if not as_view:  # pointed back at the storage they had at construction (the pieces' homes)
        assert [p.data_ptr() for p in model.parameters()] == old


def test_bad_lr_surfaces_and_model_untouched() -> None:
    model = _model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=-1.0)
    assert ptrs == [p.data_ptr() for p in model.parameters()]


def test_bad_params() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        ShardedOptimizer([], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="not a Tensor"):
        ShardedOptimizer([1.0], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="single Tensor"):
        ShardedOptimizer(torch.zeros(2), torch.optim.SGD, lr=0.1)
    leaf = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf tensor"):
        ShardedOptimizer([leaf * 2], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="has no 'params' key"):
        ShardedOptimizer([{"lr": 0.1}], torch.optim.SGD, lr=0.1)


def test_named_parameters_accepted() -> None:
    model = _model()
    opt = ShardedOptimizer(model.named_parameters(), torch.optim.SGD, lr=0.1)
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    model(torch.ones(2, 8)).sum().backward()
    opt.step()


@pytest.mark.parametrize(("sharding", "stage"), [("flat", 1), ("tensor", 1), ("flat", 2)])
def test_whole_parameters_are_updated_as_themselves_at_stage_1(sharding: str, stage: int) -> None:
    """Stage 1: a wholly owned parameter (whole-tensor sharding, or 1-D in the flat layout) is the local
    optimizer's own tensor, so its `.grad` is the user's, untouched by the step; an n-D flat piece is a view.
    Stage 2 updates views of the gradient shards only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    ref = copy.deepcopy(model)
    cls = torch.optim.Adafactor if sharding == "tensor" else torch.optim.AdamW
    opt = ShardedOptimizer(model.parameters(), cls, lr=1e-2, sharding=sharding, stage=stage)
    ref_opt = cls(ref.parameters(), lr=1e-2, **({} if sharding == "tensor" else {"fused": True}))
    params = list(model.parameters())
    is_param = {piece.index: piece.is_param for piece in opt.placement.pieces}
    if stage == 2:
        assert not any(is_param.values())
    else:
        expected = {i: sharding == "tensor" or p.dim() == 1 for i, p in enumerate(params)}
        assert is_param == expected
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for net in (model, ref):
            net(x).square().mean().backward()
        grads = [p.grad for p in params]
        opt.step()
        ref_opt.step()
        if stage == 1:  # the very same gradient tensors, none cleared by the step
            assert all(p.grad is g for p, g in zip(params, grads))
        for p, q in zip(params, ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0 if sharding == "flat" else 1e-6)
        opt.zero_grad()
        ref_opt.zero_grad()


def test_frozen_parameter_keeps_its_gradient_and_value() -> None:
    """A parameter that no longer requires grad is not updated (its bucket is not gathered) but its
    `.grad` survives the step, also when the parameter is the local optimizer's own tensor."""
    bias = torch.nn.Parameter(torch.ones(4))
    weight = torch.nn.Parameter(torch.ones(4, 4))
    opt = ShardedOptimizer([{"params": [bias]}, {"params": [weight]}], torch.optim.SGD, lr=0.5, bucket_numel=4)
    assert any(piece.is_param for piece in opt.placement.pieces)
    bias.requires_grad_(False)
    grad = torch.ones(4)
    bias.grad = grad
    weight.grad = torch.ones(4, 4)
    opt.step()
    assert bias.grad is grad and torch.equal(bias, torch.ones(4))
    assert torch.equal(weight, torch.full((4, 4), 0.5))


def test_non_contiguous_1d_parameter_is_updated_through_a_view() -> None:
    """A strided 1-D parameter is not taken as the local optimizer's own tensor (its home is a contiguous
    copy it is re-bound to); the step still matches torch's."""
    strided = torch.nn.Parameter(torch.arange(16.0)[::2])
    plain = torch.nn.Parameter(torch.arange(8.0))
    ref = [torch.nn.Parameter(strided.detach().clone()), torch.nn.Parameter(plain.detach().clone())]
    assert not strided.is_contiguous()
    opt = ShardedOptimizer([strided, plain], torch.optim.AdamW, lr=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, fused=True)
    assert [piece.is_param for piece in opt.placement.pieces] == [False, True]
    for step in range(3):
        for p, q in zip((strided, plain), ref):
            p.grad = torch.full((8,), float(step + 1))
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip((strided, plain), ref):
            assert torch.equal(p, q)
