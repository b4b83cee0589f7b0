"""The pipelined exchange: the seed's "process tokens as they arrive" (``algorithm="pipelined"``).

Legend: T tokens, K top-k, D hidden, P peers, Q (row, local expert) pairs computed here.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpc_moe.ep.dispatch import Dispatcher, DispatchHandle
from hpc_moe.ep.transport import gather_rows


def exchange_pipelined(d: Dispatcher, x_TD, topk_idx_TK, topk_weight_TK, expert_fn, layer):
    """Per-peer Isend/Irecv after the count exchange; the experts run on each batch of sources
    whose rows have landed (Waitsome) and the outputs leave at once, while later sources are
    still in flight. Same wire format and result as dispatch + combine."""
    tr, xp = d.transport, d.backend.xp
    plan, words, layout = d.prepare(x_TD, topk_idx_TK, layer)
    dtype, hidden = np.dtype(x_TD.dtype), x_TD.shape[1]
    row = hidden * dtype.itemsize
    w = xp.asarray(topk_weight_TK, dtype=np.float32)
    recv_counts = np.zeros(d.size, dtype=np.int64)
    d.comm.Alltoall([plan.counts_P, MPI.INT64_T], [recv_counts, MPI.INT64_T])
    tag = 2 * (d._seq % 8192) + 1  # fresh tags per call, should two exchanges overlap
    d._seq += 1
    soff, roff, boff = (np.cumsum(c) - c for c in (plan.counts_P, recv_counts, plan.back_counts_P))
    send_wire = tr.to_wire(words)
    recv_wire = tr.empty(int(recv_counts.sum()), layout.width)
    back_wire = tr.empty(int(plan.back_counts_P.sum()) + 1, row)
    ring = [(d.rank + i) % d.size for i in range(d.size)]  # self first: local rows start at once
    waits = [tr.irecv(back_wire, boff[p], plan.back_counts_P[p], p, tag + 1)
             for p in ring if plan.back_counts_P[p]]
    srcs = [p for p in ring if recv_counts[p]]
    recvs = [tr.irecv(recv_wire, roff[p], recv_counts[p], p, tag) for p in srcs]
    waits += [tr.isend(send_wire, soff[p], plan.counts_P[p], p, tag) for p in ring if plan.counts_P[p]]
    reply = np.zeros(d.size, dtype=np.int64)
    experts, keep = [np.zeros(0, dtype=np.int32)], []
    while True:
        done = MPI.Request.Waitsome(recvs)
        if not done:
            break
        parts = []
        for i in sorted(done):
            p, n = srcs[i], int(recv_counts[srcs[i]])
            wire = recv_wire[roff[p]:roff[p] + n]
            x, meta = d.unpack(tr.from_wire(wire, n), wire if isinstance(wire, np.ndarray) else None,
                               layout, dtype)
            n_Q, k_Q = np.nonzero(meta >= 0)
            parts.append((p, gather_rows(xp, x, n_Q if xp is np else xp.asarray(n_Q)), meta[n_Q, k_Q]))
            reply[p] = len(n_Q)
        local_Q = np.concatenate([e for _, _, e in parts]).astype(np.int32)
        out = expert_fn(xp.concatenate([x for _, x, _ in parts]), local_Q)
        out = xp.ascontiguousarray(xp.asarray(out).astype(dtype, copy=False))
        keep.append(tr.to_wire(out.view(np.uint8).reshape(len(local_Q), row)))
        off = 0
        for p, _, e in parts:
            waits.append(tr.isend(keep[-1], off, len(e), p, tag + 1))
            off += len(e)
        experts.append(local_Q)
    MPI.Request.Waitall(waits)
    stats = d.make_stats(layer, layout, row, plan, recv_counts, reply, np.concatenate(experts))
    handle = DispatchHandle(layer, hidden, dtype, d.tp, w, plan.back_counts_P, reply,
                            plan.back_index_TC, None, stats)
    y = d.weighted_sum(back_wire, handle)
    tr.release(words, send_wire, recv_wire, *keep)
    d.last_stats = stats
    return y
