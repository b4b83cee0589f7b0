"""Channels: the communicators and transports the exchanges run on, made and freed in one place.

A :class:`Channel` is one communicator of the EP group with its transport (hpc_moe.ep.transport):
the group's own communicator, or a duplicate of it (each micro-batch of ``--overlap on`` has one,
because the non-blocking collectives of one communicator must start in the same order on every
rank, and micro-batches' exchanges are in flight at once), and, where the two-stage exchange runs
(hpc_moe.ep.hierarchical), its rail and node sub-channels split from it. ``Channel.open`` makes
all of them and ``Channel.close`` frees what ``open`` made, collectively; the ParallelContext
owns the communicators it was given (world, node, EP, DP).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.ep.plan import NodeMap
from hpc_moe.ep.transport import make_transport


@dataclass(frozen=True, eq=False)
class Channel:
    """comm, its transport and backend, this rank's rank and the size of comm; owns_comm: made by
    open (a duplicate or a split), freed by close; rail / node: the sub-channels of the two-stage
    exchange (rank = node id on the rail, local index on the node), or None."""

    comm: MPI.Comm
    transport: object
    backend: Backend
    rank: int
    size: int
    owns_comm: bool = False
    rail: Channel | None = None
    node: Channel | None = None
    _tags: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)

    @classmethod
    def open(cls, comm: MPI.Comm, backend: Backend, transport: str = "auto", *, need_p2p: bool = False,
             duplicate: bool = False, nodes: NodeMap | None = None, logger=None) -> Channel:
        """A channel on ``comm`` (on a duplicate of it when ``duplicate``) with the transport asked
        for (hpc_moe.ep.transport.make_transport); with ``nodes``, the rail and node sub-channels.
        Collective over comm."""
        c = comm.Dup() if duplicate else comm
        rank, size = c.Get_rank(), c.Get_size()
        # shm asked for with the two-stage exchange means shared memory inside the nodes: the EP
        # channel and the rails take what their ranks allow.
        across = "auto" if transport == "shm" and nodes is not None else transport
        quiet = logging.getLogger("hpc_moe.channel")  # the stages' choices are logged as one line
        tr = make_transport(c, backend, across, need_p2p=need_p2p, logger=logger if nodes is None else quiet)
        rail = node = None
        if nodes is not None:
            node_id, local = int(nodes.node_P[rank]), int(nodes.local_P[rank])
            # Keyed so that a rank's node id is its rank on the rail and its local index its rank
            # on the node, as HierarchicalExchange addresses them.
            rail = cls._split(c, local, node_id, backend, across, quiet)
            node = cls._split(c, node_id, local, backend, transport, quiet)
            if rank == 0:
                (logger or logging.getLogger(__name__)).info(
                    "dispatch transport: %s across nodes, %s inside them (the two-stage exchange)",
                    rail.transport.name, node.transport.name)
        return cls(c, tr, backend, rank, size, duplicate, rail, node)

    @classmethod
    def _split(cls, comm: MPI.Comm, color: int, key: int, backend: Backend, transport: str, logger) -> Channel:
        sub = comm.Split(color=color, key=key)
        return cls(sub, make_transport(sub, backend, transport, logger=logger), backend, sub.Get_rank(), sub.Get_size(),
                   owns_comm=True)

    def next_tags(self) -> int:
        """The first of 4 message tags no exchange in flight on this channel uses (the same on
        every rank: exchanges are posted in the same order everywhere)."""
        return 4 * (next(self._tags) % 4096)

    def close(self) -> None:
        """Release the transports and free the communicators open made. Collective."""
        self.transport.close()
        for sub in (self.rail, self.node):
            if sub is not None:
                sub.close()
        if self.owns_comm:
            self.comm.Free()
