"""ParallelContext: the communicators of one run, built and validated once.

Layout (world size W = dp x ep_size): model replica r is the EP group of world ranks
[r * ep_size, (r + 1) * ep_size), so one replica spans consecutive ranks (and, with block rank
placement, whole nodes); the DP group of a rank holds the ranks with its ep_rank in every replica.
An expert slot is ``expert_tp`` consecutive ranks of an EP group (tensor parallel inside the expert).

Topology: ranks that share memory form a node (``Split_type(COMM_TYPE_SHARED)``). On one machine,
tests, benchmarks and jobs (``--ranks-per-node K``) can pretend that every k consecutive ranks form a
node with ``ranks_per_node=k``; the topology is recorded in the trace either way.

Legend: W world ranks, P ranks of the EP group.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.errors import InputError

_NAME_BYTES = 256  # a fixed width so that host names travel with an uppercase Allgather


class ParallelError(InputError):
    """The parallel layout asked for does not fit the world (the message says which rule)."""


@dataclass(frozen=True, eq=False)
class ParallelContext:
    """Communicators and topology of one run; pass it explicitly, never keep it in a global.

    world/rank/size: the communicator the run was started on. node_comm/local_rank/local_size: the
    ranks of this node. node_id: index of this node (nodes numbered in order of their lowest world
    rank); num_nodes; node_of_rank: node id of every world rank [W]; hostnames: host of every world
    rank [W]; machines: the physical machine of every world rank [W] (the kernel's boot id: nodes
    that are network namespaces of one machine share its cores and memory). ep_comm/ep_rank/
    ep_size: the EP group (one model replica). dp_comm/dp_rank/dp_size: the ranks with this
    ep_rank in all replicas. expert_tp: ranks per expert slot. node_of_ep_rank: node
    id of every rank of this EP group [P], the input of placement. simulated_ranks_per_node: k when
    the topology is simulated, else None.
    """

    world: MPI.Comm
    rank: int
    size: int
    node_comm: MPI.Comm
    local_rank: int
    local_size: int
    node_id: int
    num_nodes: int
    node_of_rank: tuple[int, ...]
    hostnames: tuple[str, ...]
    machines: tuple[str, ...]
    ep_comm: MPI.Comm
    ep_rank: int
    ep_size: int
    dp_comm: MPI.Comm
    dp_rank: int
    dp_size: int
    expert_tp: int
    node_of_ep_rank: tuple[int, ...]
    simulated_ranks_per_node: int | None = None

    @classmethod
    def create(cls, comm: MPI.Comm | None = None, dp: int = 1, expert_tp: int = 1,
               ranks_per_node: int | None = None) -> ParallelContext:
        """Split ``comm`` (default COMM_WORLD) into node, EP and DP groups. Collective on ``comm``.

        dp: model replicas (the world size must be divisible by it); expert_tp: ranks per expert
        slot (the EP group size must be divisible by it); ranks_per_node: simulate nodes of k
        consecutive ranks (default: the real nodes, from shared memory).
        """
        comm = MPI.COMM_WORLD if comm is None else comm
        rank, size = comm.Get_rank(), comm.Get_size()
        # Every rank checks the same numbers, so every rank raises the same error: no hang.
        _check(isinstance(dp, int) and dp >= 1, f"dp must be a positive integer (got {dp!r})")
        _check(isinstance(expert_tp, int) and expert_tp >= 1,
               f"expert_tp must be a positive integer (got {expert_tp!r})")
        _check(ranks_per_node is None or ranks_per_node >= 1,
               f"ranks_per_node must be a positive integer (got {ranks_per_node!r})")
        _check(size % dp == 0, f"world size {size} is not divisible by dp={dp}")
        ep_size = size // dp
        _check(ep_size % expert_tp == 0,
               f"EP group size {ep_size} (world {size} / dp {dp}) is not divisible by expert_tp={expert_tp}")

        if ranks_per_node is None:
            node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        else:
            node_comm = comm.Split(color=rank // ranks_per_node, key=rank)
        # A node is named by its lowest world rank; node ids follow the order of those ranks.
        leader = np.array([rank], dtype=np.int64)
        node_comm.Allreduce(MPI.IN_PLACE, [leader, MPI.INT64_T], op=MPI.MIN)
        leaders = np.empty(size, dtype=np.int64)
        comm.Allgather([leader, MPI.INT64_T], [leaders, MPI.INT64_T])
        uniq = np.unique(leaders)
        node_of_rank = tuple(int(i) for i in np.searchsorted(uniq, leaders))

        ep_index, ep_rank = divmod(rank, ep_size)
        ep_comm = comm.Split(color=ep_index, key=ep_rank)
        dp_comm = comm.Split(color=ep_rank, key=ep_index)
        first = ep_index * ep_size
        return cls(
            world=comm, rank=rank, size=size, node_comm=node_comm,
            local_rank=node_comm.Get_rank(), local_size=node_comm.Get_size(),
            node_id=node_of_rank[rank], num_nodes=len(uniq), node_of_rank=node_of_rank,
            hostnames=_gather_strings(comm, MPI.Get_processor_name()),
            machines=_gather_strings(comm, _machine_id()), ep_comm=ep_comm, ep_rank=ep_rank, ep_size=ep_size,
            dp_comm=dp_comm, dp_rank=ep_index, dp_size=dp, expert_tp=expert_tp,
            node_of_ep_rank=node_of_rank[first:first + ep_size],
            simulated_ranks_per_node=ranks_per_node)

    def describe(self) -> dict:
        """A JSON-able summary for the trace and the run log."""
        ranks_per_node = np.bincount(np.asarray(self.node_of_rank), minlength=self.num_nodes)
        return {
            "world_size": self.size, "num_nodes": self.num_nodes,
            "ranks_per_node": [int(n) for n in ranks_per_node],
            "hostnames": sorted(set(self.hostnames)),
            "ep_size": self.ep_size, "dp_size": self.dp_size, "expert_tp": self.expert_tp,
            "expert_slots": self.ep_size // self.expert_tp,
            "node_of_ep_rank": list(self.node_of_ep_rank),
            "simulated_ranks_per_node": self.simulated_ranks_per_node,
            "mpi_library": mpi_library(),
        }

    def free(self) -> None:
        """Free the communicators this context split off (not ``world``). Collective."""
        for c in (self.dp_comm, self.ep_comm, self.node_comm):
            if c != MPI.COMM_NULL:
                c.Free()


def mpi_library() -> str:
    """The MPI library's name and version on one clean line: "MPICH 5.0.2", "Open MPI v5.0.11",
    "Intel(R) MPI Library 2021.18.1 for Linux* OS". ``Get_library_version`` is a different essay
    per library (MPICH's a table of lines, Open MPI's one line with its packager and a trailing
    NUL, which HDF5 strings refuse): its first line up to the first comma, without "Version:"."""
    first = (MPI.Get_library_version().replace("\0", "").strip().splitlines() or ["unknown MPI"])[0]
    return " ".join(first.split(",")[0].replace("Version:", "").split())


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ParallelError(msg)


def _machine_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # not Linux: the host is the machine
        return MPI.Get_processor_name()


def _gather_strings(comm: MPI.Comm, text: str) -> tuple[str, ...]:
    """Every rank's ``text`` (at most _NAME_BYTES bytes of it), in rank order. Collective."""
    name = text.encode()[:_NAME_BYTES]
    mine = np.zeros(_NAME_BYTES, dtype=np.uint8)
    mine[:len(name)] = np.frombuffer(name, dtype=np.uint8)
    every = np.empty((comm.Get_size(), _NAME_BYTES), dtype=np.uint8)
    comm.Allgather([mine, MPI.BYTE], [every, MPI.BYTE])
    return tuple(bytes(row).rstrip(b"\0").decode(errors="replace") for row in every)


def abort_job(line: str, code: int) -> None:
    """Write ``line`` on stderr and end every rank of the job with exit status ``code``. The abort
    tears the launcher's stderr forwarding down (Hydra's proxies, srun's I/O threads), so the line
    gets a moment to pass through first; without it a loaded machine loses it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    time.sleep(1.0)
    MPI.COMM_WORLD.Abort(code)


_FAILED, _AGREED = 32001, 32002  # point-to-point tags: apart from every collective's matching


def fail_together(message: str, code: int, wait_s: float = 30.0) -> None:
    """End a job whose ranks found bad input: where every rank failed (inputs are checked alike on
    every rank, before any collective), rank 0 alone writes ``message`` and every rank returns, to
    exit with ``code`` (the program finalizes MPI on its way out: hpc_moe.cli.entry); where some
    rank has not failed within ``wait_s`` (it waits in a collective for this one), abort the job
    with this rank's message."""
    # wait_s: ranks that share few cores reach the same check seconds apart (16 ranks importing on 2
    # cores); a rank that never fails costs this long before the abort.
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if rank == 0:
        reqs = [world.irecv(source=r, tag=_FAILED) for r in range(1, size)]
    else:
        reqs = [world.isend(None, dest=0, tag=_FAILED), world.irecv(source=0, tag=_AGREED)]
    deadline = time.monotonic() + wait_s
    while not MPI.Request.Testall(reqs):
        if time.monotonic() > deadline:
            abort_job(f"hpc-moe [rank {rank}]: {message}", code)
        time.sleep(0.005)
    if rank == 0:
        for r in range(1, size):
            world.send(None, dest=r, tag=_AGREED)
        sys.stderr.write(f"hpc-moe: {message}\n")
        sys.stderr.flush()
