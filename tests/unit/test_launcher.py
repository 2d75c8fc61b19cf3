"""Pure tests of LaunchEnv.from_environ() and expand_hostlist(), and init_distributed() errors raised
before any process group exists: no processes, no process groups."""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist

from shardoptim.launch_env import LaunchEnv, expand_hostlist
from shardoptim.launcher import init_distributed

TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "abc",
    "RANK": "3",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
ENV = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "host0", "MASTER_PORT": "1234"}
SLURM_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "node[003-005,010],gpu7",
    "SLURM_NODELIST": "other[1-2]",
}


def _env(**kw: str) -> LaunchEnv:
    return LaunchEnv.from_environ(kw)


def test_empty_environment_is_single() -> None:
    env = LaunchEnv.from_environ({})
    assert env == LaunchEnv(
        launcher="single", rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None
    )


def test_launch_env_is_frozen_and_keyword_only() -> None:
    env = LaunchEnv.from_environ({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.rank = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        LaunchEnv("single", 0, 1, 0, None, None)  # type: ignore[call-arg]


def test_default_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SHARDOPTIM_LAUNCHER", "single")
    assert LaunchEnv.from_environ().launcher == "single"


def test_torchrun() -> None:
    env = LaunchEnv.from_environ(TORCHRUN)
    assert env == LaunchEnv(
        launcher="torchrun", rank=3, world_size=8, local_rank=1, master_addr="10.0.0.1", master_port=29500
    )


def test_env_without_torchelastic() -> None:
    env = LaunchEnv.from_environ(ENV)
    assert (env.launcher, env.rank, env.world_size, env.master_addr, env.master_port) == (
        "env",
        1,
        2,
        "host0",
        1234,
    )
    assert env.local_rank == -1  # LOCAL_RANK not given


def test_env_world_size_one_has_local_rank_zero() -> None:
    assert _env(RANK="0", WORLD_SIZE="1", MASTER_ADDR="a", MASTER_PORT="1").local_rank == 0


def test_torchrun_beats_mpi_and_slurm() -> None:
    mixed = {**SLURM_STEP, "PMI_RANK": "0", "PMI_SIZE": "4", **TORCHRUN}
    assert LaunchEnv.from_environ(mixed).launcher == "torchrun"


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"RANK": "0"}, ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "a"}, ["RANK", "MASTER_PORT"]),
        ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}, ["MASTER_ADDR", "MASTER_PORT"]),
    ],
)
def test_half_configured_env_names_missing(given: dict[str, str], missing: list[str]) -> None:
    with pytest.raises(ValueError, match="so env:// is used, but it needs") as info:
        LaunchEnv.from_environ(given)
    message = str(info.value)
    for name in missing:
        assert name in message
    assert "torchrun" in message  # what to do


def test_master_vars_alone_do_not_mean_env() -> None:
    # MASTER_ADDR/MASTER_PORT are also used by the MPI and Slurm paths.
    assert _env(MASTER_ADDR="a", MASTER_PORT="1").launcher == "single"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "-1"}, "RANK='-1' must be >= 0"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be >= 1"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
        ({"LOCAL_RANK": "one"}, "LOCAL_RANK='one' is not an integer"),
        ({"MASTER_ADDR": " "}, "MASTER_ADDR is empty"),
    ],
)
def test_contradictory_env(override: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LaunchEnv.from_environ({**ENV, **override})


@pytest.mark.parametrize(
    ("variables", "rank", "world_size", "local_rank"),
    [
        (
            {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            1,
            4,
            1,
        ),
        ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, 2, 3, 0),
        ({"PMI_RANK": "2", "PMI_SIZE": "3"}, 2, 3, -1),
        ({"PMIX_RANK": "7"}, 7, -1, -1),
        ({"PMIX_RANK": "7", "MPI_LOCALRANKID": "3"}, 7, -1, 3),
        (
            {"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "0"},
            0,
            2,
            0,
        ),
        # Open MPI 5 sets PMIX_RANK too; its own variables win.
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "1"}, 1, 2, -1),
    ],
)
def test_mpi_launchers(variables: dict[str, str], rank: int, world_size: int, local_rank: int) -> None:
    env = LaunchEnv.from_environ(variables)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("mpi", rank, world_size, local_rank)
    assert env.master_addr is None and env.master_port is None


def test_mpi_uses_master_addr_but_never_a_port() -> None:
    env = _env(PMI_RANK="0", PMI_SIZE="2", MASTER_ADDR="10.1.1.1", MASTER_PORT="29500")
    assert (env.launcher, env.master_addr, env.master_port) == ("mpi", "10.1.1.1", None)


def test_mpi_beats_slurm() -> None:
    # mpirun inside an allocation: the SLURM_* variables describe mpirun's daemons, not the ranks.
    env = LaunchEnv.from_environ({**SLURM_STEP, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert (env.launcher, env.world_size) == ("mpi", 2)


@pytest.mark.parametrize(
    ("variables", "match"),
    [
        ({"PMI_RANK": "2", "PMI_SIZE": "2"}, "PMI_RANK=2 is not below PMI_SIZE=2"),
        (
            {"OMPI_COMM_WORLD_RANK": "a", "OMPI_COMM_WORLD_SIZE": "2"},
            "OMPI_COMM_WORLD_RANK='a' is not an integer",
        ),
        ({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "0"}, "MV2_COMM_WORLD_SIZE='0' must be >= 1"),
        ({"PMIX_RANK": "0", "MPI_LOCALRANKID": "-2"}, "MPI_LOCALRANKID='-2' must be >= 0"),
    ],
)
def test_contradictory_mpi(variables: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        LaunchEnv.from_environ(variables)
    assert "mpiexec" in str(info.value)


def test_slurm_step() -> None:
    env = LaunchEnv.from_environ(SLURM_STEP)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert env.master_addr == "node003"  # first host of the step's expanded nodelist
    assert env.master_port is not None and 20000 <= env.master_port <= 29999


def test_slurm_port_is_deterministic_and_per_step() -> None:
    port = LaunchEnv.from_environ(SLURM_STEP).master_port
    assert LaunchEnv.from_environ({**SLURM_STEP, "SLURM_PROCID": "0"}).master_port == port
    other_ports = {
        LaunchEnv.from_environ({**SLURM_STEP, "SLURM_STEP_ID": str(s)}).master_port for s in range(1, 6)
    }
    assert port not in other_ports
    for job in range(0, 20000, 997):
        job_port = LaunchEnv.from_environ({**SLURM_STEP, "SLURM_JOB_ID": str(job)}).master_port
        assert job_port is not None and 20000 <= job_port <= 29999


def test_slurm_master_overrides_and_fallbacks() -> None:
    env = LaunchEnv.from_environ({**SLURM_STEP, "MASTER_ADDR": "head", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("head", 31000)
    no_step_list = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert LaunchEnv.from_environ(no_step_list).master_addr == "other1"
    old_names = {k: v for k, v in no_step_list.items() if k not in ("SLURM_JOB_ID", "SLURM_STEP_ID")}
    old_names |= {"SLURM_JOBID": "4242", "SLURM_STEPID": "0"}
    assert LaunchEnv.from_environ(old_names).launcher == "slurm"
    step_tasks = LaunchEnv.from_environ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "6"})
    assert step_tasks.world_size == 6  # the step's task count beats the allocation's


@pytest.mark.parametrize(
    "step_id",
    [None, "batch", "extern", "interactive", "4294967294", "4294967295", "0xfffffffe", "0xFFFFFFFA"],
)
def test_slurm_batch_shell_is_single(step_id: str | None) -> None:
    batch = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    if step_id is not None:
        batch["SLURM_STEP_ID"] = step_id
    assert LaunchEnv.from_environ(batch).launcher == "single"


@pytest.mark.parametrize("step_id", ["0", "7", "0x10", "4294967280"])
def test_slurm_real_step_ids(step_id: str) -> None:
    assert LaunchEnv.from_environ({**SLURM_STEP, "SLURM_STEP_ID": step_id}).launcher == "slurm"


def test_slurm_garbage_step_id() -> None:
    with pytest.raises(ValueError, match="SLURM_STEP_ID='step-three' is neither a step number"):
        LaunchEnv.from_environ({**SLURM_STEP, "SLURM_STEP_ID": "step-three"})


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        ("SLURM_PROCID", "SLURM_PROCID"),
        ("SLURM_NTASKS", "SLURM_NTASKS"),
        ("SLURM_LOCALID", "SLURM_LOCALID"),
        ("SLURM_JOB_ID", "SLURM_JOB_ID (or MASTER_PORT)"),
    ],
)
def test_half_configured_slurm(drop: str, missing: str) -> None:
    env = {k: v for k, v in SLURM_STEP.items() if k != drop}
    with pytest.raises(ValueError, match="looks like a Slurm step but these are missing") as info:
        LaunchEnv.from_environ(env)
    assert missing in str(info.value) and "srun" in str(info.value)


def test_slurm_without_nodelist() -> None:
    env = {k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        LaunchEnv.from_environ(env)
    assert LaunchEnv.from_environ({**env, "MASTER_ADDR": "head"}).master_addr == "head"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8 is not below SLURM_NTASKS=8"),
        ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS='many' is not an integer"),
        ({"MASTER_PORT": "x"}, "MASTER_PORT='x' is not an integer"),
        ({"SLURM_STEP_NODELIST": "node[1-"}, "hostlist 'node\\[1-' is empty or has an unclosed"),
    ],
)
def test_contradictory_slurm(override: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LaunchEnv.from_environ({**SLURM_STEP, **override})


def test_override_selects_launcher() -> None:
    everything = {**SLURM_STEP, "PMI_RANK": "1", "PMI_SIZE": "2", **ENV}
    assert _env(**everything).launcher == "env"
    assert _env(**everything, SHARDOPTIM_LAUNCHER="mpi").rank == 1
    assert _env(**everything, SHARDOPTIM_LAUNCHER="slurm").launcher == "slurm"
    assert _env(**everything, SHARDOPTIM_LAUNCHER="single").world_size == 1
    assert _env(**everything, SHARDOPTIM_LAUNCHER="torchrun").launcher == "torchrun"
    assert _env(**TORCHRUN, SHARDOPTIM_LAUNCHER=" ENV ").launcher == "env"


def test_override_mpi_without_variables_leaves_rank_to_mpi() -> None:
    env = _env(SHARDOPTIM_LAUNCHER="mpi")
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("mpi", -1, -1, -1)


def test_override_unknown_value() -> None:
    with pytest.raises(ValueError, match="SHARDOPTIM_LAUNCHER='srun' is not a known launcher") as info:
        _env(SHARDOPTIM_LAUNCHER="srun")
    assert "torchrun, env, mpi, slurm, single" in str(info.value)


def test_override_torchrun_still_needs_variables() -> None:
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        _env(SHARDOPTIM_LAUNCHER="torchrun")


def test_override_slurm_in_batch_shell_is_an_error() -> None:
    batch = {**SLURM_STEP, "SLURM_STEP_ID": "batch", "SHARDOPTIM_LAUNCHER": "slurm"}
    with pytest.raises(ValueError, match="SLURM_STEP_ID='batch'") as info:
        LaunchEnv.from_environ(batch)
    assert "srun" in str(info.value)
    with pytest.raises(ValueError, match="SLURM_STEP_ID unset"):
        _env(SHARDOPTIM_LAUNCHER="slurm")


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node7", ["node7"]),
        ("a,b", ["a", "b"]),
        ("node[003-005,010],gpu7", ["node003", "node004", "node005", "node010", "gpu7"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[1]", ["n1"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
        (" x[1-2] , y ", ["x1", "x2", "y"]),
        ("my-host.example.org", ["my-host.example.org"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    ("hostlist", "match"),
    [
        ("", "is empty"),
        ("n[1-2", "unclosed"),
        ("n]1[", "unbalanced"),
        ("n[[1]]", "nested"),
        ("n[3-1]", "bad range '3-1'"),
        ("n[a-b]", "bad range 'a-b'"),
        ("n[]", "bad range ''"),
        ("n[1-]", "bad range '1-'"),
        ("a,,b", "empty entry"),
    ],
)
def test_expand_hostlist_rejects(hostlist: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_hostlist(hostlist)


def test_init_distributed_without_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` raise ImportError
    with pytest.raises(ImportError, match="pip install --only-binary=:all: mpi4py mpich") as info:
        init_distributed(environ={"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert "shardoptim[mpi]" in str(info.value)
    assert not dist.is_initialized()


def test_init_distributed_env_must_match_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="env:// reads MASTER_ADDR and MASTER_PORT from os.environ"):
        init_distributed(environ=ENV)
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("local_rank", "device_count", "expected"),
    [(3, 1, 0), (0, 1, 0), (2, 8, 2), (5, 2, 1)],  # per-task binding (1 or 2 GPUs per task), torchrun
)
def test_gpu_binding_per_task(
    monkeypatch: pytest.MonkeyPatch, local_rank: int, device_count: int, expected: int
) -> None:
    """Each process sees its own GPU(s) (Slurm --gpus-per-task, MPI wrappers): no error for local rank >= count.

    The chosen device is set and given to init_process_group as device_id (old: ValueError, no device_id).
    """
    import torch

    from shardoptim import launcher

    calls: dict[str, object] = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: device_count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("set_device", index))
    def init_process_group(backend: str, *, device_id: object = None, **kwargs: object) -> None:
        calls["init"] = {**kwargs, "device_id": device_id}  # torch's signature has device_id since 2.3

    monkeypatch.setattr(launcher.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(launcher.dist, "get_backend", lambda *a: "nccl")
    info = launcher._create_group(
        LaunchEnv.from_environ({}), "nccl", timedelta(seconds=5), rank=local_rank, world_size=8, local_rank=local_rank
    )
    assert calls["set_device"] == expected
    assert calls["init"]["device_id"] == torch.device("cuda", expected)  # type: ignore[index]
    assert info.local_rank == local_rank
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        launcher.cuda_device_index(0, 0)


def test_default_backend_with_cuda_has_a_cpu_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA, init_distributed's default is "cpu:gloo,cuda:nccl" (old: "nccl" alone, so every small
    per-step collective ran on the GPU and was read back: a host-device sync per step)."""
    import torch

    from shardoptim import launcher

    chosen: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launcher.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(launcher, "open_store", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "_INFO", None)  # restored afterwards

    def create_group(launch: LaunchEnv, backend: str, *args: object, **kwargs: object) -> launcher.DistInfo:
        chosen.append(backend)
        return launcher.DistInfo(rank=1, world_size=1, local_rank=0, backend=backend, launcher="single")

    monkeypatch.setattr(launcher, "_create_group", create_group)
    init_distributed(environ={})
    assert chosen == ["cpu:gloo,cuda:nccl"]
