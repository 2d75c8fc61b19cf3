"""probe_update_kind: the verdict for toy classes of every kind, torch's own classes, and its hygiene.

The toy classes are the smallest updates that show each property: elementwise (SGD), per-tensor
(normalised by the tensor's norm, or clipped per tensor only above a threshold), global (normalised
by the norm over all parameters), random noise, a param_group writer, a closure-only class, one that
skips frozen parameters, and one that takes matrices only.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import Optimizer

from shardoptim.kinds import Kind, kind_from_verdict, most_restrictive
from shardoptim.probe import ProbeVerdict, probe_update_kind


class _Toy(Optimizer):
    """Base of the toy classes: one lr, step() applies `direction(group, params)` to every param."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, dict(lr=lr))

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad for p in params if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p, d in zip(params, self.direction(group, params)):
                p.sub_(d, alpha=group["lr"])
        return loss


class _Elementwise(_Toy):
    """SGD with momentum: every element on its own."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for p in params:
            buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
            buf.mul_(0.9).add_(p.grad)
            out.append(buf.clone())
        return out


class _PerTensor(_Toy):
    """The gradient divided by its own tensor's norm."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad / (p.grad.norm() + 1e-12) for p in params]


class _ClipsLargeTensors(_Toy):
    """Elementwise, except that a tensor whose gradient norm exceeds 5 is clipped to norm 5."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad * min(1.0, 5.0 / (float(p.grad.norm()) + 1e-12)) for p in params]


class _Global(_Toy):
    """The gradient divided by the norm over all parameters' gradients."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        total = torch.sqrt(sum((p.grad.square().sum() for p in params), torch.zeros(())))
        return [p.grad / (total + 1e-12) for p in params]


class _Noisy(_Toy):
    """SGD plus Gaussian noise from the global generator."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad + 0.1 * torch.randn_like(p) for p in params]


class _GroupWriter(_Toy):
    """Elementwise, with a step size `d` it grows in its param_group at every step (D-Adaptation-like)."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        group["d"] = group.get("d", 1.0) * 1.5
        return [p.grad * group["d"] for p in params]


class _NeedsClosure(_Elementwise):
    """Refuses to step without a closure (AliG-like), otherwise elementwise."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is None:
            raise RuntimeError("_NeedsClosure requires a closure that returns the loss")
        return super().step(closure)


class _Extrapolates(_Elementwise):
    """Moves the parameters to an extrapolated point, evaluates the closure there, moves back (SAM-like)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is None:
            raise RuntimeError("_Extrapolates requires a closure")
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            p.add_(0.01)
        with torch.enable_grad():
            loss = closure()
        for p in params:
            p.sub_(0.01)
        super().step()
        return loss


class _SkipsFrozen(_Elementwise):
    """Updates only parameters that require grad (AdaHessian-like filtering)."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad if p.requires_grad else torch.zeros_like(p) for p in params]


class _MatrixOnly(_Toy):
    """Takes 2-D parameters only; normalises every row of the gradient (Muon-like)."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, lr)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"_MatrixOnly takes 2-D parameters only, got shape {tuple(p.shape)}")

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad / (p.grad.norm(dim=1, keepdim=True) + 1e-12) for p in params]


class _PrivateNoise(_Toy):
    """SGD plus noise from a generator of its own, drawn parameter after parameter (no global RNG)."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, lr)
        self.generator = torch.Generator().manual_seed(0)

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.grad + 0.1 * torch.randn(p.shape, generator=self.generator) for p in params]


class _DelayedPreconditioner(_Elementwise):
    """Elementwise for its first 100 steps, but keeps a Shampoo-like (n, n) statistic from the start."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:
            flat = p.grad.reshape(-1, 1)
            stat = self.state[p].setdefault("gg", torch.zeros(flat.numel(), flat.numel()))
            stat.add_(flat @ flat.T)
        return super().direction(group, params)


class _DelayedNormScaling(_Elementwise):
    """Elementwise for its first 100 steps, but tracks its tensor's gradient norm (AdaNorm-like)."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:
            state = self.state[p]
            state["norm"] = 0.9 * state.get("norm", 0.0) + 0.1 * float(p.grad.norm())
        return super().direction(group, params)


class _DelayedGlobalStatistic(_Elementwise):
    """Elementwise for its first 100 steps, but sums every gradient into its param_group (D-Adaptation-like)."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        group["gsq"] = group.get("gsq", 0.0) + sum(float(p.grad.square().sum()) for p in params)
        return super().direction(group, params)


class _ScheduleFreeLike(_Toy):
    """Needs train() before step(); eval() moves the parameters (elementwise) to the averaged point."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, lr)
        self.training = False

    def train(self) -> None:
        self.training = True

    @torch.no_grad()
    def eval(self) -> None:
        self.training = False
        for group in self.param_groups:
            for p in group["params"]:
                if "avg" in self.state[p]:
                    p.copy_(self.state[p]["avg"])

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.training:
            raise RuntimeError("call train() before step()")
        for p in params:
            avg = self.state[p].setdefault("avg", p.detach().clone())
            avg.lerp_(p, 0.5)
        return [p.grad for p in params]


class _Flagged(_Toy):
    """Every group must say whether it normalises per tensor (like pytorch_optimizer's use_muon)."""

    def direction(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        if "normalise" not in group:
            raise ValueError("every param group needs a 'normalise' flag")
        if group["normalise"]:
            return [p.grad / (p.grad.norm() + 1e-12) for p in params]
        return [p.grad for p in params]


class _Broken(_Toy):
    """Fails at every step."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        raise RuntimeError("broken on purpose")


@pytest.mark.parametrize(
    ("cls", "update", "kind"),
    [
        (_Elementwise, "elementwise", "tensor"),  # a verdict never gives flat
        (_PerTensor, "per_tensor", "tensor"),
        (_ClipsLargeTensors, "per_tensor", "tensor"),
        (_Global, "global", "replicated"),
    ],
)
def test_update_kind_of_toy_classes(cls: type[Optimizer], update: str, kind: str) -> None:
    verdict = probe_update_kind(cls, {"lr": 1e-2})
    assert verdict.update == update, verdict.reason
    assert kind_from_verdict(verdict) == kind
    assert not verdict.uses_rng
    assert verdict.writes_group_keys == ()
    assert not verdict.needs_closure
    assert not verdict.reads_requires_grad
    assert verdict.error is None
    assert verdict.reason.startswith(f"{cls.__name__}: {update}")


@pytest.mark.parametrize(
    ("cls", "update", "evidence"),
    [
        (_PrivateNoise, "global", "leaving one tensor out"),
        (_DelayedPreconditioner, "per_tensor", "state 'gg' of shape"),
        (_DelayedNormScaling, "per_tensor", "scalar state 'norm'"),
        (_DelayedGlobalStatistic, "global", "param_group values"),
    ],
)
def test_coupling_seen_before_it_acts(cls: type[Optimizer], update: str, evidence: str) -> None:
    """Couplings that do not move the parameters within the probe's steps show in state and groups."""
    verdict = probe_update_kind(cls, {"lr": 1e-2})
    assert verdict.update == update, verdict.reason
    assert evidence in verdict.reason
    assert not verdict.uses_rng


def test_schedule_free_like_class_runs_in_train_mode() -> None:
    verdict = probe_update_kind(_ScheduleFreeLike, {"lr": 1e-2})
    assert verdict.train_eval
    assert verdict.error is None, verdict.error
    assert verdict.update == "elementwise", verdict.reason


def _kind_from_verdicts(verdicts: list[ProbeVerdict]) -> Kind:
    """Return the most restrictive layout over several verdicts (one per distinct param group), as choose_kind does."""
    return most_restrictive(kind_from_verdict(v) for v in verdicts)


def test_group_options() -> None:
    per_tensor = probe_update_kind(_Flagged, {"lr": 1e-2}, group_options={"normalise": True})
    elementwise = probe_update_kind(_Flagged, {"lr": 1e-2}, group_options={"normalise": False, "params": []})
    assert per_tensor.update == "per_tensor", per_tensor.reason
    assert elementwise.update == "elementwise", elementwise.reason
    assert probe_update_kind(_Flagged, {"lr": 1e-2}).update == "unknown"
    assert _kind_from_verdicts([elementwise, per_tensor]) == "tensor"
    assert _kind_from_verdicts([elementwise]) == "tensor"
    assert _kind_from_verdicts([elementwise, probe_update_kind(_Global, {"lr": 1e-2})]) == "replicated"


def test_elementwise_is_bitwise() -> None:
    verdict = probe_update_kind(_Elementwise, {"lr": 1e-2})
    assert verdict.split_diff == 0.0
    assert verdict.cross_diff == 0.0


def test_rng_class_is_replicated() -> None:
    verdict = probe_update_kind(_Noisy, {"lr": 1e-2})
    assert verdict.uses_rng, verdict.reason
    assert "random" in verdict.reason
    assert kind_from_verdict(verdict) == "replicated"


def test_group_writer() -> None:
    verdict = probe_update_kind(_GroupWriter, {"lr": 1e-2})
    assert verdict.writes_group_keys == ("d",)
    assert verdict.update == "elementwise"
    assert "'d'" in verdict.reason


def test_needs_closure() -> None:
    verdict = probe_update_kind(_NeedsClosure, {"lr": 1e-2})
    assert verdict.needs_closure
    assert verdict.update == "elementwise", verdict.reason
    assert verdict.error is None


def test_moves_params_before_closure() -> None:
    verdict = probe_update_kind(_Extrapolates, {"lr": 1e-2})
    assert verdict.needs_closure
    assert verdict.moves_params_before_closure, verdict.reason
    assert verdict.update == "elementwise", verdict.reason
    assert kind_from_verdict(verdict) == "replicated"
    assert not probe_update_kind(_NeedsClosure, {"lr": 1e-2}).moves_params_before_closure


def test_reads_requires_grad() -> None:
    verdict = probe_update_kind(_SkipsFrozen, {"lr": 1e-2})
    assert verdict.reads_requires_grad, verdict.reason
    assert kind_from_verdict(verdict) == "replicated"


def test_matrix_only_class_is_probed_with_matrices() -> None:
    verdict = probe_update_kind(_MatrixOnly, {"lr": 1e-2})
    assert verdict.matrix_only
    assert verdict.update == "per_tensor", verdict.reason
    assert "2-D" in verdict.reason


def test_failure_is_reported_not_raised() -> None:
    verdict = probe_update_kind(_Broken, {"lr": 1e-2})
    assert verdict.update == "unknown"
    assert verdict.error is not None and "broken on purpose" in verdict.error
    assert "broken on purpose" in verdict.reason
    assert kind_from_verdict(verdict) == "replicated"


def test_bad_option_is_reported() -> None:
    verdict = probe_update_kind(torch.optim.AdamW, {"lr": -1.0})
    assert verdict.update == "unknown"
    assert verdict.error is not None and "ValueError" in verdict.error


def test_torch_adamw_is_elementwise() -> None:
    for options in (
        {"lr": 1e-3},
        {"lr": 1e-3, "weight_decay": 0.1, "foreach": True},
        {"lr": 1e-3, "fused": True},
    ):
        verdict = probe_update_kind(torch.optim.AdamW, options)
        assert verdict.update == "elementwise", (options, verdict.reason)
        assert kind_from_verdict(verdict) == "tensor"  # the probe never gives flat; torch.optim.AdamW is flat by registration


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "RMSprop", "Rprop", "NAdam", "RAdam"])
def test_torch_elementwise_classes(name: str) -> None:
    verdict = probe_update_kind(getattr(torch.optim, name), {"lr": 1e-3})
    assert verdict.update == "elementwise", verdict.reason


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch.optim.Adafactor needs torch >= 2.5")
def test_torch_adafactor_is_per_tensor() -> None:
    verdict = probe_update_kind(torch.optim.Adafactor, {"lr": 1e-2})
    assert verdict.update == "per_tensor", verdict.reason
    assert not verdict.matrix_only
    assert kind_from_verdict(verdict) == "tensor"


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs a newer torch")
def test_torch_muon_is_per_tensor_on_matrices() -> None:
    verdict = probe_update_kind(torch.optim.Muon, {"lr": 1e-3})
    assert verdict.update == "per_tensor", verdict.reason
    assert verdict.matrix_only
    assert kind_from_verdict(verdict) == "tensor"


def test_lbfgs_is_global_and_needs_closure() -> None:
    verdict = probe_update_kind(torch.optim.LBFGS, {})
    assert verdict.needs_closure
    assert verdict.update == "global", verdict.reason


def test_leaves_global_generators_alone() -> None:
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    queued = len(getattr(torch.cuda, "_queued_calls", []))
    for cls in (_Noisy, _Elementwise, _Global):
        probe_update_kind(cls, {"lr": 0.5})
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    # NOTE: torch.manual_seed would queue a seed for CUDA, applied when CUDA initialises later.
    assert len(getattr(torch.cuda, "_queued_calls", [])) == queued
    assert torch.is_grad_enabled()


def test_deterministic_and_cached() -> None:
    first = probe_update_kind(_PerTensor, {"lr": 3e-2})
    again = probe_update_kind(_PerTensor, {"lr": 3e-2})
    assert again is first  # cached per (class, options)
    from shardoptim import probe

    probe._CACHE.clear()
    fresh = probe_update_kind(_PerTensor, {"lr": 3e-2})
    assert dataclasses.replace(fresh, elapsed_s=0.0) == dataclasses.replace(first, elapsed_s=0.0)


def test_verdict_is_frozen() -> None:
    verdict = probe_update_kind(_Elementwise, {"lr": 1e-2})
    assert isinstance(verdict, ProbeVerdict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.update = "global"  # type: ignore[misc]


def test_probe_is_cheap() -> None:
    from shardoptim import probe

    probe_update_kind(torch.optim.AdamW, {"lr": 1e-3})  # warm up torch's lazy imports
    times = []
    for _ in range(3):
        probe._CACHE.clear()
        start = time.perf_counter()
        verdict = probe_update_kind(torch.optim.AdamW, {"lr": 1e-3})
        times.append(time.perf_counter() - start)
        assert verdict.elapsed_s <= times[-1]
    # NOTE: about 15-20 ms on an idle core; generous for a shared 2-core CI machine.
    assert min(times) < 0.25, times
