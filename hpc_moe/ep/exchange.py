"""One MoE exchange (dispatch, the expert phase, combine) in phases that overlap compute.

One :class:`Exchange` is one MoE layer of one micro-batch on one rank, and moves through:

1. ``Dispatcher.post`` (hpc_moe.ep.dispatch): plan the rows (host), post the count exchange
   (``Ialltoall``), pack the rows while the counts fly, wait for the counts, post the payload
   (token rows and metadata rows, two ``Ialltoallv`` on the channel's communicator). The payload
   is posted before ``post`` returns, so it is in flight during whatever compute comes next.
2. ``progress()``: tests the requests in flight (non-blocking collectives progress only inside MPI
   calls, so the caller polls between and inside compute phases).
3. ``run_experts(fn)``: waits for the rows, runs ``fn`` on them (the local expert GEMMs) and posts
   the combine. (hpc_moe.ep.pipelined: per-peer messages, ``fn`` on each source as it lands.)
4. ``wait()``: waits for the combine and reduces the rows that came back: ``y_TD``.

Each token's row goes once to every rank that runs one of its experts, with the receiver's local
expert id and the routing weight per k (-1: not there). The combine has two forms:

* ``weighted`` (default): the receiver weights and sums its local experts' outputs per received
  row and returns one row per received row, so combine bytes equal dispatch bytes; the source sums
  the rows of each token.
* ``pairs`` (``deterministic=True``): the receiver returns one unweighted row per (row, local
  expert) pair and the source applies the weights in k order, so the sum does not depend on where
  experts live: logits are bitwise the same at any rank count, placement or micro-batching.

No capacity factor: no token is dropped; ranks with no tokens take part in every exchange.

Legend: T tokens of this rank, K top-k, D hidden, P EP ranks, M rows sent, N rows received,
Q (row, local expert) pairs computed here, B rows coming back, C columns of a reduction table.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from mpi4py import MPI

from hpc_moe.ep.plan import Plan, flat_plan, meta_layout
from hpc_moe.ep.wire import as_bytes
from hpc_moe.fp8 import fp8_dequantize
from hpc_moe.rowops import group_rows_sum, take_rows, weighted_rows_sum
from hpc_moe.timing import Profiler


@dataclass(frozen=True, eq=False)
class Received:
    """The rows this rank computes for one exchange (host index arrays, backend x).

    x_ND: received token rows [N, D] compute dtype (a view of the receive buffer when it can be);
    row_Q int64 [Q], local_expert_Q int32 [Q] (index into the rank's local experts) and
    weight_Q float32 [Q]: the (row, local expert) pairs in row-major (row, k) order; out_ND: on
    a shared-memory exchange, the reply rows' place ([N, D] weighted form, [Q, D] pairs form):
    an expert function that returns it filled saves the combine a copy.
    """

    x_ND: object
    row_Q: np.ndarray
    local_expert_Q: np.ndarray
    weight_Q: np.ndarray
    k_Q: np.ndarray | None = None  # which of the token's top-k each pair is
    out_ND: object = None  # where the reply rows may be written (shared memory the sources read), or None


# expert_fn(received) -> reply rows: weighted form y_ND [N, D]; pairs form out_QD [Q, D]
ExpertFn = Callable[[Received], object]


@dataclass
class ExchangeTimes:
    """When one direction of an exchange started (the dispatch: its count exchange), when its payload
    was posted and when it was seen complete (perf_counter seconds), and how long this rank was
    blocked waiting for it (count exchange included)."""

    t_start: float = 0.0
    t_post: float = 0.0
    t_done: float = 0.0
    blocked: float = 0.0


@dataclass(frozen=True, eq=False)
class ExchangeRecord:
    """What one finished exchange did on this rank, for the step's accounting (every kind of
    exchange gives one): send_bytes_P int64 [P] bytes to each EP peer, dispatch and combine (the
    own entry a local copy); rows_received: token rows this rank's experts received; tokens,
    nodes_reached, most_nodes: this rank's tokens, the nodes they reached in all (each its own
    included) and the most one reached; dispatch, combine: the two directions' times."""

    send_bytes_P: np.ndarray
    rows_received: int
    tokens: int
    nodes_reached: int
    most_nodes: int
    dispatch: ExchangeTimes
    combine: ExchangeTimes

    @classmethod
    def of(cls, ex) -> ExchangeRecord:
        """From an exchange whose combine was waited for (any kind: the accounting properties
        they share)."""
        nodes = ex.nodes_per_token_T
        return cls(ex.send_bytes_P.copy(), int(ex.recv_counts_P.sum()), len(nodes), int(nodes.sum()),
                   int(nodes.max(initial=0)), ex.dispatch_times, ex.combine_times)


class MoEExchange(Protocol):
    """One MoE exchange of any kind (flat Exchange, PipelinedExchange, HierarchicalExchange), as
    the executor drives it: post (Dispatcher.post), then progress() between compute phases,
    run_experts(fn) once, wait() -> y_TD, and record() for the step's accounting."""

    layer: int | None
    pairs: bool

    def progress(self) -> bool: ...

    def run_experts(self, expert_fn: ExpertFn) -> None: ...

    def wait(self): ...

    def record(self) -> ExchangeRecord: ...


class Exchange:
    """One MoE exchange in flight (see the module docstring for its phases)."""

    @classmethod
    def post(cls, d, layer, x_TD, topk_idx_TK, topk_weight_TK, prof: Profiler, plan: Plan | None = None):
        """Start an exchange (phase 1 of the module docstring): the exchange, its payload in flight.
        Collective over d's channel. d: the hpc_moe.ep.dispatch.Dispatcher of the channel (its
        placement, pack, transport, comm); plan: where the rows go, when the caller planned them
        (then topk_idx_TK only gives K)."""
        ex = cls(d, layer, x_TD, topk_idx_TK, topk_weight_TK, prof, plan)
        ex._start(x_TD)
        return ex

    def __init__(self, d, layer, x_TD, topk_idx_TK, topk_weight_TK, prof: Profiler, plan: Plan | None = None):
        """The checks and the plan, on the host: no communication (post() starts it)."""
        be = d.backend
        topk = np.asarray(be.to_numpy(topk_idx_TK), dtype=np.int64)
        if x_TD.ndim != 2 or topk.ndim != 2 or topk.shape[0] != x_TD.shape[0]:
            raise ValueError(f"x_TD {tuple(x_TD.shape)} and topk_idx_TK {topk.shape} must be [T, D] and [T, K]")
        if plan is None and topk.size and (topk.max() >= d.placement.n_experts or topk.min() < -1):
            raise ValueError(f"topk_idx_TK holds ids outside [-1, {d.placement.n_experts})")
        w_TK = np.asarray(be.to_numpy(topk_weight_TK), dtype=np.float32)
        if w_TK.shape != topk.shape:
            raise ValueError(f"topk_weight_TK {w_TK.shape} must match topk_idx_TK {topk.shape}")
        self._d, self.layer, self._prof = d, layer, prof
        self.pairs = d.options.deterministic
        self.dtype, self.hidden, self.tokens, self.topk = np.dtype(x_TD.dtype), x_TD.shape[1], x_TD.shape[0], topk.shape[1]
        self.dispatch_times, self.combine_times = ExchangeTimes(), ExchangeTimes()
        self._w_TK = w_TK
        self._plan = flat_plan(d.placement, d.nodes, d.rank, layer, topk) if plan is None else plan
        self._layout = meta_layout(d.options.payload, self.hidden, self.topk)
        self.recv_counts_P = np.zeros(d.size, dtype=np.int64)
        self.reply_counts_P = np.zeros(d.size, np.int64)
        self._state, self._reqs, self._replies, self._back, self._received = "planned", [], [], None, None

    def _start(self, x_TD) -> None:
        """The count exchange, the pack while it flies, the payload."""
        d, tr, plan, layout, prof = self._d, self._d.transport, self._plan, self._layout, self._prof
        self.dispatch_times.t_start = time.perf_counter()
        counts_req = d.comm.Ialltoall([plan.counts_P, MPI.INT64_T], [self.recv_counts_P, MPI.INT64_T])

        rows, meta = d.pack(plan, x_TD, self._w_TK, layout)
        self._send = (tr.to_wire(rows), tr.to_wire(meta))
        self._scratch = (rows, meta)
        with prof.phase(self.layer, "wait", what="the dispatch's count exchange"):
            t = time.perf_counter()
            counts_req.Wait()
            self.dispatch_times.blocked += time.perf_counter() - t

        n = int(self.recv_counts_P.sum())
        self._recv = (tr.empty(n, rows.shape[1]), tr.empty(n, layout.width))
        self.dispatch_times.t_post = time.perf_counter()
        self._post_payload()
        self._state = "dispatching"

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def send_counts_P(self) -> np.ndarray:
        """Token rows this rank sends to each peer [P]."""
        return self._plan.counts_P

    @property
    def back_counts_P(self) -> np.ndarray:
        """Rows each peer returns to this rank in the combine [P]."""
        return self._plan.pair_counts_P if self.pairs else self._plan.counts_P

    @property
    def nodes_per_token_T(self) -> np.ndarray:
        """Nodes each of this rank's tokens reaches [T] (its own node included)."""
        return self._plan.nodes_T

    @property
    def dispatch_row_bytes(self) -> int:
        """Bytes per dispatched token: its row and its metadata row."""
        return self._send[0].shape[1] + self._layout.width

    @property
    def send_bytes_P(self) -> np.ndarray:
        """Bytes this rank sends to each peer [P], dispatch + combine (its own entry is a local copy)."""
        return self.send_counts_P * self.dispatch_row_bytes + self.reply_counts_P * self.hidden * self.dtype.itemsize

    def record(self) -> ExchangeRecord:
        return ExchangeRecord.of(self)

    def reduce(self, rows_BD, at_B: np.ndarray | None = None):
        """The source's sum of the combine rows [B + 1, D] (last row zero) -> y_TD [T, D]: each
        token's rows in rank order (weighted form), or its pairs weighted in k order (pairs form).
        at_B: int64 [B + 1], where each of those rows is in rows_BD (default: in order)."""
        xp = self._d.backend.xp
        if self.pairs:
            index = self._plan.pair_index_TC if at_B is None else at_B[self._plan.pair_index_TC]
            return weighted_rows_sum(xp, rows_BD, index, np.repeat(self._w_TK, self._d.tp, axis=1), self.dtype)
        return group_rows_sum(xp, rows_BD, self._plan.token_M, self.tokens, self.dtype,
                              None if at_B is None else at_B[:-1])

    # ---- progress ------------------------------------------------------------------------------
    def progress(self) -> bool:
        """Advance what is in flight without blocking; True once the combine has landed."""
        if self._state in ("dispatching", "combining") and self._reqs and self._d.transport.test_all(self._reqs):
            self._landed()
        return self._state in ("combined", "done")

    def _landed(self) -> None:
        times = self.dispatch_times if self._state == "dispatching" else self.combine_times
        times.t_done = time.perf_counter()
        self._reqs = []
        self._state = "received" if self._state == "dispatching" else "combined"

    def _block(self, times: ExchangeTimes) -> None:
        if self._reqs:
            what = "the dispatch" if times is self.dispatch_times else "the combine"
            with self._prof.phase(self.layer, "wait", what=what):
                t = time.perf_counter()
                self._d.transport.wait_all(self._reqs)
                times.blocked += time.perf_counter() - t
            self._landed()

    # ---- the expert phase --------------------------------------------------------------------
    def received(self) -> Received:
        """Wait for the dispatched rows (alltoallv only) -> the rows and pairs to compute."""
        if self._state == "dispatching":
            self._block(self.dispatch_times)
        if self._received is None:
            self._received = self._unpack(0, int(self.recv_counts_P.sum()))
            self._d.transport.release(*self._scratch, *self._send)
        return self._received

    def _post_payload(self) -> None:
        """Token rows and metadata rows, one Ialltoallv each."""
        tr, plan = self._d.transport, self._plan
        self._reqs = [tr.ialltoallv(self._send[0], plan.counts_P, self._recv[0], self.recv_counts_P),
                      tr.ialltoallv(self._send[1], plan.counts_P, self._recv[1], self.recv_counts_P)]

    def run_experts(self, expert_fn: ExpertFn) -> None:
        """Compute the rows this rank received with ``expert_fn`` and post the combine."""
        out = expert_fn(self.received())
        with self._prof.phase(self.layer, "combine"):
            self.reply(out)

    def reply(self, out) -> None:
        """Post the combine of the reply rows: weighted form y_ND [N, D]; pairs form out_QD [Q, D]."""
        tr, xp = self._d.transport, self._d.backend.xp
        out = xp.ascontiguousarray(xp.asarray(out).astype(self.dtype, copy=False))
        send_counts = self.reply_counts_P = self._reply_counts()
        if out.shape != (int(send_counts.sum()), self.hidden):
            raise ValueError(f"reply rows {tuple(out.shape)} must be [{int(send_counts.sum())}, {self.hidden}]")
        self._replies = [tr.to_wire(as_bytes(xp, out))]  # may view the receive buffer: freed at wait()
        self._back = self._back_buffer()
        self.combine_times.t_start = self.combine_times.t_post = time.perf_counter()
        self._reqs = [tr.ialltoallv(self._replies[0], send_counts, self._back, self.back_counts_P)]
        self._state = "combining"

    def wait(self, pair_rows: bool = False):
        """Wait for the combine -> y_TD [T, D] compute dtype. pair_rows (pairs form): instead of
        the weighted sum, the rows that came back, one per valid (token, k) in token-major order
        [Q, D] (a forwarding rank passes them on unreduced)."""
        if self._state == "combining":
            self._block(self.combine_times)
        if self._state != "combined":
            raise RuntimeError(f"wait() on an exchange that is {self._state}")
        n = int(self.back_counts_P.sum())
        rows = self._d.transport.from_wire(self._back, n + 1).view(self.dtype)
        if pair_rows:
            index = self._plan.pair_index_TC[self._plan.pair_index_TC < n]  # row-major: token, then k
            y = take_rows(self._d.backend.xp, rows, index)
        else:
            y = self.reduce(rows)
        self.release()
        return y

    def release(self) -> None:
        """Give every buffer back to the transport's pool; the exchange is over (wait() calls it;
        a caller that only dispatches, such as a benchmark, calls it once the rows are used)."""
        tr = self._d.transport
        if self._state == "dispatching":
            self._block(self.dispatch_times)
        tr.release(*self._scratch, *self._send, *self._replies, *([self._back] if self._back is not None else []))
        self._release_recv()
        self._state = "done"

    # ---- helpers -------------------------------------------------------------------------------
    def _reply_counts(self) -> np.ndarray:
        """Rows this rank returns to each source [P]."""
        if not self.pairs:
            return self.recv_counts_P
        src_Q = np.repeat(np.arange(self._d.size), self.recv_counts_P)[self.received().row_Q]
        return np.bincount(src_Q, minlength=self._d.size).astype(np.int64)

    def _back_buffer(self):
        """The combine's receive buffer, one zero row more: the target of padded table entries."""
        b = int(self.back_counts_P.sum())
        back = self._d.transport.empty(b + 1, self.hidden * self.dtype.itemsize)
        back[b] = 0
        return back

    def _unpack(self, lo: int, hi: int) -> Received:
        """Rows [lo, hi) of the receive buffers -> Received (row ids relative to lo)."""
        d, xp, layout = self._d, self._d.backend.xp, self._layout
        words = d.transport.from_wire(self._recv[0][lo:hi], hi - lo)
        meta = self._recv[1][lo:hi]
        if not isinstance(meta, np.ndarray):  # device buffers: the metadata is small, read it on the host
            meta = d.backend.to_numpy(meta)
        local_NK = layout.view(np, meta, "local", np.int32)
        weight_NK = layout.view(np, meta, "weight", np.float32)
        if d.options.payload == "fp8":
            x = fp8_dequantize(xp, words, xp.asarray(layout.view(np, meta, "scale", np.float32)), self.dtype)
        else:
            x = words.view(self.dtype)
        n_Q, k_Q = np.nonzero(local_NK >= 0)
        return Received(x, n_Q.astype(np.int64), local_NK[n_Q, k_Q].astype(np.int32),
                        weight_NK[n_Q, k_Q].astype(np.float32), k_Q.astype(np.int32))

    def _release_recv(self) -> None:
        if self._recv is not None:
            self._d.transport.release(*self._recv)
            self._recv = None
