"""The base optimizer's step over this rank's slice, run as a compiled graph (`compile=True`).

`CompiledUpdate` stands in for `optim.step(**kwargs)`. It compiles the local optimizer's own step
with `torch.compile` once per layout and keeps it from recompiling when options change:

- `lr` (what schedulers write every step) is held in a 0-dim float64 tensor per group, written in
  place before each call and put in the group only for the call: the graph reads it as an input.
  Outside the call the local groups hold the plain floats the wrapper copied in, so the wrapper's
  `param_groups`, its checkpoints and values the step writes back stay plain Python numbers.
- torch.optim's own classes take a tensor lr only on their `capturable` path, which they allow on
  CPU under compilation: such groups get `capturable=True` for the call (the state they create
  is the same, a float32 0-dim `step`; bias corrections are then computed in tensors).
- Every graph compiled and every graph run is counted. A layout whose step keeps compiling after
  its warm-up calls, whose step runs no compiled graph at all (dynamo gave up on it), or whose
  compilation raises during warm-up falls back to the eager step for good, with one warning
  naming the class and the reason. During warm-up the slice's values, gradients, state and
  groups are copied first, so a call that raises midway (a compiler failure, or a frame dynamo
  gave up on running eagerly with the stand-ins above) is undone before the eager rerun.

Fused classes (a group with `fused=True`) are not compiled: their kernel is already one pass
(one warning says compile has no effect). Must not import torch.distributed or the wrapper.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

#: Calls of one layout during which compilations are expected (the first call creates the state,
#: the second meets it).
WARMUP_CALLS = 2
#: Compilations allowed after warm-up, per layout, before falling back to eager.
LATE_COMPILES = 2
#: Dynamo's limit on compiled entries per function during these calls (its default, 8, counts the
#: entries of every optimizer instance of the class ever stepped in the process, dead ones too).
RECOMPILE_LIMIT = 64

# NOTE: the CompiledUpdate whose call is running: the counting backend and the graphs it
# compiled report to it. Graphs cached by dynamo may be reused by another instance of the same
# class, so they must count for whichever instance runs them, not the one that compiled them.
_running: list[CompiledUpdate] = []


class CompiledUpdate:
    """Run `optim.step` compiled (or eagerly after a fallback); see the module docstring.

    Args:
        optim: the local optimizer over this rank's slice.
        options: `torch.compile` keywords (backend, mode, options, dynamic, fullgraph); None:
            always eager.
    """

    def __init__(self, optim: Optimizer, options: Mapping[str, Any] | None) -> None:
        self.optim = optim
        self.name = type(optim).__name__
        #: Why the step runs eagerly ("" while it runs compiled or was never asked to).
        self.fallback_reason = ""
        #: Graphs compiled while this instance's calls ran (all layouts).
        self.num_compiles = 0
        #: Compiled graphs run while this instance's calls ran.
        self.num_graph_runs = 0
        self._warned_kwargs = False
        self._layout: tuple[int, ...] | None = None
        self._calls = 0
        self._compiles_after_warmup = 0
        self._lr_tensors: list[torch.Tensor] = []
        self._capturable = type(optim).__module__.startswith("torch.optim.")
        self._compiled: Callable[..., Any] | None = None
        if options is None:
            return
        fused = any(group.get("fused") for group in optim.param_groups)
        if fused:
            self._fall_back(
                "it runs fused=True, a fused kernel already; pass foreach=True to compile its update"
            )
            return
        self._compiled = torch.compile(
            functools.partial(_unhooked_step(type(optim)), optim),
            backend=_CountingBackend(options),
            dynamic=options.get("dynamic"),
            fullgraph=bool(options.get("fullgraph", False)),
        )

    @property
    def compiles(self) -> bool:
        """Whether steps run compiled (False when compile was off, skipped or fallen back)."""
        return self._compiled is not None

    def step(self, **step_kwargs: Any) -> Any:
        """Run the base step once, compiled when possible; return what it returns.

        A call with keyword arguments (a closure, or options of the base step) runs eagerly:
        a closure re-evaluates the model, which is no part of the update's graph.
        """
        if self._compiled is None:
            return self.optim.step(**step_kwargs)
        if step_kwargs:
            if not self._warned_kwargs:
                self._warned_kwargs = True
                warnings.warn(
                    f"compile=True: {self.name}.step is run eagerly when called with keyword arguments "
                    f"({sorted(step_kwargs)}); call opt.step() after backward to run it compiled",
                    stacklevel=4,
                )
            return self.optim.step(**step_kwargs)
        self._enter_layout()
        snapshot = _Snapshot(self.optim) if self._calls < WARMUP_CALLS else None
        compiles, runs = self.num_compiles, self.num_graph_runs
        try:
            result = self._call_compiled()
        except Exception as err:
            # NOTE: during warm-up any failure is undone and retried eagerly (a step that really
            # fails raises again there). Later, only a compiler failure is labelled: a step run
            # in part cannot be retried.
            if snapshot is None:
                if not isinstance(err, torch._dynamo.exc.TorchDynamoException):
                    raise
                raise RuntimeError(
                    f"compile=True: recompiling {self.name}.step after warm-up raised {type(err).__name__}: {err}. "
                    "The step may have run in part, so it cannot be retried eagerly; build the optimizer with "
                    "compile=False"
                ) from err
            snapshot.restore_(self.optim)
            self._fall_back(f"compiling its step raised {type(err).__name__}: {_first_line(err)}")
            return self.optim.step()
        self._calls += 1
        self._check_progress(compiled_now=self.num_compiles - compiles, ran=self.num_graph_runs - runs)
        return result

    def _enter_layout(self) -> None:
        """Start counting afresh when the groups' parameter lists changed (a new layout)."""
        layout = tuple(len(group["params"]) for group in self.optim.param_groups)
        if layout != self._layout:
            self._layout = layout
            self._calls = 0
            self._compiles_after_warmup = 0
            self._lr_tensors = [torch.zeros((), dtype=torch.float64) for _ in self.optim.param_groups]

    def _call_compiled(self) -> Any:
        """Run the compiled step with lr (and capturable) set for the call, then put the floats back."""
        assert self._compiled is not None
        groups = self.optim.param_groups
        saved = [{key: value for key, value in group.items() if key != "params"} for group in groups]
        lr_tensors = self._lr_tensors
        for group, tensor in zip(groups, lr_tensors):
            lr = group.get("lr")
            if isinstance(lr, float):
                tensor.fill_(lr)
                group["lr"] = tensor
            if self._capturable and group.get("capturable") is False:
                group["capturable"] = True
        _running.append(self)
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self._compiled()
        finally:
            _running.pop()
            for group, tensor, before in zip(groups, lr_tensors, saved):
                _restore_numbers_(group, before, tensor)

    def _check_progress(self, *, compiled_now: int, ran: int) -> None:
        """Fall back when the step recompiles after warm-up or ran no compiled graph."""
        if self._calls <= WARMUP_CALLS:
            if self._calls == WARMUP_CALLS and ran == 0:
                self._fall_back(
                    "dynamo compiled no graph of its step (a graph break inside its loop over the groups, "
                    "data-dependent Python, or dynamo's recompile limit)"
                )
            return
        self._compiles_after_warmup += compiled_now
        if self._compiles_after_warmup > LATE_COMPILES:
            self._fall_back(
                f"its step recompiled {self._compiles_after_warmup} times after warm-up (a group option other "
                "than lr changes between steps, e.g. a value its step writes every step)"
            )

    def _fall_back(self, reason: str) -> None:
        """Run every later step eagerly; warn once, naming the class and the reason."""
        self._compiled = None
        self.fallback_reason = reason
        warnings.warn(
            f"compile=True has no effect for {self.name}: {reason}; its step runs eagerly", stacklevel=5
        )

    def note_compile(self) -> None:
        """Count one graph compiled during this instance's call (called by the backend)."""
        self.num_compiles += 1

    def note_graph_run(self) -> None:
        """Count one compiled graph run during this instance's call."""
        self.num_graph_runs += 1


def _unhooked_step(cls: type[Optimizer]) -> Callable[..., Any]:
    """Return the class's own step, without the profiling and hook wrapper torch.optim puts around it.

    NOTE: that wrapper is one function shared by every optimizer class, so dynamo's compiled
    entries for it are shared with every `torch.compile(some_optimizer.step)` in the process;
    once those reach dynamo's recompile limit it never compiles the wrapper again, and a
    compiled update through it would only ever run eagerly. The local optimizer has no hooks of
    its own; global optimizer hooks (`register_optimizer_step_pre_hook`) fire for the wrapper's
    step, not for the compiled local one.
    """
    step = cls.step
    hooked = getattr(step, "hooked", False) and hasattr(step, "__wrapped__")
    return step.__wrapped__ if hooked else step  # type: ignore[attr-defined]


def _restore_numbers_(group: dict[str, Any], before: Mapping[str, Any], lr: torch.Tensor) -> None:
    """Undo a compiled call's stand-ins in `group`; keep the step's own writes, as plain numbers.

    The lr tensor and `capturable` go back to what they were. A 0-dim tensor of the lr tensor's
    dtype and device that the step wrote where a number was (or under a new key) was computed
    from the lr tensor (e.g. schedule-free's `lr_max`): it is read back as a number, as an eager
    step writes it, so the wrapper's groups and checkpoints hold numbers. Any other value the
    step wrote stays, for the wrapper to take back.
    """
    if "capturable" in before:
        group["capturable"] = before["capturable"]
    for key, value in group.items():
        old = before.get(key)
        if value is lr:
            group[key] = old if key in before else before.get("lr")
        elif (
            isinstance(value, torch.Tensor)
            and value.dim() == 0
            and (value.dtype, value.device) == (lr.dtype, lr.device)
            and (key not in before or type(old) in (float, int))
        ):
            number = value.item()
            group[key] = int(number) if type(old) is int else float(number)


class _CountingBackend:
    """A `torch.compile` backend: the chosen one, with every compilation and graph run counted."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        backend = options.get("backend", "inductor")
        self._inner: Callable[..., Any]
        if backend == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            # NOTE: fallback_random: random draws as eager makes them (inductor's own generator
            # gives other numbers), so a class that draws computes what it computes eagerly.
            patches = {
                "fallback_random": True,
                **list_mode_options(options.get("mode") or "default", options.get("dynamic")),
                **options.get("options", {}),
            }
            self._inner = lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)
        else:
            self._inner = torch._dynamo.lookup_backend(backend)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if _running:
            _running[-1].note_compile()
        compiled = self._inner(gm, example_inputs)

        def run(*args: Any) -> Any:
            if _running:
                _running[-1].note_graph_run()
            return compiled(*args)

        # NOTE: inductor's compiled callables take their inputs as one boxed list; keep that.
        if getattr(compiled, "_boxed_call", False):
            run._boxed_call = True  # type: ignore[attr-defined]
        return run


class _Snapshot:
    """Copies of a local optimizer's parameters, gradients, state and groups, to undo a failed call."""

    def __init__(self, optim: Optimizer) -> None:
        self.groups = [dict(group) for group in optim.param_groups]
        params = [p for group in optim.param_groups for p in group["params"]]
        self.values = [(p, p.detach().clone()) for p in params]
        self.grads = [(p.grad, p.grad.detach().clone()) for p in params if p.grad is not None]
        self.state = {p: _copy_state(p, optim.state[p]) if p in optim.state else None for p in params}

    def restore_(self, optim: Optimizer) -> None:
        """Put everything back as it was when the snapshot was taken."""
        with torch.no_grad():
            for param, value in self.values:
                param.copy_(value)
            for grad, value in self.grads:
                grad.copy_(value)
        for param, state in self.state.items():
            if state is None:
                optim.state.pop(param, None)
            else:
                optim.state[param] = state
        for group, saved in zip(optim.param_groups, self.groups):
            group.clear()
            group.update(saved)


def _copy_state(param: torch.Tensor, state: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a parameter's state; a value that is the parameter itself (a master copy) stays itself."""
    return {
        key: value.detach().clone() if isinstance(value, torch.Tensor) and value is not param else value
        for key, value in state.items()
    }


def _first_line(err: BaseException) -> str:
    """Return the first line of an error, the backend's own error for a failed compilation."""
    inner = getattr(err, "inner_exception", None)
    if isinstance(inner, BaseException):
        return f"{type(inner).__name__}: {_first_line(inner)}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
