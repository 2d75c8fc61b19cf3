"""What a process group is made of, read without communicating: its device types, the device its
small tensors live on, its timeout, whether it averages natively; and the warning for a launched
job that never created one.

Must not import anything of shardoptim.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

#: Waits outside torch.distributed (MPI, the shared-memory barrier) last at most this long when
#: neither the Comm nor its process group says how long: torch's default group timeout.
DEFAULT_TIMEOUT_S = 1800.0

_warned_unsharded = False


def warn_if_launched_unsharded() -> None:
    """Warn once per process when a launcher set WORLD_SIZE > 1 but no process group exists.

    The warning points at the first caller outside this package (the user's ShardedOptimizer(...)).
    """
    global _warned_unsharded
    raw = os.environ.get("WORLD_SIZE", "")
    if _warned_unsharded or not raw.strip().isdigit() or int(raw) <= 1:
        return
    _warned_unsharded = True
    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, stacklevel = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(
        f"WORLD_SIZE={int(raw)} is set but torch.distributed is not initialised, so the optimizer is not "
        "sharded: every process runs alone at world size 1 with the full optimizer state; call "
        "shardoptim.init_distributed() (or torch.distributed.init_process_group) before building it",
        stacklevel=stacklevel,
    )


def group_device_types(group: dist.ProcessGroup | None, backend: str) -> tuple[str, ...]:
    """Return the device types `group` has backends for, from the group (or the backend string)."""
    try:
        assert group is not None
        types = tuple(dict.fromkeys(d.type for d in group._device_types))
    except (AttributeError, AssertionError, RuntimeError):
        types = ()
    if types:
        return types
    # A torch without _device_types, or a group whose backends are not registered yet:
    # "cpu:gloo,cuda:nccl" names its devices; a plain name is NCCL's CUDA or a CPU backend.
    if ":" in backend:
        return tuple(dict.fromkeys(part.split(":")[0].strip() for part in backend.split(",")))
    return ("cuda",) if backend == "nccl" else ("cpu",)


def group_timeout_s(group: dist.ProcessGroup | None, device: torch.device) -> float:
    """Return the timeout `group` was created with (`init_process_group(timeout=)`, `new_group(timeout=)`).

    torch's default of 30 minutes when the backend does not say.
    """
    try:
        assert group is not None
        return float(group._get_backend(device).options._timeout.total_seconds())
    except (AssertionError, AttributeError, RuntimeError):  # a backend without options, or a torch without the field
        return DEFAULT_TIMEOUT_S


def small_tensor_device(types: tuple[str, ...]) -> torch.device:
    """Return the device small collective tensors live on, for a group with backends for `types`.

    The CPU whenever the group has a CPU backend (gloo, or "cpu:gloo,cuda:nccl": flags and
    metadata then never touch an accelerator), else the group's accelerator: the current CUDA
    device for an NCCL-only group, the meta device for a fake group registered for "meta".
    """
    if "cpu" in types:
        return torch.device("cpu")
    kind = "cuda" if "cuda" in types else types[0]
    if kind == "meta":
        return torch.device("meta")
    module = getattr(torch, kind, None)
    current = getattr(module, "current_device", None)
    return torch.device(kind, current()) if callable(current) else torch.device(kind)


def averages_natively(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether `group`'s backend for `device` averages itself (NCCL's ReduceOp.AVG; gloo has none)."""
    if device.type != "cuda":
        return False
    try:
        assert group is not None
        backend = group._get_backend(device)
    except (AssertionError, AttributeError, RuntimeError):
        return False
    return "nccl" in type(backend).__name__.lower()
