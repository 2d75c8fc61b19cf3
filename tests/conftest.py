"""Shared fixtures: one lazily started gloo RankPool per world size per pytest process.

Pools are shared by every test module of one pytest process (one xdist worker) and closed at exit.
Markers (`slow`, `mpi`) are declared in pyproject.toml, not here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# NOTE: the repo root must be on sys.path before `tests._dist` is imported, and spawned ranks copy
# sys.path, so they can import shardoptim and the test modules (by their `tests.` names) too.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests._dist import RankPool, get_pool  # noqa: E402


@pytest.fixture(scope="session")
def ranks1() -> RankPool:
    """Shared pool with 1 gloo rank."""
    return get_pool(1)


@pytest.fixture(scope="session")
def ranks2() -> RankPool:
    """Shared pool with 2 gloo ranks."""
    return get_pool(2)


@pytest.fixture(scope="session")
def ranks3() -> RankPool:
    """Shared pool with 3 gloo ranks."""
    return get_pool(3)


@pytest.fixture(scope="session")
def ranks4() -> RankPool:
    """Shared pool with 4 gloo ranks."""
    return get_pool(4)


@pytest.fixture(scope="session")
def pool_for() -> Callable[[int], RankPool]:
    """Return get_pool: world_size -> shared pool, for tests parametrised over world sizes."""
    return get_pool
