"""The consolidated state_dict of a ShardedOptimizer: made by a collective, kept on one rank, handed out.

`consolidate_state_dict(to)` gathers the full state onto rank `to` (in the base optimizer's format,
shardoptim.state_dict) behind the entry check, and the Placement keeps it there until the next
step or load; `state_dict()` then returns it without communicating, `{}` on the other ranks, or
refuses with the call to make first; `load_state_dict` takes the full dict on every rank and
accepts that `{}` as a no-op. The bodies of those three ShardedOptimizer methods.

Must not import shardoptim.optimizer at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardoptim.state_dict import consolidate, groups_with_indices
from shardoptim.state_dict import load as load_format

if TYPE_CHECKING:
    from shardoptim.optimizer import ShardedOptimizer


def consolidate_onto(opt: ShardedOptimizer, *, to: int) -> None:
    """Gather the full state onto rank `to` and keep it there until the next step or load.

    Collective: call on every rank of the group, in the same order. With hybrid sharding only the
    lead replica gathers (behind the entry check); every other rank keeps nothing.
    """
    comm = opt.placement.comm
    if not 0 <= to < comm.world_size:
        raise ValueError(
            f"to={to} is not a rank of the group (world size {comm.world_size}); pass a rank in 0.."
            f"{comm.world_size - 1} (with hybrid sharding, a rank of the shard group)"
        )
    replicas = opt.placement.replicas
    lead = replicas is None or replicas.is_lead
    if lead:
        opt.placement.enter("consolidate_state_dict", lone_rank=to)
    opt.placement.keep_consolidated(consolidate(opt, to=to) if lead else None, to)


def current(opt: ShardedOptimizer) -> dict[str, Any]:
    """Return what `opt.state_dict()` returns, without communicating.

    The consolidated state on its target rank (`{}` elsewhere), the empty state before any exists,
    the full state at world size 1 (consolidated on the spot, nothing to gather from).

    Raises:
        RuntimeError: state exists on several ranks but was not consolidated since the last step.
    """
    placement = opt.placement
    if placement.consolidated is not None:
        return placement.consolidated
    if placement.consolidated_to is not None:
        return {}
    if not placement.has_state:
        return {"state": {}, "param_groups": groups_with_indices(opt)}
    if placement.comm.world_size > 1:
        raise RuntimeError(
            f"{placement.comm.prefix}the optimizer state is sharded and was not consolidated since the last step: "
            "call opt.consolidate_state_dict(to=0) on every rank first, then opt.state_dict() on rank 0 (other "
            "ranks get {}). With Hugging Face Trainer, Accelerate or Lightning use the one-line integration in "
            "shardoptim.integrations, which does this before each save"
        )
    full = consolidate(opt, to=0)
    assert full is not None
    placement.keep_consolidated(full, 0)
    return full


def load(opt: ShardedOptimizer, state_dict: dict[str, Any]) -> None:
    """Load a full state_dict into this rank's part and drop any consolidated copy; `{}` is a no-op.

    No communication. The caller's dict is not modified.
    """
    if isinstance(state_dict, dict) and not state_dict:
        return
    load_format(opt, state_dict)
    opt.placement.mark_loaded(bool(state_dict.get("state")))
