"""Stage 2, master weights, clipping and inf/nan handling in one process (no process group).

At world size 1 the reduce-scatter is the identity and the gradient shards hold exactly the
accumulated gradients, so stage 2 must be bitwise torch.optim, micro-batches and no_sync included.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from shardoptim import ShardedGradScaler, ShardedOptimizer


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 29), torch.nn.Tanh(), torch.nn.Linear(29, 3), torch.nn.Linear(3, 2)
    ).to(dtype)


def _loss(model: torch.nn.Module, step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + micro)
    x = torch.randn(6, 13, generator=gen)
    return model(x.to(next(model.parameters()).dtype)).float().pow(2).mean()


@pytest.mark.parametrize(
    "cls_name,opts",
    [
        ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
        ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
        ("Adagrad", dict(lr=0.1)),
        ("RMSprop", dict(lr=1e-2, centered=True)),
        ("Adafactor", dict(lr=1e-2)),
    ],
)
def test_stage2_bitwise_at_world_size_1(cls_name: str, opts: dict[str, Any]) -> None:
    model = _model()
    ref = copy.deepcopy(model)
    cls = getattr(torch.optim, cls_name)
    opt = ShardedOptimizer(model.parameters(), cls, stage=2, bucket_numel=300, **opts)
    ref_opt = cls(
        ref.parameters(), **dict(opts, **{k: v for k, v in opt.defaults.items() if k in ("fused", "foreach")})
    )
    for step in range(4):
        for micro in range(3):
            with opt.no_sync() if micro == 0 else torch.enable_grad():
                _loss(model, step, micro).backward()
            _loss(ref, step, micro).backward()
        assert all(p.grad is None for p in model.parameters()) == (step >= 0)
        torch.testing.assert_close(
            opt.clip_grad_norm_(0.7), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.7), rtol=0, atol=0
        )
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q), (cls_name, step)


def test_no_sync_only_steps_reduce_at_step() -> None:
    model = _model()
    ref = copy.deepcopy(model)
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, foreach=opt.defaults["foreach"])
    with opt.no_sync():
        for micro in range(3):
            _loss(model, 0, micro).backward()
    assert all(p.grad is not None for p in model.parameters())  # accumulated locally, in full
    for micro in range(3):
        _loss(ref, 0, micro).backward()
    opt.step()
    ref_opt.step()
    assert all(p.grad is None for p in model.parameters())
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_unfrozen_parameters_get_hooked_later() -> None:
    model = _model()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m[0].weight.requires_grad_(False)
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for step in range(4):
        if step == 2:
            model[0].weight.requires_grad_(True)
            ref[0].weight.requires_grad_(True)
        _loss(model, step, 0).backward()
        _loss(ref, step, 0).backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q), step


def test_master_copies_follow_weights_written_after_construction() -> None:
    model = _model(torch.bfloat16)
    opt = ShardedOptimizer(
        model.parameters(), torch.optim.AdamW, master_dtype=torch.float32, stage=2, lr=1e-2
    )
    numel = sum(p.numel() for p in model.parameters())
    assert (
        4 * numel <= opt.memory_nbytes()["master"] <= 4 * (numel + 64 * 6)
    )  # + 64-element alignment per param
    _loss(model, 0, 0).backward()
    opt.step()
    opt.zero_grad()
    loaded = copy.deepcopy(model)
    torch.nn.init.normal_(loaded[0].weight)
    model.load_state_dict(loaded.state_dict())  # writes the weights behind the optimizer's back
    twin = copy.deepcopy(model)
    twin_opt = ShardedOptimizer(
        twin.parameters(), torch.optim.AdamW, master_dtype=torch.float32, stage=2, lr=1e-2
    )
    twin_opt.load_state_dict(_consolidated(opt))
    for m, o in ((model, opt), (twin, twin_opt)):
        _loss(m, 1, 0).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def _consolidated(opt: ShardedOptimizer) -> dict[str, Any]:
    opt.consolidate_state_dict(to=0)
    state = copy.deepcopy(opt.state_dict())
    for entry in state["state"].values():
        entry.pop("master_param", None)  # the twin takes its masters from its (loaded) weights
    return state


def test_master_weights_hold_fp32_precision() -> None:
    model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, master_dtype=torch.float32, lr=1e-4)
    for _ in range(100):
        model.weight.grad = torch.ones_like(model.weight)
        opt.step()
    # each update (1e-4) is below half a bf16 ulp at 1.0 (2^-8): only the fp32 master accumulates them
    assert opt.optim.param_groups[0]["params"][0].dtype == torch.float32
    assert model.weight.float().max().item() == pytest.approx(0.99, abs=2**-8)
    opt.consolidate_state_dict()
    master = opt.state_dict()["state"][0]["master_param"]
    assert master.dtype == torch.float32 and master.max().item() == pytest.approx(0.99, rel=1e-5)


def test_skip_nonfinite_leaves_everything_unchanged() -> None:
    model = _model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, skip_nonfinite=True, lr=1e-2)
    _loss(model, 0, 0).backward()
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    steps = [s["step"].item() for s in opt.optim.state.values()]
    (_loss(model, 1, 0) * float("inf")).backward()
    opt.step()
    assert opt.last_step_skipped and opt.num_skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [s["step"].item() for s in opt.optim.state.values()] == steps


def test_clip_grad_norm_errors() -> None:
    model = _model()
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1)
    _loss(model, 0, 0).backward()
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        opt.clip_grad_norm_(1.0, norm_type=0)
    with pytest.raises(TypeError, match="norm_type must be a number"):
        opt.clip_grad_norm_(1.0, norm_type="two")  # type: ignore[arg-type]
    opt.zero_grad()
    (_loss(model, 0, 0) * float("nan")).backward()
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert math.isnan(opt.clip_grad_norm_(1.0).item())


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(stage=3), ValueError, "stage must be 1"),
        (dict(stage=True), ValueError, "stage must be 1"),
        (dict(master_dtype=torch.bfloat16), TypeError, "master_dtype must be torch.float32"),
        (dict(master_dtype="float32"), TypeError, "master_dtype must be torch.float32"),
        (dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite must be True or False"),
        (dict(comm_backend="nccl"), ValueError, "comm_backend must be one of"),
        (dict(bucket_numel=0, stage=2), ValueError, "bucket_numel must be a positive int"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ShardedOptimizer(_model().parameters(), torch.optim.AdamW, **options)


def test_unsupported_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="sharded LBFGS supports stage=1"):
        ShardedOptimizer(_model().parameters(), torch.optim.LBFGS, stage=2)
    with pytest.raises(ValueError, match="SparseAdam needs sparse gradients"):
        ShardedOptimizer([torch.nn.Parameter(torch.randn(3, 2))], torch.optim.SparseAdam, stage=2)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ShardedOptimizer(emb.parameters(), torch.optim.SGD, stage=2, lr=0.1)
    with pytest.raises(TypeError, match="sparse gradient, which stage=2 cannot reduce-scatter"):
        emb(torch.tensor([1, 2])).sum().backward()
    del opt


def test_no_sync_at_stage_1_warns() -> None:
    opt = ShardedOptimizer(_model().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.warns(UserWarning, match="no effect at stage=1"), opt.no_sync():
        pass


def test_grad_scaler_refuses_fp16_gradients_without_master() -> None:
    model = torch.nn.Linear(4, 2).half()
    opt = ShardedOptimizer(model.parameters(), torch.optim.SGD, stage=2, lr=0.1)
    scaler = ShardedGradScaler("cpu")
    scaler.scale(model(torch.randn(3, 4).half()).float().sum()).backward()
    with pytest.raises(ValueError, match="master_dtype=torch.float32"):
        scaler.unscale_(opt)


def test_released_buckets_are_pooled_by_bytes() -> None:
    """The pool keeps the largest released bucket always, and more only within POOL_NBYTES."""
    from shardoptim import grads
    from shardoptim.bufpool import BufferPool

    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
    opt = ShardedOptimizer(model.parameters(), torch.optim.AdamW, stage=2, bucket_numel=64 * 65)
    reducer = opt._reducer
    assert reducer is not None and len(reducer._buckets) >= 2
    bucket = reducer._buckets[0]
    nbytes = bucket.numel * 4
    for pool_nbytes, kept in ((0, 1), (nbytes, 1), (2 * nbytes, 2), (10 * nbytes, grads.POOL_SIZE)):
        pool = BufferPool(max_nbytes=pool_nbytes, max_count=grads.POOL_SIZE)  # as the reducer builds its own
        for _ in range(3):
            pool.give_back(torch.empty(bucket.numel))
        assert len(pool.tensors()) == kept, pool_nbytes
    for _ in range(2):  # and training still runs with the pool bounded
        model(torch.randn(3, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(reducer._pool.tensors()) <= grads.POOL_SIZE  # one dtype and device here
