"""`compile=`: the base step over each rank's slice runs as a compiled graph, once per layout.

Two gloo ranks (four for hybrid sharding), tiny models. Every rank feeds the same batch, so the gradients are already their
own average (no DDP needed). Inductor (compile=True) runs only the parity cases of AdamW and Lion,
whose tolerances the README states; the other cases use the "aot_eager" backend, which goes
through the same dynamo tracing and AOT scalar handling (a python-float lr recompiles there too)
without building C++, to keep the file fast.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from shardoptim import ShardedOptimizer
from tests._dist import all_equal_across_ranks

AOT: dict[str, Any] = {"backend": "aot_eager"}
#: Largest difference from eager over the runs below (parameters of magnitude about 1, lr <= 1e-2,
#: 8 steps): torch AdamW compiled takes its capturable path (bias corrections as float32 tensors).
TOLERANCE = {"AdamW": 2e-6, "Lion": 1e-7}


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).to(dtype)


def _backward(model: torch.nn.Module, i: int, *, poison: bool = False) -> None:
    gen = torch.Generator().manual_seed(10 + i)
    x = torch.randn(8, 12, generator=gen).to(next(model.parameters()).dtype)
    if poison:
        x[0, 0] = float("inf")
    model(x).float().square().mean().backward()


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name == "Lion":
        import pytorch_optimizer

        return pytorch_optimizer.Lion  # type: ignore[no-any-return]
    if name == "AdamWScheduleFree":
        import schedulefree

        return schedulefree.AdamWScheduleFree  # type: ignore[no-any-return]
    return getattr(torch.optim, name)  # type: ignore[no-any-return]


def _options(name: str) -> dict[str, Any]:
    if name == "AdamW":
        return {"lr": 1e-2, "weight_decay": 0.1, "foreach": True}
    if name == "Lion":
        return {"lr": 1e-3, "weight_decay": 0.1}
    return {"lr": 1e-2, "warmup_steps": 2}


def _train(
    name: str, compile: Any, *, steps: int, model: torch.nn.Module | None = None, **options: Any
) -> tuple[torch.nn.Module, ShardedOptimizer, list[tuple[int, int]]]:
    """Train `steps` steps with StepLR (lr x0.8 every step); return the model, optimizer, counts per step."""
    model = _model() if model is None else model
    opt = ShardedOptimizer(
        model.parameters(), _optimizer_class(name), compile=compile, **_options(name), **options
    )
    if hasattr(opt, "train"):
        opt.train()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
    counts = []
    for i in range(steps):
        _backward(model, i)
        opt.step()
        opt.zero_grad()
        sched.step()
        counts.append((opt.compiled_update.num_compiles, opt.compiled_update.num_graph_runs))
    return model, opt, counts


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        (x.detach().float() - y.detach().float()).abs().max().item()
        for x, y in zip(a.parameters(), b.parameters())
    )


def _check_matches_eager(rank: int, world_size: int, *, name: str, steps: int) -> dict[str, Any]:
    eager, eager_opt, _ = _train(name, False, steps=steps)
    compiled, opt, counts = _train(name, True, steps=steps)
    return {
        "diff": _max_diff(eager, compiled),
        "counts": counts,
        "compiles": opt.compiled_update.compiles,
        "same_lr": [g["lr"] for g in opt.param_groups] == [g["lr"] for g in eager_opt.param_groups],
        "plain_groups": all(
            not isinstance(v, torch.Tensor)
            for g in (*opt.param_groups, *opt.optim.param_groups)
            for v in g.values()
        ),
        "replicas": all(all_equal_across_ranks(p) for p in compiled.parameters()),
    }


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_compiled_update_matches_eager_without_recompiles(ranks2: Any, name: str) -> None:
    steps = 8
    for out in ranks2.run(_check_matches_eager, name=name, steps=steps):
        assert out["compiles"], out
        compiles = [c for c, _ in out["counts"]]
        runs = [r for _, r in out["counts"]]
        # warm-up: the first call creates the state, the second meets it (and Lion's int step
        # counter goes dynamic at the third); then no compilation while the lr changes every step
        assert compiles[-1] <= 4 and compiles[3:] == [compiles[3]] * (steps - 3), out
        assert all(b > a for a, b in zip(runs, runs[1:])), out  # a compiled graph ran every step
        assert out["diff"] <= TOLERANCE[name], out
        assert out["same_lr"] and out["plain_groups"] and out["replicas"], out


def _check_schedule_free(rank: int, world_size: int) -> dict[str, Any]:
    eager, _, _ = _train("AdamWScheduleFree", False, steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, opt, counts = _train("AdamWScheduleFree", True, steps=4)
    messages = [str(w.message) for w in caught if "compile=True" in str(w.message)]
    return {
        "messages": messages,
        "exact": _max_diff(eager, compiled) == 0.0,
        "compiles": opt.compiled_update.compiles,
        "plain_groups": all(not isinstance(v, torch.Tensor) for g in opt.param_groups for v in g.values()),
    }


def test_schedule_free_falls_back_with_one_warning(ranks2: Any) -> None:
    # schedule-free computes lr_max = max(lr, lr_max) and its interpolation weights as Python floats
    # every step and passes them to foreach ops: dynamo compiles none of it (see README)
    for out in ranks2.run(_check_schedule_free):
        assert len(out["messages"]) == 1 and "AdamWScheduleFree" in out["messages"][0], out
        assert out["exact"] and not out["compiles"] and out["plain_groups"], out


class _DisabledSGD(torch.optim.SGD):
    """SGD whose step dynamo must not trace."""

    @torch._dynamo.disable  # type: ignore[untyped-decorator]
    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    raise RuntimeError("this backend cannot compile anything")


def _check_fallback(rank: int, world_size: int, *, case: str) -> dict[str, Any]:
    import torch._dynamo

    if "shardoptim_test_fails" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(name="shardoptim_test_fails")(_failing_backend)
    cls: type[torch.optim.Optimizer] = _DisabledSGD if case == "disabled" else torch.optim.SGD
    compile = {"backend": "shardoptim_test_fails"} if case == "raises" else AOT
    results = []
    messages: list[str] = []
    for option in (False, compile):
        model = _model()
        opt = ShardedOptimizer(model.parameters(), cls, lr=0.1, momentum=0.9, foreach=True, compile=option)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(8):
                if case == "recompiles":  # a float option other than lr changes every step
                    opt.param_groups[0]["momentum"] = 0.9 - 0.01 * i
                _backward(model, i)
                opt.step()
                opt.zero_grad()
        results.append(model)
        messages += [str(w.message) for w in caught if "compile=True" in str(w.message)]
    return {
        "messages": messages,
        "diff": _max_diff(*results),
        "reason": opt.compiled_update.fallback_reason,
        "compiles": opt.compiled_update.num_compiles,
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("disabled", "compiled no graph"),
        ("raises", "raised"),
        ("recompiles", "recompiled 3 times after warm-up"),
    ],
)
def test_uncompilable_class_falls_back_with_one_warning(ranks2: Any, case: str, reason: str) -> None:
    for out in ranks2.run(_check_fallback, case=case):
        assert len(out["messages"]) == 1, out
        assert reason in out["reason"] and "SGD" in out["messages"][0], out
        if case == "recompiles":  # compiled until the fallback: SGD's tensor-lr arithmetic, then eager
            assert out["diff"] <= 1e-6, out
        else:
            assert out["diff"] == 0.0, out


def _lr(i: int) -> float:
    return 1e-2 * 0.8**i


def _steps(model: torch.nn.Module, opt: Any, first: int, last: int) -> None:
    for i in range(first, last):
        for group in opt.param_groups:
            group["lr"] = _lr(i)
        _backward(model, i)
        opt.step()
        opt.zero_grad()


def _check_resume(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    options = _options("AdamW")
    whole = _model()
    whole_opt = ShardedOptimizer(whole.parameters(), torch.optim.AdamW, compile=AOT, **options)
    _steps(whole, whole_opt, 0, 6)

    first = _model()
    first_opt = ShardedOptimizer(first.parameters(), torch.optim.AdamW, compile=AOT, **options)
    _steps(first, first_opt, 0, 3)
    sd = first_opt.full_state_dict(to=0)
    box = [sd]
    dist.broadcast_object_list(box, src=0)
    sd = box[0]
    assert sd is not None
    step = sd["state"][0]["step"]
    in_format = (
        isinstance(step, torch.Tensor)
        and step.dtype == torch.float32
        and step.shape == ()
        and float(step) == 3.0
        and isinstance(sd["param_groups"][0]["lr"], float)
        and sd["param_groups"][0]["capturable"] is False
    )

    plain = _model()
    plain.load_state_dict(first.state_dict())
    plain_opt = torch.optim.AdamW(plain.parameters(), **options)
    plain_opt.load_state_dict(copy.deepcopy(sd))  # NOTE: torch's load keeps the `step` tensors it is given
    _steps(plain, plain_opt, 3, 6)

    resumed = _model()
    resumed.load_state_dict(first.state_dict())
    resumed_opt = ShardedOptimizer(resumed.parameters(), torch.optim.AdamW, compile=AOT, **options)
    resumed_opt.load_state_dict(sd)
    _steps(resumed, resumed_opt, 3, 6)
    return {
        "in_format": in_format,
        "plain_diff": _max_diff(plain, whole),
        "resumed_diff": _max_diff(resumed, whole),
        "compiles": resumed_opt.compiled_update.compiles,
    }


def test_resume_from_compiled_checkpoint(ranks2: Any) -> None:
    for out in ranks2.run(_check_resume):
        assert out["in_format"] and out["compiles"], out
        assert out["resumed_diff"] <= TOLERANCE["AdamW"], out
        assert out["plain_diff"] <= TOLERANCE["AdamW"], out


def _rebind_run(compile: Any, *, bucket_view: bool) -> tuple[torch.nn.Module, ShardedOptimizer]:
    model = _model()
    opt = ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        compile=compile,
        parameters_as_bucket_view=bucket_view,
        **_options("AdamW"),
    )
    _steps(model, opt, 0, 2)
    replaced = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(replaced, assign=True)  # new tensor objects with new values
    _steps(model, opt, 2, 4)
    model.to(torch.device("cpu", 0))
    _steps(model, opt, 4, 6)
    return model, opt


def _check_rebind(rank: int, world_size: int, *, bucket_view: bool) -> dict[str, Any]:
    eager, _ = _rebind_run(False, bucket_view=bucket_view)
    compiled, opt = _rebind_run(AOT, bucket_view=bucket_view)
    return {"diff": _max_diff(eager, compiled), "compiles": opt.compiled_update.compiles}


@pytest.mark.parametrize("bucket_view", [False, True])
def test_rebind_after_assign_and_to(ranks2: Any, bucket_view: bool) -> None:
    for out in ranks2.run(_check_rebind, bucket_view=bucket_view):
        assert out["compiles"] and out["diff"] <= TOLERANCE["AdamW"], out


def _paths_run(compile: Any, case: str) -> tuple[torch.nn.Module, ShardedOptimizer]:
    options: dict[str, Any] = {"bucket_numel": 64}  # several buckets
    model = _model()
    if case == "stage2_master":
        model = _model(torch.bfloat16)
        options.update(stage=2, master_dtype=torch.float32)
    elif case == "replicated":
        options.update(sharding="replicated")
    opt = ShardedOptimizer(
        model.parameters(),
        torch.optim.AdamW,
        compile=compile,
        skip_nonfinite=True,
        **options,
        **_options("AdamW"),
    )
    for i in range(6):
        for group in opt.param_groups:
            group["lr"] = _lr(i)
        _backward(model, i, poison=i == 3)
        opt.step()
        opt.zero_grad()
    return model, opt


def _check_paths(rank: int, world_size: int, *, case: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replicated run's "not sharded" warning
        eager, eager_opt = _paths_run(False, case)
        compiled, opt = _paths_run(AOT, case)
    return {
        "diff": _max_diff(eager, compiled),
        "skipped": (opt.num_skipped_steps, eager_opt.num_skipped_steps),
        "compiles": opt.compiled_update.compiles,
        "replicas": all(all_equal_across_ranks(p) for p in compiled.parameters()),
    }


@pytest.mark.parametrize("case", ["stage2_master", "replicated"])
def test_compiled_update_other_paths(ranks2: Any, case: str) -> None:
    for out in ranks2.run(_check_paths, case=case):
        assert out["compiles"] and out["skipped"] == (1, 1) and out["replicas"], out
        # bf16 parameters: one bf16 rounding of a master that differs by float rounding may flip
        limit = 2**-7 if case == "stage2_master" else TOLERANCE["AdamW"]
        assert out["diff"] <= limit, out


def _check_outer_compile(rank: int, world_size: int) -> dict[str, Any]:
    plain = _model()
    plain_opt = ShardedOptimizer(plain.parameters(), torch.optim.AdamW, compile=AOT, **_options("AdamW"))
    _steps(plain, plain_opt, 0, 4)
    outer = _model()
    opt = ShardedOptimizer(outer.parameters(), torch.optim.AdamW, compile=AOT, **_options("AdamW"))
    step = torch.compile(opt.step)  # PyTorch's recipe on top: the wrapper's step is a graph break
    for i in range(4):
        for group in opt.param_groups:
            group["lr"] = _lr(i)
        _backward(outer, i)
        step()
        opt.zero_grad()
    return {"exact": _max_diff(plain, outer) == 0.0, "runs": opt.compiled_update.num_graph_runs}


def test_outer_torch_compile_still_runs_the_compiled_update(ranks2: Any) -> None:
    for out in ranks2.run(_check_outer_compile):
        assert out["exact"] and out["runs"] >= 4, out


def _check_hybrid(rank: int, world_size: int) -> dict[str, Any]:
    from shardoptim import hybrid_groups

    shard, replicate = hybrid_groups(shard_size=2)
    models = []
    for compile in (False, AOT):
        model = _model()
        opt = ShardedOptimizer(
            model.parameters(),
            torch.optim.AdamW,
            stage=2,
            shard_group=shard,
            replicate_group=replicate,
            compile=compile,
            **_options("AdamW"),
        )
        _steps(model, opt, 0, 4)
        opt.verify_replicas()
        models.append(model)
    return {"diff": _max_diff(*models), "compiles": opt.compiled_update.compiles}


def test_compiled_update_hybrid(ranks4: Any) -> None:
    for out in ranks4.run(_check_hybrid):
        assert out["compiles"] and out["diff"] <= TOLERANCE["AdamW"], out
