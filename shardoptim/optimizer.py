"""ShardedOptimizer: any torch.optim optimizer, its state sharded across data-parallel ranks.

The one stateful orchestrator: it normalises the user's parameters, asks layout.py where they go,
packs them into FlatBuffers, builds the local base optimizer over this rank's pieces, and at every
step syncs hyperparameters, runs the local update bucket by bucket and gathers each bucket back to
every rank while the next one is updated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from shardoptim.buffers import FlatBuffers
from shardoptim.comm import Comm, PendingGather
from shardoptim.hparams import STRUCTURE_KEYS, HparamSync, HparamSyncer, copy_hparams_
from shardoptim.kinds import Kind, resolve_impl_flags, resolve_kind, tensor_cost
from shardoptim.layout import Layout, ShardRange, assign_whole_tensors, build_flat_layout, build_tensor_layout

logger = logging.getLogger(__name__)

#: Default soft cap on the elements of one bucket: 16 Mi elements (64 MiB of fp32). Large enough
#: that a collective runs near full bandwidth, small enough that the gather of one bucket overlaps
#: the update of the next on models of a few tens of millions of parameters and up.
DEFAULT_BUCKET_NUMEL = 1 << 24


@dataclass(slots=True)
class _Piece:
    """The part of one parameter this rank owns, and the tensor the local optimizer updates."""

    index: int
    """Position of the parameter in `ShardedOptimizer._params`."""
    bucket: int
    """Position of its bucket in `ShardedOptimizer._buckets`."""
    in_param: ShardRange
    """Owned elements, as offsets inside the flattened parameter."""
    local: torch.Tensor
    """View into the bucket: 1-D for flat sharding, the parameter's shape for whole tensors."""


@dataclass(slots=True)
class _Bucket:
    """One flat buffer of full parameters and who owns what in it."""

    buffer: torch.Tensor
    bounds: tuple[int, ...]
    """world_size + 1 offsets: rank r owns [bounds[r], bounds[r + 1]) of the buffer."""
    param_indices: list[int]
    group_to_locals: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def _as_param_groups(params: Any) -> list[dict[str, Any]]:
    """Normalise what torch.optim accepts (tensors, (name, tensor) pairs or dicts) into group dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params must be an iterable of Tensors or of param-group dicts, got a single Tensor; "
            "pass [tensor] or model.parameters()"
        )
    if isinstance(params, Mapping):
        raise TypeError("params must be an iterable of param-group dicts, got one dict; wrap it in a list")
    items = list(params)
    if not items:
        raise ValueError("ShardedOptimizer got an empty parameter list; pass model.parameters() or groups")
    if all(isinstance(item, Mapping) for item in items):
        groups = [dict(item) for item in items]
    elif any(isinstance(item, Mapping) for item in items):
        raise TypeError("params mixes tensors and param-group dicts; pass either tensors or dicts")
    else:
        groups = [{"params": items}]
    for index, group in enumerate(groups):
        if "params" not in group:
            raise ValueError(f"param group {index} has no 'params' key (keys: {sorted(group)}); add one")
        plist = group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        if plist and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in plist):
            group["param_names"] = [name for name, _ in plist]
            plist = [p for _, p in plist]
        group["params"] = plist
    return groups


def _validate_params(groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    params: list[torch.Tensor] = []
    seen: dict[int, tuple[int, int]] = {}
    for g, group in enumerate(groups):
        for i, p in enumerate(group["params"]):
            where = f"param_groups[{g}]['params'][{i}]"
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where} is a {type(p).__name__}, not a Tensor; pass model.parameters()")
            if not p.is_leaf:
                raise ValueError(
                    f"{where} (shape {tuple(p.shape)}) is not a leaf tensor; optimize the leaf (e.g. the "
                    "nn.Parameter), not a result computed from it"
                )
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(
                    f"{where} has layout {p.layout}; only dense (strided) parameters are supported"
                )
            if id(p) in seen:
                raise ValueError(
                    f"{where} is the same tensor as param_groups[{seen[id(p)][0]}]['params'][{seen[id(p)][1]}]; "
                    "list every parameter once (tied weights appear once in model.parameters())"
                )
            seen[id(p)] = (g, i)
            params.append(p)
    device_types = sorted({p.device.type for p in params})
    if len(device_types) > 1:
        raise ValueError(
            f"parameters are on different device types {device_types}; move the model to one device "
            "(e.g. model.to(device)) before building the optimizer"
        )
    return params


def _probe_complex_support(
    optimizer_class: type[Optimizer], defaults: dict[str, Any], params: list[torch.Tensor]
) -> None:
    """Raise torch's own error now if `optimizer_class` cannot step complex parameters.

    Many optimizers only reject complex tensors inside `step`, which under sharding would fail on
    the owning rank only, after other buckets were already updated. A 2x2 probe per complex dtype
    surfaces the same error at construction, on every rank.
    """
    for dtype in sorted({p.dtype for p in params if p.is_complex()}, key=str):
        device = next(p.device for p in params if p.dtype == dtype)
        probe = torch.zeros(2, 2, dtype=dtype, device=device, requires_grad=True)
        grad = torch.zeros_like(probe)
        probe.grad = grad.to_sparse() if optimizer_class is torch.optim.SparseAdam else grad
        optimizer_class([probe], **defaults).step()


class ShardedOptimizer(Optimizer):
    """Shard the state of any torch.optim optimizer across the ranks of a process group.

    Every rank keeps identical full parameters; each rank keeps optimizer state only for the part
    of the parameters it owns, runs the base optimizer's update on that part, and the updated parts
    are then gathered back to every rank. Build it on every rank, after the model is on its device.

    Args:
        params: anything torch.optim accepts: tensors, (name, tensor) pairs or param-group dicts.
        optimizer_class: the base optimizer class, e.g. torch.optim.AdamW.
        process_group: the ranks to shard over; None is the default group (or a single process
            when torch.distributed is not initialised).
        sharding: "flat" cuts buckets into equal element ranges (for elementwise optimizers),
            "tensor" gives each parameter whole to one rank, "auto" picks per class (see
            shardoptim.kinds).
        hparam_sync: "broadcast" (default) makes every group's numeric options equal to rank 0's
            before each step; "check" raises if they differ; "off" trusts the user.
        bucket_numel: soft cap on elements per bucket (one collective each).
        verify_every: run `verify_replicas()` after every this many steps (0: never).
        **defaults: options for the base optimizer (lr, betas, ...). When neither `fused` nor
            `foreach` is given, fused=True is used where the class supports it, else foreach=True.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[Optimizer],
        *,
        process_group: dist.ProcessGroup | None = None,
        sharding: str = "auto",
        hparam_sync: HparamSync = "broadcast",
        bucket_numel: int = DEFAULT_BUCKET_NUMEL,
        verify_every: int = 0,
        **defaults: Any,
    ) -> None:
        self._kind: Kind = resolve_kind(optimizer_class, sharding)
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ValueError(f"bucket_numel must be a positive int, got {bucket_numel!r}")
        if isinstance(verify_every, bool) or not isinstance(verify_every, int) or verify_every < 0:
            raise ValueError(
                f"verify_every must be an int >= 0 (0 turns the check off), got {verify_every!r}"
            )
        self._verify_every = verify_every
        self._num_steps = 0
        groups = _as_param_groups(params)
        if self._kind == "lbfgs" and len(groups) != 1:
            raise ValueError(
                f"torch.optim.LBFGS supports one param group, got {len(groups)}; pass the parameters as one "
                "group (LBFGS does not support per-parameter options)"
            )
        params_list = _validate_params(groups)
        self._comm = Comm(process_group)
        self._hparams = HparamSyncer(self._comm, hparam_sync)
        self._optimizer_class = optimizer_class
        self._bucket_numel = bucket_numel
        self._params: list[torch.Tensor] = []
        self._buckets: list[_Bucket] = []
        self._pieces: list[_Piece] = []
        self._buffers: list[FlatBuffers] = []
        self._layouts: list[Layout] = []
        self._tensor_loads = [0.0] * self._comm.world_size
        self._consolidated: dict[str, Any] | None = None
        self._consolidated_to: int | None = None
        self._building = True
        resolved = resolve_impl_flags(optimizer_class, defaults, groups)
        if self._kind != "lbfgs":
            _probe_complex_support(optimizer_class, resolved, params_list)
        super().__init__(groups, resolved)
        self._building = False

        local_groups = self._place_params_(params_list, list(range(len(self.param_groups))))
        self.optim: Optimizer
        failure: Exception | None = None
        try:
            if self._kind == "lbfgs":
                from shardoptim.lbfgs import ShardedLBFGS

                self.optim = ShardedLBFGS(local_groups, shard=_ShardAccess(self), **resolved)
            else:
                self.optim = optimizer_class(local_groups, **resolved)
        except Exception as err:
            failure = err
        self._raise_if_any_rank_failed(failure, what=f"{optimizer_class.__name__} rejected the parameters")
        for buffers in self._buffers:
            buffers.bind_params_(self._params)
        for key, value in self.optim.defaults.items():
            self.defaults.setdefault(key, value)
        for wrapper_group, local_group in zip(self.param_groups, self.optim.param_groups):
            for key, value in local_group.items():
                if key not in STRUCTURE_KEYS:
                    wrapper_group.setdefault(key, value)
        self._log_layout()

    # ----------------------------------------------------------------------------------- layout

    def _place_params_(
        self, new_params: list[torch.Tensor], group_indices: list[int]
    ) -> list[dict[str, Any]]:
        """Lay out `new_params`, allocate their buckets and pieces; return the local group dicts.

        The parameters are not yet bound to the buckets (the caller binds them once the local
        optimizer accepted the groups, so a rejected option leaves the model untouched).
        """
        first_index = len(self._params)
        first_bucket = len(self._buckets)
        key_to_id: dict[tuple[str, torch.dtype, bool], int] = {}
        keys = [
            key_to_id.setdefault((str(p.device), p.dtype, p.requires_grad), len(key_to_id))
            for p in new_params
        ]
        numels = [p.numel() for p in new_params]
        layout: Layout
        if self._kind != "tensor":
            layout = build_flat_layout(
                numels, num_shards=self._comm.world_size, keys=keys, bucket_numel=self._bucket_numel
            )
        else:
            cost = tensor_cost(self._optimizer_class)
            costs = [cost(p.shape) for p in new_params]
            owners = assign_whole_tensors(
                costs, num_shards=self._comm.world_size, initial_loads=self._tensor_loads
            )
            for owner, value in zip(owners, costs):
                self._tensor_loads[owner] += value
            layout = build_tensor_layout(
                numels,
                num_shards=self._comm.world_size,
                owners=owners,
                keys=keys,
                bucket_numel=self._bucket_numel,
            )
        buffers = FlatBuffers(layout, new_params, offset=first_index)
        self._layout = layout
        self._layouts.append(layout)
        self._params.extend(new_params)
        self._buffers.append(buffers)
        index_to_group = {}
        for group_index in group_indices:
            for p in self.param_groups[group_index]["params"]:
                index_to_group[id(p)] = group_index
        for b, bucket in enumerate(layout.buckets):
            self._buckets.append(
                _Bucket(
                    buffers.buffers[b], bucket.bounds, [first_index + pl.index for pl in bucket.placements]
                )
            )
        for piece in layout.local_slices(self._comm.rank):
            param = new_params[piece.index]
            shape = param.shape if self._kind == "tensor" else None
            local = buffers.local_view(piece, shape=shape)
            owner_bucket = self._buckets[first_bucket + piece.bucket]
            owner_bucket.group_to_locals.setdefault(index_to_group[id(param)], []).append(local)
            self._pieces.append(
                _Piece(first_index + piece.index, first_bucket + piece.bucket, piece.in_param, local)
            )
        local_groups = []
        for group_index in group_indices:
            wrapper_group = self.param_groups[group_index]
            locals_ = [
                piece.local
                for piece in self._pieces
                if piece.index >= first_index and index_to_group[id(self._params[piece.index])] == group_index
            ]
            local_group = {k: v for k, v in wrapper_group.items() if k not in STRUCTURE_KEYS}
            local_group["params"] = locals_
            local_groups.append(local_group)
        return local_groups

    def _raise_if_any_rank_failed(self, failure: Exception | None, *, what: str) -> None:
        """Raise on every rank when the local step `what` failed on any rank (else return).

        The failing rank re-raises its own exception unchanged; the others raise a ValueError that
        names that rank and its message, so no rank is left waiting in a later collective.

        Collective: call on every rank of the group, in the same order.
        """
        if self._comm.world_size == 1:
            if failure is not None:
                raise failure
            return
        mine = None if failure is None else f"{type(failure).__name__}: {failure}"
        messages = self._comm.all_gather_object(mine, what=what)
        if failure is not None:
            raise failure
        for rank, message in enumerate(messages):
            if message is not None:
                raise ValueError(f"{self._comm.prefix}{what} on rank {rank}: {message}")

    def _log_layout(self) -> None:
        if self._comm.rank != 0 or not logger.isEnabledFor(logging.INFO):
            return
        rank_to_numel = self.rank_to_numel()
        total = sum(rank_to_numel)
        logger.info(
            "ShardedOptimizer(%s, %s): %d ranks, %d buckets, %s elements per rank (max), imbalance %.6f",
            self._optimizer_class.__name__,
            self._kind,
            self._comm.world_size,
            len(self._buckets),
            f"{max(rank_to_numel):,}",
            max(rank_to_numel) * len(rank_to_numel) / total if total else 1.0,
        )

    def rank_to_numel(self) -> list[int]:
        """Return the parameter elements whose state each rank owns (all groups; no communication)."""
        totals = [0] * self._comm.world_size
        for layout in self._layouts:
            for rank, numel in enumerate(layout.rank_to_numel()):
                totals[rank] += numel
        return totals

    # ----------------------------------------------------------------------------------- API

    @property
    def sharding(self) -> Kind:
        """How the state is sharded: "flat", "tensor" or "lbfgs"."""
        return self._kind

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group on every rank; its parameters get buckets of their own.

        Collective: call on every rank of the group, in the same order, with the same group.
        """
        if self._building:
            super().add_param_group(param_group)
            return
        if self._kind == "lbfgs":
            raise ValueError(
                "torch.optim.LBFGS supports one param group; pass every parameter when building the optimizer"
            )
        groups = _as_param_groups([param_group])
        new_params = _validate_params(groups)
        types = sorted({p.device.type for p in new_params} | {self._params[0].device.type})
        if len(types) > 1:
            raise ValueError(
                f"add_param_group: the new parameters' device types {types} differ from this optimizer's "
                f"({self._params[0].device.type}); move them to the same device first"
            )
        known = {id(p) for p in self._params}
        clash = [i for i, p in enumerate(new_params) if id(p) in known]
        if clash:
            raise ValueError(
                f"add_param_group: params {clash} of the new group are already in this optimizer; "
                "each parameter may belong to one group only"
            )
        numel = torch.tensor([len(new_params), sum(p.numel() for p in new_params)], dtype=torch.float64)
        gathered = self._comm.all_gather(numel.to(self._comm.device), what="add_param_group check").cpu()
        if not bool((gathered == gathered[0]).all()):
            raise ValueError(
                f"{self._comm.prefix}add_param_group got different groups on different ranks "
                f"((num_params, numel) per rank: {gathered.tolist()}); add the same group on every rank"
            )
        super().add_param_group(groups[0])
        group_index = len(self.param_groups) - 1
        try:
            local_group = self._place_params_(new_params, [group_index])[0]
            self.optim.add_param_group(local_group)
        except Exception:
            self.param_groups.pop()
            raise
        self._buffers[-1].bind_params_(self._params)
        for key, value in self.optim.param_groups[-1].items():
            if key not in STRUCTURE_KEYS:
                self.param_groups[-1].setdefault(key, value)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the full optimizer state onto rank `to`, for a following `state_dict()` there.

        Collective: call on every rank of the group, in the same order. Streams tensor by tensor
        (no shard is pickled); the result is kept on rank `to` until the next `step`.
        """
        from shardoptim.state_dict import consolidate

        self._consolidated = consolidate(self, to=to)
        self._consolidated_to = to

    def state_dict(self) -> dict[str, Any]:
        """Return the consolidated state in the base optimizer's own format (rank `to` only).

        Raises:
            RuntimeError: consolidate_state_dict(to=...) was not called since the last step, or
                this is not rank `to`.
        """
        if self._consolidated is None:
            where = (
                "on this rank"
                if self._consolidated_to is None
                else f"on rank {self._consolidated_to}, not on rank {self._comm.rank}"
            )
            raise RuntimeError(
                f"{self._comm.prefix}no consolidated state {where}: call opt.consolidate_state_dict(to=r) on "
                "every rank after the last step, then opt.state_dict() on rank r"
            )
        return self._consolidated

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a consolidated state_dict (or a plain torch.optim one) saved at any world size.

        Call on every rank with the full dict; each rank keeps the part it owns. The caller's
        dict is not modified.
        """
        from shardoptim.state_dict import load

        load(self, state_dict)

    def verify_replicas(self) -> None:
        """Raise on every rank, naming the first parameter that differs, if replicas diverged.

        Compares an exact checksum of every parameter and the packed hyperparameters.

        Collective: call on every rank of the group, in the same order.
        """
        from shardoptim.replicas import verify_replicas

        verify_replicas(self)

    def local_state_nbytes(self) -> int:
        """Return the bytes of optimizer-state tensors held by this rank (its shard only)."""

        def nbytes(value: object) -> int:
            if isinstance(value, torch.Tensor):
                return value.numel() * value.element_size()
            if isinstance(value, (list, tuple)):
                return sum(nbytes(v) for v in value)
            return 0

        return sum(nbytes(value) for state in self.optim.state.values() for value in state.values())

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Run one optimizer step on every rank: sync options, update the owned shard, gather.

        Collective: call on every rank of the group, in the same order.

        Args:
            closure: re-evaluates the model and returns the loss; called exactly once on every
                rank (with grad enabled) before the update.

        Returns:
            The closure's loss, or None without a closure.
        """
        if self._kind == "lbfgs":
            return self._step_lbfgs(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_storage()
        self._check_grads()
        self._consolidated = None
        self._consolidated_to = None
        self._hparams.sync_(self.param_groups)
        copy_hparams_(self.param_groups, self.optim.param_groups)
        with torch.no_grad():
            self._update_and_gather()
        self._num_steps += 1
        if self._verify_every and self._num_steps % self._verify_every == 0:
            self.verify_replicas()
        return loss

    # ----------------------------------------------------------------------------------- step

    def _step_lbfgs(self, closure: Callable[[], float] | None) -> float:
        if closure is None:
            raise ValueError(
                "LBFGS needs a closure that re-evaluates the model and returns the loss: "
                "opt.step(closure); see examples/lbfgs_fit.py"
            )
        self._check_storage()
        self._consolidated = None
        self._consolidated_to = None
        self._hparams.sync_(self.param_groups)
        copy_hparams_(self.param_groups, self.optim.param_groups)
        return self.optim.step(closure)

    def _gather_all(self) -> None:
        """All-gather every bucket so each rank holds the full parameters (Collective)."""
        pending = [
            self._comm.gather_bucket_async(b.buffer, b.bounds, what=f"parameter gather (bucket {i})")
            for i, b in enumerate(self._buckets)
        ]
        for handle in pending:
            handle.wait()

    def _check_storage(self) -> None:
        bad = [i for buffers in self._buffers for i in buffers.unbound(self._params)]
        if bad:
            p = self._params[bad[0]]
            raise RuntimeError(
                f"{self._comm.prefix}{len(bad)} parameter(s) no longer use the optimizer's storage (first: "
                f"parameter {bad[0]}, shape {tuple(p.shape)}, {p.dtype} on {p.device}): their storage was "
                "replaced after the optimizer was built (model.to(), .half(), ...). Build the ShardedOptimizer "
                "after moving or casting the model"
            )

    def _check_grads(self) -> None:
        """Reject gradients flat sharding cannot slice, on every rank (grads are the same everywhere)."""
        if self._kind != "flat":
            return
        for index, param in enumerate(self._params):
            if param.grad is not None and param.grad.is_sparse:
                raise TypeError(
                    f"{self._comm.prefix}parameter {index} (shape {tuple(param.shape)}) has a sparse gradient, "
                    "which flat sharding cannot slice; use sharding='tensor' (e.g. with torch.optim.SparseAdam)"
                )

    def _attach_grads(self, active: list[bool]) -> list[bool]:
        """Point each local piece's .grad at its part of the full gradient; return per-bucket 'has work'."""
        has_work = [False] * len(self._buckets)
        for piece in self._pieces:
            grad = self._params[piece.index].grad
            if grad is None or not active[piece.bucket]:
                piece.local.grad = None
                continue
            if self._kind == "tensor":
                piece.local.grad = grad
            else:
                piece.local.grad = grad.reshape(-1).narrow(0, piece.in_param.start, piece.in_param.numel)
            has_work[piece.bucket] = True
        return has_work

    def _update_and_gather(self) -> None:
        # NOTE: a bucket is gathered when any of its parameters requires grad now. requires_grad is
        # set by model code, the same on every rank, so every rank enters the same collectives;
        # buckets of frozen parameters cost no communication until they are unfrozen.
        active = [any(self._params[i].requires_grad for i in b.param_indices) for b in self._buckets]
        has_work = self._attach_grads(active)
        groups = self.optim.param_groups
        saved = [g["params"] for g in groups]
        pending: list[PendingGather] = []
        try:
            for b, bucket in enumerate(self._buckets):
                if has_work[b]:
                    for group_index, group in enumerate(groups):
                        group["params"] = bucket.group_to_locals.get(group_index, [])
                    self.optim.step()
                if active[b]:
                    pending.append(
                        self._comm.gather_bucket_async(
                            bucket.buffer, bucket.bounds, what=f"parameter gather (bucket {b})"
                        )
                    )
        finally:
            for group, plist in zip(groups, saved):
                group["params"] = plist
            for piece in self._pieces:
                piece.local.grad = None
        for handle in pending:
            handle.wait()


class _ShardAccess:
    """What the sharded LBFGS needs from its ShardedOptimizer: this rank's pieces and the gather."""

    def __init__(self, owner: ShardedOptimizer) -> None:
        self._owner = owner

    @property
    def comm(self) -> Comm:
        return self._owner._comm

    def local_params(self) -> list[torch.Tensor]:
        """Return this rank's 1-D views of the parameters (writes go straight into the buckets)."""
        return [piece.local for piece in self._owner._pieces]

    def local_grads(self) -> list[torch.Tensor]:
        """Return this rank's 1-D slices of the full gradients (zeros where a grad is None)."""
        out = []
        for piece in self._owner._pieces:
            grad = self._owner._params[piece.index].grad
            if grad is None:
                out.append(torch.zeros_like(piece.local))
            else:
                out.append(grad.reshape(-1).narrow(0, piece.in_param.start, piece.in_param.numel))
        return out

    def gather_params(self) -> None:
        """Make every rank's full parameters equal to the owners' pieces.

        Collective: call on every rank of the group, in the same order.
        """
        self._owner._gather_all()
