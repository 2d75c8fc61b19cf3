"""Which bucket transport (shardoptim.transports) a group uses, per device type: chosen once, then fixed.

Accelerator buckets, and every bucket of a group without gloo, use torch's collectives
("all_gather"). CPU buckets of a gloo group use shared memory when every rank is on one host and the
staging area can be mapped (mapped when the choice is made, so no later call can find it missing
and switch ways): their buckets then live in peer regions where they can (`open_peer_region`),
else gloo broadcasts; under an MPI launcher (comm_backend "auto" or
"mpi") mpi4py serves what it does faster. Must not import shardoptim.optimizer.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch

from shardoptim.peer_region import PeerRegion, open_peer_region
from shardoptim.shm import SharedStaging, same_host
from shardoptim.transports import BucketTransport, ShmTransport, TorchTransport, TransportName

if TYPE_CHECKING:
    from shardoptim.comm import Comm

logger = logging.getLogger("shardoptim.comm")


class TransportChoice:
    """The transports of one group's buckets, per device type, and its one shared-memory staging area."""

    def __init__(self, comm: Comm) -> None:
        self._comm = comm
        self._by_type: dict[str, BucketTransport] = {}
        self._staging: SharedStaging | None = None

    def get(self, device: torch.device) -> BucketTransport:
        """Return how buckets on `device` move between ranks (see the module docstring).

        Collective on first use for each device type: call on every rank, in the same order.
        """
        found = self._by_type.get(device.type)
        if found is None:
            found = self._by_type[device.type] = self._choose(device)
            logger.debug("%sbucket transport for %s: %s", self._comm.prefix, device.type, found.name)
        return found

    def _choose(self, device: torch.device) -> BucketTransport:
        comm = self._comm
        if device.type != "cpu" or comm.backend != "gloo":
            return TorchTransport(comm, "all_gather")
        base: BucketTransport = TorchTransport(comm, "broadcast")
        if same_host(functools.partial(comm.all_gather_object, what="host check")):
            staging = self._staging_area()
            if staging.map_("shared-memory setup"):  # same answer on every rank
                base = ShmTransport(comm, staging)
        if comm.backend_choice == "torch":
            return base
        from shardoptim.mpi_transport import MpiTransport, open_mpi

        mpi = open_mpi(comm)
        return base if mpi is None else MpiTransport(comm, mpi, base, forced=comm.backend_choice == "mpi")

    def use(self, name: TransportName) -> None:
        """Fix the transport of CPU buckets to `name` ("broadcast", "all_gather" or "shm") before first use.

        For comparisons (benchmarks, tests); the automatic choice is `get`. Raises when "shm"
        cannot be mapped. Collective: call on every rank, in the same order.
        """
        if name == "shm":
            staging = self._staging_area()
            if not staging.map_("shared-memory setup"):
                raise RuntimeError(f"{self._comm.prefix}the shared-memory staging area cannot be mapped here")
            self._by_type["cpu"] = ShmTransport(self._comm, staging)
        elif name in ("broadcast", "all_gather"):
            self._by_type["cpu"] = TorchTransport(self._comm, name)
        else:
            raise ValueError(f"transports.use takes 'broadcast', 'all_gather' or 'shm', got {name!r}")

    def cpu_name(self) -> TransportName:
        """The name of the CPU buckets' transport (choosing it: collective on first use)."""
        return self.get(torch.device("cpu")).name

    def shared_staging(self) -> SharedStaging | None:
        """The staging area when CPU buckets go through shared memory, else None (collective on first use)."""
        transport = self.get(torch.device("cpu"))
        for candidate in (transport, getattr(transport, "other", None)):
            if isinstance(candidate, ShmTransport):
                return candidate.staging
        return None

    def open_peer_region(self, nbytes: int, signature: object) -> PeerRegion | None:
        """Map `nbytes` of CPU buckets per rank where every peer can read them (shardoptim.peer_region).

        Only where CPU buckets move through shared memory; None (on every rank) elsewhere or when
        a rank cannot reserve its file: then gathers go through the staging area (two copies).
        `signature` names the buckets (the same on every rank). Collective: call on every rank,
        in the same order.
        """
        comm = self._comm
        if not isinstance(self.get(torch.device("cpu")), ShmTransport):
            return None
        region, why = open_peer_region(
            comm.rank,
            nbytes,
            signature,
            functools.partial(comm.all_gather_object, what="shared parameter memory setup"),
            lambda: comm.barrier(what="shared parameter memory setup"),
        )
        if region is None and why and comm.rank == 0:
            logger.warning(
                "%sparameters stay in private memory and every gather copies them twice through the "
                "shared staging area: %s. A larger /dev/shm (docker run --shm-size) allows one copy",
                comm.prefix,
                why,
            )
        return region

    def _staging_area(self) -> SharedStaging:
        """Return the group's one staging area (not mapped yet), for gathers and reduce-scatters alike.

        NOTE: one fixed area of two halves (shm.HALF_NBYTES each) serves every shared-memory
        collective, in the order they are called: its RSS is bounded whatever the model.
        """
        comm = self._comm
        if self._staging is None:
            self._staging = SharedStaging(
                comm.rank,
                comm.world_size,
                functools.partial(comm.all_gather_object, what="shared-memory setup"),
                lambda what: comm.barrier(what=what),
                timeout_s=comm.timeout_s(),
            )
        return self._staging
