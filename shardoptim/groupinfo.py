"""What a process group is made of, read without communicating: its device types; and the warning
for a launched job that never created one.

Must not import anything of shardoptim.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch.distributed as dist

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
