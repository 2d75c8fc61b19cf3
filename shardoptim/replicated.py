"""Kind "replicated": the base optimizer runs on every rank over the full parameters, unsharded.

For classes that sharding would make silently wrong: the update couples tensors (a global norm
or mean inside the step, D-Adaptation's and Prodigy's `d`), draws random numbers, reads
`requires_grad`, or could not be probed. The local optimizer then holds the user's own parameters
and full state on every rank (no memory saving; one warning says so), and the wrapper still keeps
hyperparameters identical across ranks, consolidates checkpoints in the base format and clips by
the global norm. Classes that draw random numbers draw from rank 0's generator state on every
rank, so every rank computes rank 0's update, which is the update of the unsharded class.

Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from shardoptim.comm import Comm
from shardoptim.layout import ShardRange
from shardoptim.pieces import Piece

#: Piece.bucket of a replicated piece: it lives in no bucket.
NO_BUCKET = -1


def whole_pieces(params: Sequence[torch.Tensor], *, first_index: int) -> list[Piece]:
    """Return one piece per parameter whose local tensor is the parameter itself."""
    return [
        Piece(first_index + i, NO_BUCKET, ShardRange(0, p.numel()), 0, p, is_param=True) for i, p in enumerate(params)
    ]


def _states(devices: Sequence[torch.device]) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    for device in devices:
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_states(states: Sequence[torch.Tensor], devices: Sequence[torch.device]) -> None:
    torch.set_rng_state(states[0])
    for state, device in zip(states[1:], devices):
        torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def rank0_rng(comm: Comm, devices: Sequence[torch.device], *, src: int = 0) -> Iterator[None]:
    """Run the block with rank `src`'s (by default rank 0's) random number generator state on every rank.

    Collective: call on every rank of the group, in the same order (one broadcast of the CPU
    generator state, and of each CUDA device's in `devices`). Afterwards rank `src` keeps its
    advanced state, as an unsharded run would; the other ranks get their own state back, so their other
    random streams (dropout, data order) are untouched.
    """
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    if comm.world_size == 1:
        yield
        return
    mine = _states(cuda)
    packed = torch.cat(mine).to(comm.device)
    comm.broadcast_(packed, src=src, what="random generator state broadcast")
    if comm.rank == src:
        yield
        return
    sizes = [s.numel() for s in mine]
    received = list(torch.split(comm.to_host(packed), sizes))  # a host read on an accelerator-only group
    _set_states(received, cuda)
    try:
        yield
    finally:
        _set_states(mine, cuda)
