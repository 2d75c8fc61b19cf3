"""The layout policy (issue 21): flat only for classes known elementwise; the probe picks tensor or replicated.

Single process, no process group: probe verdicts of conditional couplings, per-group probing,
sharding="replicated" as a user choice, and the allowlist's version ranges.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import pytest
import torch
from torch.optim import Optimizer

import shardoptim
from shardoptim import ShardedOptimizer, allowlist
from shardoptim.kinds import kind_from_verdict, resolve_kind
from shardoptim.probe import probe_update_kind
from tests import _coupled


@pytest.mark.parametrize(
    ("name", "update"),
    [
        ("SGDPLike", "per_tensor"),
        ("DelayedTrustRatio", "per_tensor"),
        ("ClipPerTensor", "per_tensor"),
        ("GlobalClip", "global"),
    ],
)
def test_probe_sees_conditional_couplings(name: str, update: str) -> None:
    """Orthogonal gradients (SGDP), 12+ steps (warm-up), a 1e4 spike (a clip at norm 1e3) all show."""
    cls, options = _coupled.COUPLED[name]
    verdict = probe_update_kind(cls, options)
    assert verdict.update == update, verdict.reason
    assert kind_from_verdict(verdict) == ("replicated" if update == "global" else "tensor")


def test_probe_stays_fast() -> None:
    """At construction: well under a second for a typical class (once the process is warm)."""
    cls, options = _coupled.COUPLED["GlobalClip"]
    probe_update_kind(cls, {**options, "lr": 0.02})  # NOTE: a process's first probe pays one-off setup
    verdict = probe_update_kind(cls, {**options, "lr": 0.03})
    assert verdict.elapsed_s < 1.0, f"probe took {verdict.elapsed_s:.2f} s"


def test_unknown_class_never_flat_until_registered() -> None:
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    assert ShardedOptimizer(params, _coupled.SGDPLike, lr=0.1).sharding == "tensor"
    mine = shardoptim.register_elementwise(type("MySign", (_coupled.ClipPerTensor,), {}))
    assert ShardedOptimizer([torch.nn.Parameter(torch.randn(3))], mine, threshold=1e30).sharding == "flat"


class _CoupledWhenFlagged(Optimizer):
    """SGD; a group with couple=True divides its gradients by their joint norm (a per-group flag)."""

    def __init__(self, params: Any, lr: float = 0.1, couple: bool = False) -> None:
        super().__init__(params, {"lr": lr, "couple": couple})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            norm = float(torch.stack([g.norm() for g in grads]).norm()) if group["couple"] and grads else 1.0
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / max(norm, 1e-12))


def _params(n: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]


def test_each_distinct_group_is_probed_once() -> None:
    uncoupled = ShardedOptimizer(
        [{"params": _params(1)}, {"params": _params(1), "lr": 0.2}, {"params": _params(1)}],
        _CoupledWhenFlagged,
    )
    assert uncoupled.sharding == "tensor"
    assert len(uncoupled.probe_verdicts) == 2, "three groups, two distinct option sets"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coupled = ShardedOptimizer(
            [{"params": _params(1)}, {"params": _params(2), "couple": True}], _CoupledWhenFlagged
        )
    assert coupled.sharding == "replicated", "the flag is set in the second group only"
    assert coupled.probe_verdict is not None and coupled.probe_verdict.update == "global"
    assert [v.update for v in coupled.probe_verdicts] == ["elementwise", "global"]


def test_add_param_group_refuses_a_coupled_group() -> None:
    opt = ShardedOptimizer(_params(2), _CoupledWhenFlagged)
    assert opt.sharding == "tensor"
    opt.add_param_group({"params": _params(1), "lr": 0.3})
    with pytest.raises(
        ValueError, match=r"needs sharding 'replicated' but the optimizer was built with 'tensor'"
    ):
        opt.add_param_group({"params": _params(1), "couple": True})
    assert len(opt.param_groups) == 2


def test_replicated_as_a_user_choice() -> None:
    torch.manual_seed(0)
    params = _params(3)
    refs = [p.detach().clone().requires_grad_() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a chosen replication warns about nothing
        # NOTE: foreach=False on both sides: the same kernel (else fused vs for-loop may differ in the last bit)
        opt = ShardedOptimizer(params, torch.optim.AdamW, sharding="replicated", lr=1e-2, foreach=False)
    assert opt.sharding == "replicated" and opt.probe_verdict is None
    assert "asked for" in opt.replication_reason
    ref_opt = torch.optim.AdamW(refs, lr=1e-2, foreach=False)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p, r in zip(params, refs):
            p.grad = torch.randn(p.shape, generator=gen)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert all(torch.equal(p, r) for p, r in zip(params, refs))
    assert resolve_kind(torch.optim.LBFGS, "replicated") == "replicated"
    assert resolve_kind(_coupled.GlobalClip, "replicated") == "replicated"


def test_allowlist_version_range(monkeypatch: pytest.MonkeyPatch) -> None:
    lion = pytest.importorskip("lion_pytorch").Lion
    assert allowlist.allowlisted(lion) is not None
    assert resolve_kind(lion, "auto") == "flat"
    assert allowlist.allowlisted(type("MyLion", (lion,), {})) is None, "a subclass may change the update"
    monkeypatch.setattr(allowlist.metadata, "version", lambda package: "0.3.0")
    assert allowlist.allowlisted(lion) is None
    assert resolve_kind(lion, "auto") == "tensor", "outside the range the class is unknown"
    monkeypatch.setattr(allowlist.metadata, "version", lambda package: "not a version")
    assert allowlist.allowlisted(lion) is None


def test_allowlist_entries_name_real_classes() -> None:
    for entry in allowlist.ALLOWLIST:
        try:
            module = importlib.import_module(entry.module)
        except ImportError:
            continue
        cls = getattr(module, entry.name)
        assert issubclass(cls, Optimizer), entry
        assert entry.min_version < entry.below_version, entry


def test_known_coupled_class_runs_replicated() -> None:
    ranger21 = pytest.importorskip("pytorch_optimizer").Ranger21
    if allowlist.known_coupled(ranger21) is None:
        pytest.skip("installed pytorch_optimizer outside the version range read")
    assert resolve_kind(ranger21, "auto") == "replicated"
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = ShardedOptimizer(params, ranger21, lr=1e-3, num_iterations=10)
    assert opt.sharding == "replicated" and opt.probe_verdict is None
    assert "known to couple tensors" in opt.replication_reason
