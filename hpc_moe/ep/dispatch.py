"""MoE token dispatch and combine over MPI, as DeepEP does them.

dispatch: each token's row goes ONCE to every EP rank that runs one of its top-k experts (rows
grouped by destination), with an int32 [K] row of the receiver's local expert ids (-1: none), packed
into the same row, so there is one message per peer: a count exchange (Ialltoall), then one
Ialltoallv. combine: the receiver returns one unweighted output row per (row, local expert) pair the
same way back, and the source applies the routing weights, y[t] = sum_k w[t,k] * out[t,k] (with
expert TP, the expert_tp partial outputs of a slot are summed too). Weights are given to dispatch
and kept in the handle. No capacity factor: no token is ever dropped; ranks with no tokens take part.

``exchange`` runs dispatch -> expert_fn -> combine in one call; ``algorithm="pipelined"`` does it
with per-peer Isend/Irecv and runs the experts on each source's rows as they land (Waitsome),
sending the results back at once. Non-blocking forms: dispatch_async/combine_async return objects
whose test() advances them inside MPI calls (non-blocking collectives progress only there).

Legend: T tokens of this rank, K top-k, D hidden, P EP ranks (peers), M rows sent, N rows received,
Q (row, local expert) pairs computed here, B pairs coming back here, L local experts,
C = K * expert_tp outputs summed per token, W bytes per row.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.transport import TRANSPORTS, RowLayout, gather_rows, make_transport
from hpc_moe.fp8 import fp8_dequantize, fp8_quantize

ALGORITHMS = ("alltoallv", "pipelined")
PAYLOADS = ("native", "fp8")
ExpertFn = Callable[[object, np.ndarray], object]  # (x_QD, local_expert_Q int32 host) -> out_QD


@dataclass(frozen=True)
class DispatchOptions:
    """algorithm: "alltoallv" | "pipelined" (used by exchange; dispatch/combine are always one
    Ialltoallv each); transport: "auto" | "host" | "cuda-aware" | "nccl"; payload: "native" (the
    compute dtype) | "fp8" (e4m3 + one float32 scale per 128 values; combine stays native)."""

    algorithm: str = "alltoallv"
    transport: str = "auto"
    payload: str = "native"

    def __post_init__(self):
        for name, allowed in (("algorithm", ALGORITHMS), ("transport", TRANSPORTS), ("payload", PAYLOADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")


@dataclass(frozen=True, eq=False)
class DispatchStats:
    """Accounting of one dispatch + combine on this rank; per-peer int64 arrays [P]
    (the entry of this rank itself is a local copy through MPI)."""

    rank: int
    send_rows_P: np.ndarray
    recv_rows_P: np.ndarray
    send_bytes_P: np.ndarray
    recv_bytes_P: np.ndarray
    combine_send_bytes_P: np.ndarray
    combine_recv_bytes_P: np.ndarray
    pairs_per_local_expert_L: np.ndarray

    def as_dict(self) -> dict:
        d = {k: [int(v) for v in getattr(self, k)] for k in self.__dataclass_fields__ if k != "rank"}
        remote = np.arange(len(self.send_rows_P)) != self.rank
        d["dispatch_send_bytes_remote"] = int(self.send_bytes_P[remote].sum())
        d["combine_send_bytes_remote"] = int(self.combine_send_bytes_P[remote].sum())
        return d


@dataclass(frozen=True, eq=False)
class RecvPairs:
    """The (received row, local expert) pairs to compute, in the order combine returns them.
    row_Q int64 [Q], local_expert_Q int32 [Q] (index into Dispatcher.local_experts), host arrays."""

    row_Q: np.ndarray
    local_expert_Q: np.ndarray

    def gather(self, recv_x_ND, backend: Backend):
        """x_QD: the received row of every pair (rows repeated for colocated experts)."""
        xp = backend.xp
        return gather_rows(xp, recv_x_ND, self.row_Q if xp is np else xp.asarray(self.row_Q))


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """What combine needs: weights float32 [T, K] (backend array), pairs each peer returns
    (back_counts_P) and this rank returns (reply_counts_P), and back_index_TC: the row of the
    combine buffer holding output (t, k, tp rank j) at column k * expert_tp + j (B: none)."""

    layer: int | None
    hidden: int
    dtype: np.dtype
    expert_tp: int
    topk_weight_TK: object
    back_counts_P: np.ndarray
    reply_counts_P: np.ndarray
    back_index_TC: np.ndarray
    recv_pairs: RecvPairs | None  # None after a pipelined exchange
    stats: DispatchStats


@dataclass(frozen=True, eq=False)
class _SendPlan:
    token_M: np.ndarray    # int64 token of each sent row, grouped by destination rank
    meta_MK: np.ndarray    # int32 local expert id at the destination per k, -1 if not there
    counts_P: np.ndarray   # int64 rows per destination
    back_counts_P: np.ndarray
    back_index_TC: np.ndarray


class Dispatcher:
    """Dispatch/combine strategy of one EP group: built once from (ctx, placement, backend,
    options); every call is collective over ``ctx.ep_comm``. ``last_stats`` holds the
    DispatchStats of the latest combine or exchange (for the trace)."""

    def __init__(self, ctx: ParallelContext, placement: ExpertPlacement, backend: Backend,
                 options: DispatchOptions | None = None, logger: logging.Logger | None = None):
        if placement.ep_size != ctx.ep_size or placement.expert_tp != ctx.expert_tp:
            raise ValueError(f"placement is for ep_size {placement.ep_size}, expert_tp "
                             f"{placement.expert_tp}; the context has {ctx.ep_size}, {ctx.expert_tp}")
        self.ctx, self.placement, self.backend = ctx, placement, backend
        self.options = options or DispatchOptions()
        self.comm = ctx.ep_comm
        self.rank, self.size, self.tp = ctx.ep_rank, ctx.ep_size, ctx.expert_tp
        self.transport = make_transport(self.comm, backend, self.options.transport,
                                        need_p2p=self.options.algorithm == "pipelined", logger=logger)
        self.last_stats: DispatchStats | None = None
        self._seq = 0  # pipelined calls, for message tags; the same on every rank

    def local_experts(self, layer: int | None = None) -> list[int]:
        return self.placement.local_experts(self.rank, layer)

    # ---- public API ------------------------------------------------------------------------
    def dispatch_async(self, x_TD, topk_idx_TK, topk_weight_TK, layer: int | None = None) -> PendingDispatch:
        """Start a dispatch. x_TD [T, D] compute dtype (backend array); topk_idx_TK int [T, K]
        global expert ids (-1: no expert); topk_weight_TK float32 [T, K]."""
        return PendingDispatch(self, x_TD, topk_idx_TK, topk_weight_TK, layer)

    def dispatch(self, x_TD, topk_idx_TK, topk_weight_TK, layer: int | None = None):
        """-> (recv_x_ND [N, D] compute dtype, RecvPairs, DispatchHandle)."""
        return self.dispatch_async(x_TD, topk_idx_TK, topk_weight_TK, layer).wait()

    def combine_async(self, pair_out_QD, handle: DispatchHandle) -> PendingCombine:
        """Start a combine of pair outputs [Q, D] (ordered as handle.recv_pairs)."""
        return PendingCombine(self, pair_out_QD, handle)

    def combine(self, pair_out_QD, handle: DispatchHandle):
        """-> y_TD [T, D] compute dtype: sum over k (and expert-TP ranks) of w[t,k] * out."""
        return self.combine_async(pair_out_QD, handle).wait()

    def exchange(self, x_TD, topk_idx_TK, topk_weight_TK, expert_fn: ExpertFn,
                 layer: int | None = None):
        """dispatch -> expert_fn(x_QD, local_expert_Q) -> combine; -> y_TD [T, D]."""
        if self.options.algorithm == "pipelined":
            from hpc_moe.ep.pipelined import exchange_pipelined  # a cycle at import time otherwise
            return exchange_pipelined(self, x_TD, topk_idx_TK, topk_weight_TK, expert_fn, layer)
        recv_x, pairs, handle = self.dispatch(x_TD, topk_idx_TK, topk_weight_TK, layer)
        out = expert_fn(pairs.gather(recv_x, self.backend), pairs.local_expert_Q)
        return self.combine(out, handle)

    def close(self) -> None:
        self.transport.close()

    # ---- shared steps ----------------------------------------------------------------------
    def layout(self, hidden: int, topk: int, dtype) -> RowLayout:
        if self.options.payload == "fp8":
            return RowLayout.of(q=hidden, scale=4 * -(-hidden // 128), meta=4 * topk)
        return RowLayout.of(x=hidden * np.dtype(dtype).itemsize, meta=4 * topk)

    def prepare(self, x_TD, topk_idx_TK, layer):
        """Validate, plan and pack: -> (plan, packed uint8 rows [M, W], layout)."""
        xp = self.backend.xp
        topk = np.asarray(self.backend.to_numpy(topk_idx_TK), dtype=np.int64)
        if x_TD.ndim != 2 or topk.ndim != 2 or topk.shape[0] != x_TD.shape[0]:
            raise ValueError(f"x_TD {tuple(x_TD.shape)} and topk_idx_TK {topk.shape} must be [T, D] and [T, K]")
        if topk.size and (topk.max() >= self.placement.n_experts or topk.min() < -1):
            raise ValueError(f"topk_idx_TK holds ids outside [-1, {self.placement.n_experts})")
        plan = _plan(self.placement, layer, topk, self.rank, self.size, self.tp)
        layout = self.layout(x_TD.shape[1], topk.shape[1], x_TD.dtype)
        tok = plan.token_M if xp is np else xp.asarray(plan.token_M)
        words = self.transport.scratch(len(plan.token_M), layout.width)
        meta = xp.asarray(plan.meta_MK)
        if self.options.payload == "fp8":
            q_TD, scale_TB = fp8_quantize(xp, x_TD)
            layout.pack_into(xp, words, q=(q_TD, tok), scale=(scale_TB, tok), meta=meta)
        else:
            layout.pack_into(xp, words, x=(x_TD, tok), meta=meta)
        return plan, words, layout

    def unpack(self, words, host_wire, layout, dtype):
        """Received rows -> (x_ND compute dtype, meta_NK int32 host)."""
        xp = self.backend.xp
        if isinstance(host_wire, np.ndarray):  # metadata straight from the host buffer
            meta = np.array(layout.view(np, host_wire, "meta", np.int32))
        else:
            meta = self.backend.to_numpy(layout.view(xp, words, "meta", np.int32))
        if self.options.payload == "fp8":
            x = fp8_dequantize(xp, layout.view(xp, words, "q", np.uint8),
                               layout.view(xp, words, "scale", np.float32), dtype)
        else:
            x = layout.view(xp, words, "x", dtype)
        return x, meta

    def weighted_sum(self, back_wire, handle: DispatchHandle):
        """Combine buffer [B + 1, D * itemsize] bytes -> y_TD = sum_c w[t, c // tp] * out[t, c]."""
        xp, b = self.backend.xp, int(handle.back_counts_P.sum())
        vals = self.transport.from_wire(back_wire, b + 1).view(handle.dtype)
        vals[b] = 0  # the row that masked (t, k) read
        idx_TC, w_TK = handle.back_index_TC, handle.topk_weight_TK
        y = xp.zeros((idx_TC.shape[0], handle.hidden), dtype=np.float32)
        if xp is np:
            # Token by token: its C rows stay in cache and one BLAS gemv reads them once (measured
            # faster than column passes, which stream T x D temporaries, and than batched matmul).
            w_TC = np.repeat(w_TK, handle.expert_tp, axis=1)
            for t in range(idx_TC.shape[0]):
                np.dot(w_TC[t], vals[idx_TC[t]].astype(np.float32), out=y[t])
        else:
            idx = xp.asarray(idx_TC)
            for c in range(idx.shape[1]):
                y += w_TK[:, c // handle.expert_tp, None] * vals[idx[:, c]].astype(np.float32)
        self.transport.release(back_wire)
        return y.astype(handle.dtype)

    def make_stats(self, layer, layout, row, plan, recv_counts, reply_counts, local_expert_Q):
        n_local = len(self.local_experts(layer))
        return DispatchStats(
            self.rank, plan.counts_P, recv_counts, plan.counts_P * layout.width,
            recv_counts * layout.width, reply_counts * row, plan.back_counts_P * row,
            np.bincount(local_expert_Q, minlength=n_local).astype(np.int64))


def _plan(placement: ExpertPlacement, layer, topk_TK, rank: int, p: int, tp: int) -> _SendPlan:
    """Routing -> send layout (host, vectorised). Rows go to every rank of each slot a token
    uses, once per rank; pair order (row, k) is the order combine brings outputs back in."""
    t, k = topk_TK.shape
    s = p // tp
    valid = topk_TK >= 0
    e_TK = np.where(valid, topk_TK, 0)
    slot_TK = np.where(valid, placement.route(e_TK, rank, layer), s)  # s: a dummy column
    local_TK = np.where(valid, placement.local_index_table(layer)[np.minimum(slot_TK, s - 1), e_TK], -1)
    in_slot_TS = np.zeros((t, s + 1), dtype=bool)
    in_slot_TS[np.arange(t)[:, None], slot_TK] = True
    dest_M, token_M = np.nonzero(np.repeat(in_slot_TS[:, :s], tp, axis=1).T)  # sorted by (dest, t)
    meta_MK = np.where(slot_TK[token_M] == (dest_M // tp)[:, None], local_TK[token_M], -1).astype(np.int32)
    m_B, k_B = np.nonzero(meta_MK >= 0)
    back_index_TC = np.full((t, k * tp), len(m_B), dtype=np.int64)
    back_index_TC[token_M[m_B], k_B * tp + dest_M[m_B] % tp] = np.arange(len(m_B))
    return _SendPlan(token_M.astype(np.int64), meta_MK, np.bincount(dest_M, minlength=p).astype(np.int64),
                     np.bincount(dest_M[m_B], minlength=p).astype(np.int64), back_index_TC)


def recv_pairs_of(meta_NK: np.ndarray, recv_counts_P: np.ndarray):
    """-> (RecvPairs, pairs to return per source [P]) from the received metadata."""
    n_Q, k_Q = np.nonzero(meta_NK >= 0)
    src_N = np.repeat(np.arange(len(recv_counts_P)), recv_counts_P)
    reply = np.bincount(src_N[n_Q], minlength=len(recv_counts_P)).astype(np.int64)
    return RecvPairs(n_Q.astype(np.int64), meta_NK[n_Q, k_Q].astype(np.int32)), reply


class PendingDispatch:
    """An in-flight dispatch: count exchange -> payload Ialltoallv -> unpack. test() advances it
    without blocking (each call enters MPI, which is what makes the transfer progress)."""

    def __init__(self, d: Dispatcher, x_TD, topk_idx_TK, topk_weight_TK, layer):
        self._d, self._layer = d, layer
        self._plan, self._words, self._layout = d.prepare(x_TD, topk_idx_TK, layer)
        self._hidden, self._dtype = x_TD.shape[1], x_TD.dtype
        self._w = d.backend.xp.asarray(topk_weight_TK, dtype=np.float32)
        if tuple(self._w.shape) != (x_TD.shape[0], topk_idx_TK.shape[1]):
            raise ValueError(f"topk_weight_TK {tuple(self._w.shape)} must match topk_idx_TK {tuple(topk_idx_TK.shape)}")
        self._recv_counts = np.zeros(d.size, dtype=np.int64)
        self._req = d.comm.Ialltoall([self._plan.counts_P, MPI.INT64_T], [self._recv_counts, MPI.INT64_T])
        self._send_wire = d.transport.to_wire(self._words)
        self._stage, self._result = 0, None

    def test(self) -> bool:
        """True once the received rows are ready; never blocks."""
        while self._stage < 2:
            if not self._req.Test():
                return False
            self._advance()
        return True

    def wait(self):
        """-> (recv_x_ND, RecvPairs, DispatchHandle)."""
        while self._stage < 2:
            self._req.Wait()
            self._advance()
        return self._result

    def _advance(self) -> None:
        d = self._d
        n = int(self._recv_counts.sum())
        if self._stage == 0:
            self._recv_wire = d.transport.empty(n, self._layout.width, keep=True)
            self._req = d.transport.ialltoallv(self._send_wire, self._plan.counts_P,
                                               self._recv_wire, self._recv_counts)
            self._stage = 1
            return
        words = d.transport.from_wire(self._recv_wire, n)
        x, meta = d.unpack(words, self._recv_wire[:n] if isinstance(self._recv_wire, np.ndarray) else None,
                           self._layout, self._dtype)
        pairs, reply = recv_pairs_of(meta, self._recv_counts)
        stats = d.make_stats(self._layer, self._layout, self._hidden * np.dtype(self._dtype).itemsize,
                             self._plan, self._recv_counts, reply, pairs.local_expert_Q)
        handle = DispatchHandle(self._layer, self._hidden, np.dtype(self._dtype), d.tp, self._w,
                                self._plan.back_counts_P, reply, self._plan.back_index_TC, pairs, stats)
        d.transport.release(self._words, self._send_wire, self._recv_wire)
        self._words = self._send_wire = self._recv_wire = None
        self._result, self._stage = (x, pairs, handle), 2


class PendingCombine:
    """An in-flight combine: one Ialltoallv of pair outputs back to their sources, then the
    weighted sum. test() advances it without blocking; wait() -> y_TD."""

    def __init__(self, d: Dispatcher, pair_out_QD, handle: DispatchHandle):
        self._d, self._h = d, handle
        xp = d.backend.xp
        q = len(handle.recv_pairs.row_Q)
        out = xp.ascontiguousarray(xp.asarray(pair_out_QD).astype(handle.dtype, copy=False))
        if tuple(out.shape) != (q, handle.hidden):
            raise ValueError(f"pair_out_QD {tuple(out.shape)} must be [{q}, {handle.hidden}] (one row per pair)")
        row = handle.hidden * handle.dtype.itemsize
        self._send_wire = d.transport.to_wire(out.view(np.uint8).reshape(q, row))
        self._back_wire = d.transport.empty(int(handle.back_counts_P.sum()) + 1, row)
        self._req = d.transport.ialltoallv(self._send_wire, handle.reply_counts_P,
                                           self._back_wire, handle.back_counts_P)
        self._y = None

    def test(self) -> bool:
        if self._y is None and self._req.Test():
            self._finish()
        return self._y is not None

    def wait(self):
        if self._y is None:
            self._req.Wait()
            self._finish()
        return self._y

    def _finish(self) -> None:
        self._y = self._d.weighted_sum(self._back_wire, self._h)
        self._d.transport.release(self._send_wire)
        self._send_wire = self._back_wire = None
        self._d.last_stats = self._h.stats
