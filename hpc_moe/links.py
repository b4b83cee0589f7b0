"""The links between the nodes of a run and inside them, measured in a second at the start.

``measure_links`` times a ping-pong between the first ranks of every pair of nodes (and between
the first two ranks of every node, for the link inside it): small messages for the latency, one
quarter of a large message and all of it, each way, for the bandwidth. Pairs are measured in rounds in which every node is in
one pair (the circle method: N - 1 rounds for N nodes, one more inside the nodes), so a round
times links that do not share a NIC; the ranks not in a pair wait sleeping, so that on a node
whose ranks share cores they do not take the cores the pair needs.

What the links are for: placement (``Links.node_cost``: which node's slots take the heaviest
experts), the trace (``links`` root attribute) and the planner (``hpc-moe plan --links-from``).

Legend: N nodes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.comm import ParallelContext

UNEVEN = 1.3  # node costs further apart than this are a difference of links, not noise


@dataclass(frozen=True, eq=False)
class Links:
    """bytes_per_s_NN[a, b]: what one message from node a's first rank reached to node b's (a != b),
    or between two ranks of node a (a == b; NaN for a node of one rank); latency_s_NN the same for
    half a small message's round trip; message_bytes: the larger of the two sizes the bandwidth
    was timed with; cross_node_bytes: what the measurement sent between nodes in all (the
    interfaces count it, the trace's steps do not); seconds: how long the measurement took."""

    bytes_per_s_NN: np.ndarray
    latency_s_NN: np.ndarray
    message_bytes: int
    cross_node_bytes: int = 0
    seconds: float = 0.0

    @property
    def num_nodes(self) -> int:
        return len(self.bytes_per_s_NN)

    def between(self) -> np.ndarray:
        """float [N (N - 1)]: the bandwidths between distinct nodes."""
        return self.bytes_per_s_NN[~np.eye(self.num_nodes, dtype=bool)]

    def inside(self) -> np.ndarray:
        """float [<= N]: the bandwidths inside the nodes that have two ranks or more."""
        d = np.diag(self.bytes_per_s_NN)
        return d[np.isfinite(d)]

    def node_cost(self) -> np.ndarray | None:
        """float [N]: seconds per byte a node's experts spend to hear from and answer every other
        node (sum over b != a of 1 / bw(b, a) + 1 / bw(a, b)), over the cheapest node's; None
        where the nodes' costs are within UNEVEN of one another (equal links and their noise)."""
        if self.num_nodes < 2:
            return None
        inv = 1.0 / self.bytes_per_s_NN
        np.fill_diagonal(inv, 0.0)
        cost = inv.sum(axis=0) + inv.sum(axis=1)
        return cost / cost.min() if cost.max() > UNEVEN * cost.min() else None

    def to_dict(self) -> dict:
        nan = lambda a: [[None if not np.isfinite(x) else float(x) for x in row] for row in a]  # noqa: E731
        return {"bytes_per_s": nan(self.bytes_per_s_NN), "latency_s": nan(self.latency_s_NN),
                "message_bytes": self.message_bytes, "cross_node_bytes": self.cross_node_bytes, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> Links:
        num = lambda a: np.array([[np.nan if x is None else float(x) for x in row] for row in a])  # noqa: E731
        return cls(num(d["bytes_per_s"]), num(d["latency_s"]), int(d["message_bytes"]), int(d.get("cross_node_bytes", 0)),
                   float(d.get("seconds", 0.0)))

    def describe(self) -> str:
        """One line: the range of the links between and inside nodes."""
        b = self.between()
        span = lambda a: f"{a.min() / 1e9:.3g}-{a.max() / 1e9:.3g} GB/s" if len(a) else "none"  # noqa: E731
        lat = self.latency_s_NN[~np.eye(self.num_nodes, dtype=bool)]
        return (f"between nodes {span(b)}" + (f", {np.median(lat) * 1e6:.0f} us" if len(lat) else "")
                + f"; inside nodes {span(self.inside())} (timed in {self.seconds:.1f} s)")


def _rounds(n: int) -> list[list[tuple[int, int]]]:
    """The circle method: n - 1 rounds (n even; a bye with n odd) in which every node meets
    another once."""
    ids = list(range(n)) + ([None] if n % 2 else [])
    m = len(ids)
    out = []
    for _ in range(m - 1):
        out.append([(ids[i], ids[m - 1 - i]) for i in range(m // 2) if None not in (ids[i], ids[m - 1 - i])])
        ids = [ids[0], ids[-1], *ids[1:-1]]
    return out


def _sleep_wait(req: MPI.Request) -> None:
    while not req.Test():
        time.sleep(0.0005)


def _round_trip(comm: MPI.Comm, peer: int, sender: bool, msg: np.ndarray, answer: np.ndarray, tag: int) -> float:
    """``msg`` from the sender to its peer and ``answer`` back (tags ``tag`` and ``tag + 1``): the
    seconds it took."""
    t = time.perf_counter()
    if sender:
        comm.Send(msg, peer, tag)
        comm.Recv(answer, peer, tag + 1)
    else:
        comm.Recv(msg, peer, tag)
        comm.Send(answer, peer, tag + 1)
    return time.perf_counter() - t


def _ping(comm: MPI.Comm, peer: int, first: bool, small: np.ndarray, big: np.ndarray,
          reps: int) -> tuple[float, float, float, int]:
    """(latency, bandwidth to peer, bandwidth from peer, bytes sent) by ping-pong; the first rank of a pair
    leads. One-way bandwidth: a message of a quarter of ``big`` and one of all of it, each
    answered by a small one; the bytes between them over the time between them, so that neither
    the latency nor what a link lets through at once (a switch's buffer, a shaper's burst) counts
    (the whole message's rate where the two sizes cannot tell them apart)."""
    rtt = float(np.median([_round_trip(comm, peer, first, small, small, 1) for _ in range(reps)]))
    sent = reps * small.nbytes
    quarter = big[:len(big) // 4]
    times = {(d, m.nbytes): [] for d in (True, False) for m in (quarter, big)}
    for _ in range(5):
        for sender in (first, not first):
            for msg in (quarter, big):
                times[sender == first, msg.nbytes].append(_round_trip(comm, peer, sender, msg, small, 3))
                sent += msg.nbytes if sender else small.nbytes
    bw = []
    for d in (True, False):
        t_big, t_quarter = np.median(times[d, big.nbytes]), np.median(times[d, quarter.nbytes])
        plain = big.nbytes / max(t_big - rtt, 1e-9)
        slope = (big.nbytes - quarter.nbytes) / max(t_big - t_quarter, 1e-9)
        # The quarter taking nearly as long as the whole (noise, a fast link's fixed costs): the
        # sizes do not resolve a slope, and the whole message's rate is the honest figure.
        bw.append(slope if slope <= 4 * plain else plain)
    return rtt / 2, bw[0], bw[1], sent


def measure_links(ctx: ParallelContext, message_bytes: int = 2 << 20, reps: int = 10) -> Links:
    """Collective on ctx.world: every node pair's and every node's link (see the module). The same
    Links on every rank."""
    comm, n, start = ctx.world, ctx.num_nodes, time.perf_counter()
    ranks_of = [[r for r in range(ctx.size) if ctx.node_of_rank[r] == k] for k in range(n)]
    bw, lat, cross = np.zeros((n, n)), np.zeros((n, n)), 0
    small, big = np.zeros(8, np.uint8), np.zeros(message_bytes, np.uint8)
    inside = [(ranks_of[k][0], ranks_of[k][1], k, k) for k in range(n) if len(ranks_of[k]) > 1]
    rounds = [inside] + [[(ranks_of[a][0], ranks_of[b][0], a, b) for a, b in r] for r in _rounds(n)]
    for pairs in rounds:
        _sleep_wait(comm.Ibarrier())
        for ra, rb, a, b in pairs:
            if ctx.rank in (ra, rb):
                first = ctx.rank == ra
                la, to, fro, sent = _ping(comm, rb if first else ra, first, small, big, reps)
                cross += sent if a != b else 0
                if first:
                    lat[a, b] = lat[b, a] = la
                    bw[a, b], bw[b, a] = (to, fro) if a != b else (np.median([to, fro]),) * 2
    _sleep_wait(comm.Iallreduce(MPI.IN_PLACE, [bw, MPI.DOUBLE], op=MPI.SUM))
    _sleep_wait(comm.Iallreduce(MPI.IN_PLACE, [lat, MPI.DOUBLE], op=MPI.SUM))
    total = np.array([cross], np.int64)
    _sleep_wait(comm.Iallreduce(MPI.IN_PLACE, [total, MPI.INT64_T], op=MPI.SUM))
    lonely = [k for k in range(n) if len(ranks_of[k]) < 2]
    bw[lonely, lonely] = lat[lonely, lonely] = np.nan
    return Links(bw, lat, message_bytes, int(total[0]), comm.bcast(time.perf_counter() - start))
