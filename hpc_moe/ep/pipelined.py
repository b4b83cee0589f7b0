"""The pipelined exchange (``algorithm="pipelined"``): the seed's "process tokens as they arrive".

Per-peer Isend/Irecv instead of one Ialltoallv per direction, after the same count exchange; the
expert phase runs on each source's rows as they land (Waitsome) and sends that source's reply at
once, while later sources are still in flight. Same wire format and result as Exchange.

Legend: P peers, N rows received.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from hpc_moe.ep.exchange import Exchange, ExpertFn
from hpc_moe.ep.wire import as_bytes


class PipelinedExchange(Exchange):
    """An Exchange whose payload and reply travel as per-peer messages. Its received() and reply()
    are Exchange's (wait for every source, combine by Ialltoallv); run_experts() pipelines."""

    def _post_payload(self) -> None:
        d, tr, plan = self._d, self._d.transport, self._plan
        self._tag = d.next_tags()
        soff, roff = (np.cumsum(c) - c for c in (plan.counts_P, self.recv_counts_P))
        ring = [(d.rank + i) % d.size for i in range(d.size)]  # self first: local rows start at once
        self._srcs = [p for p in ring if self.recv_counts_P[p]]
        self._roff = roff
        self._recv_reqs = [r for p in self._srcs for r in (
            tr.irecv(self._recv[0], roff[p], self.recv_counts_P[p], p, self._tag),
            tr.irecv(self._recv[1], roff[p], self.recv_counts_P[p], p, self._tag + 1))]
        sends = [r for p in ring if plan.counts_P[p] for r in (
            tr.isend(self._send[0], soff[p], plan.counts_P[p], p, self._tag),
            tr.isend(self._send[1], soff[p], plan.counts_P[p], p, self._tag + 1))]
        # progress() and received() see the dispatch done when every message, in and out, is.
        self._reqs = self._recv_reqs + sends

    def run_experts(self, expert_fn: ExpertFn) -> None:
        """Run ``expert_fn`` on each source's rows as they land; each result leaves at once."""
        d, tr = self._d, self._d.transport
        back_counts = self.back_counts_P
        self._back = self._back_buffer()
        boff = np.cumsum(back_counts) - back_counts
        self.combine_times.t_start = self.combine_times.t_post = time.perf_counter()
        reqs = [tr.irecv(self._back, boff[p], back_counts[p], p, self._tag + 2)
                for p in range(d.size) if back_counts[p]]
        replies, reply_counts = [], np.zeros(d.size, np.int64)
        pending = list(range(len(self._srcs)))
        while pending:
            with self._prof.phase(self.layer, "wait", what="the dispatch (per-peer messages)"):
                t = time.perf_counter()
                done = MPI.Request.Waitsome(self._recv_reqs) or []
                self.dispatch_times.blocked += time.perf_counter() - t
            landed = [i for i in pending if self._recv_reqs[2 * i] == MPI.REQUEST_NULL
                      and self._recv_reqs[2 * i + 1] == MPI.REQUEST_NULL]
            for i in landed:
                p = self._srcs[i]
                lo = int(self._roff[p])
                rec = self._unpack(lo, lo + int(self.recv_counts_P[p]))
                out = d.backend.xp.ascontiguousarray(d.backend.xp.asarray(expert_fn(rec)).astype(self.dtype, copy=False))
                reply_counts[p] = len(out)
                replies.append(tr.to_wire(as_bytes(d.backend.xp, out)))
                reqs.append(tr.isend(replies[-1], 0, len(out), p, self._tag + 2))
            pending = [i for i in pending if i not in landed]
            if not done and pending:
                raise RuntimeError("Waitsome returned no request while sources were pending")
        MPI.Request.Waitall(self._reqs)  # our own sends of the dispatch (the receives are done)
        self.dispatch_times.t_done = time.perf_counter()
        self._replies, self.reply_counts_P, self._reqs = replies, reply_counts, reqs
        tr.release(*self._scratch, *self._send)
        self._state = "combining"
