"""Third-party optimizer classes read and found elementwise (or coupled) under every condition, per version.

`sharding="auto"` gives element-granular (flat) sharding only to classes whose update is known to
read nothing but each element's own parameter, gradient and state, and scalars that are the same
on every rank (options, step counts): torch.optim's own, those a user registers, and the entries
below. Each entry was read in the source of the versions in its range; outside the range (or when
the package's version cannot be read) the class is treated as unknown, i.e. probed and given whole
tensors at most. A class that only *looks* elementwise on test data (SGDP removes the radial part
of a weight's update only when its gradient is nearly orthogonal to the weight) is not listed:
being listed is a claim about the code, not about a run.

`KNOWN_COUPLED` lists the opposite: classes read and found to couple tensors in a way the probe's
synthetic run does not show (their effect stays below float32 resolution there), which therefore
run replicated under `sharding="auto"` within the versions read.

Pure: imports nothing from torch.distributed or the rest of shardoptim, and never imports a
third-party package (a class is matched only once its module is loaded).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import metadata

__all__ = ["ALLOWLIST", "KNOWN_COUPLED", "AllowedClass", "allowlisted", "known_coupled"]


@dataclass(frozen=True, kw_only=True, slots=True)
class AllowedClass:
    """One third-party class of known kind within a version range of its package."""

    module: str
    """Module that defines the class (its __module__)."""
    name: str
    """The class's __qualname__."""
    package: str
    """Distribution name, as importlib.metadata knows it (pip's name)."""
    min_version: tuple[int, ...]
    """Oldest version read (inclusive)."""
    below_version: tuple[int, ...]
    """First version not covered (exclusive): the next minor release may change the update."""
    why: str
    """What the update reads, in one line (the evidence for the entry)."""


#: Every entry's source was read at the version given as min_version.
ALLOWLIST: tuple[AllowedClass, ...] = (
    AllowedClass(
        module="lion_pytorch.lion_pytorch",
        name="Lion",
        package="lion-pytorch",
        min_version=(0, 2, 5),
        below_version=(0, 3),
        why="p *= 1 - lr*wd; p -= lr*sign(lerp(exp_avg, grad)); exp_avg = lerp(exp_avg, grad): per element "
        "(use_triton runs the same formula as a CUDA kernel)",
    ),
    AllowedClass(
        module="schedulefree.adamw_schedulefree",
        name="AdamWScheduleFree",
        package="schedulefree",
        min_version=(1, 4, 1),
        below_version=(1, 5),
        why="Adam second moment, interpolation y/z per element; lr warm-up, bias correction, lr_max and "
        "weight_sum are scalars of the step count and options only; train()/eval() lerp per element",
    ),
    AllowedClass(
        module="schedulefree.sgd_schedulefree",
        name="SGDScheduleFree",
        package="schedulefree",
        min_version=(1, 4, 1),
        below_version=(1, 5),
        why="interpolation y/z per element; the averaging weights are scalars of the step count and options",
    ),
    AllowedClass(
        module="schedulefree.radam_schedulefree",
        name="RAdamScheduleFree",
        package="schedulefree",
        min_version=(1, 4, 1),
        below_version=(1, 5),
        why="as AdamWScheduleFree; the rectification (rho_t > 4) is a scalar of the step count only",
    ),
)


#: Classes read and found to couple tensors where the probe cannot see it (see the module docstring).
KNOWN_COUPLED: tuple[AllowedClass, ...] = (
    AllowedClass(
        module="pytorch_optimizer.optimizer.ranger21",
        name="Ranger21",
        package="pytorch_optimizer",
        min_version=(4, 1, 0),
        below_version=(4, 2),
        why="its decoupled weight decay divides by sqrt(sum of every tensor's variance / their element count), "
        "a statistic over all tensors of all groups; on the probe's gradients the factor it changes stays "
        "below float32 resolution, on a network with small gradients it moves the weights by ~2e-6 at 3 ranks",
    ),
)


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release part of a version string ("1.4.1" -> (1, 4, 1)); None when not numeric."""
    match = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _in_range(entry: AllowedClass) -> bool:
    try:
        found = _release(metadata.version(entry.package))
    except metadata.PackageNotFoundError:
        return False
    return found is not None and entry.min_version <= found < entry.below_version


def allowlisted(optimizer_class: type) -> AllowedClass | None:
    """Return the allowlist entry of `optimizer_class` when its installed version is covered, else None.

    Only the listed class itself matches (a subclass may change the update); it matches by identity
    with the class its module defines, so a same-named class elsewhere never does.
    """
    return _find(optimizer_class, ALLOWLIST)


def known_coupled(optimizer_class: type) -> AllowedClass | None:
    """Return the KNOWN_COUPLED entry of `optimizer_class` (installed version covered), else None."""
    return _find(optimizer_class, KNOWN_COUPLED)


def _find(optimizer_class: type, entries: tuple[AllowedClass, ...]) -> AllowedClass | None:
    for entry in entries:
        if optimizer_class.__qualname__ != entry.name or optimizer_class.__module__ != entry.module:
            continue
        module = sys.modules.get(entry.module)
        if module is not None and getattr(module, entry.name, None) is optimizer_class and _in_range(entry):
            return entry
    return None
