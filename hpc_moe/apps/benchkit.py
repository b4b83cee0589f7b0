"""What the benchmarks share: per-iteration timing reduced over ranks, the raw Ialltoallv floor of
the same bytes, an OSU-style overlap measurement, and the JSON/table output on rank 0.

Every time is the max over ranks of one iteration (the slowest rank sets the pace of a collective
step); figures are medians over iterations, as OSU and nccl-tests report.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI


def timed(comm: MPI.Comm, sync, fn):
    """Barrier, then (seconds of fn() on this rank, its result)."""
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def max_over_ranks(comm: MPI.Comm, seconds) -> np.ndarray:
    a = np.array(seconds, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.MAX)
    return a


def mean_over_ranks(comm: MPI.Comm, v: float) -> float:
    a = np.array([v], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.SUM)
    return float(a[0]) / comm.Get_size()


def min_over_ranks(comm: MPI.Comm, v: float) -> float:
    a = np.array([v], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.MIN)
    return float(a[0])


def summary(seconds, nbytes: float = 0.0) -> dict:
    """Median / p99 / max in ms of per-iteration times, and the bandwidth of nbytes at the median."""
    med = float(np.median(seconds))
    return {"median_ms": 1e3 * med, "p99_ms": 1e3 * float(np.percentile(seconds, 99)),
            "max_ms": 1e3 * float(np.max(seconds)), "mb_per_rank": nbytes / 1e6,
            "algbw_gbps": nbytes / med / 1e9 if med > 0 and nbytes else 0.0}


class RawFloor:
    """Ready buffers for a bare Ialltoallv of given per-peer row counts and row width on a
    transport: the floor of what an exchange of those bytes costs."""

    def __init__(self, transport, send_counts_P, recv_counts_P, width: int):
        xp = transport.backend.xp
        self.tr, self.send_counts, self.recv_counts = transport, send_counts_P, recv_counts_P
        self.send = transport.to_wire(xp.zeros((max(int(send_counts_P.sum()), 1), width), dtype=np.uint8))
        self.recv = transport.empty(int(recv_counts_P.sum()), width)

    def post(self):
        return self.tr.ialltoallv(self.send, self.send_counts, self.recv, self.recv_counts)

    def run(self) -> None:
        self.post().Wait()

    def close(self) -> None:
        self.tr.release(self.send, self.recv)


def osu_overlap(comm: MPI.Comm, backend, post, finish, t_pure: float, iters: int) -> dict:
    """Overlap of an operation as osu_ialltoallv measures it: a dummy compute sized to the
    operation's time (t_pure) runs alone (t_cpu) and between post() and finish(op), calling
    op.progress() after each unit (t_ovl); overlap = 100 (1 - (t_ovl - t_cpu) / t_pure)."""
    xp = backend.xp
    a = xp.asarray(np.random.default_rng(1).standard_normal((256, 256)), dtype=np.float32)

    def unit():
        a @ a
        backend.synchronize()

    t0 = time.perf_counter()
    for _ in range(20):
        unit()
    n = max(1, round(t_pure / ((time.perf_counter() - t0) / 20)))
    t_cpu, t_ovl = [], []
    for _ in range(max(3, iters // 2)):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            unit()
        t_cpu.append(time.perf_counter() - t0)
        comm.Barrier()
        t0 = time.perf_counter()
        op = post()
        for _ in range(n):
            unit()
            op.progress()
        finish(op)
        backend.synchronize()
        t_ovl.append(time.perf_counter() - t0)
    tc, to = float(np.median(t_cpu)), float(np.median(t_ovl))
    pct = max(0.0, 100.0 * (1.0 - (to - tc) / t_pure)) if t_pure > 0 else 0.0
    return {"overlap_pct": mean_over_ranks(comm, pct), "overlap_pct_min": min_over_ranks(comm, pct),
            "t_pure_ms": 1e3 * mean_over_ranks(comm, t_pure), "t_cpu_ms": 1e3 * mean_over_ranks(comm, tc),
            "t_overlapped_ms": 1e3 * mean_over_ranks(comm, to)}


class Polled:
    """An MPI request with the progress() an overlap measurement polls."""

    def __init__(self, req):
        self.req = req

    def progress(self) -> bool:
        return self.req.Test()
