"""The shared-memory exchange: the flat exchange of ranks on one node, with no copy by MPI.

Where the Ialltoallv exchange (hpc_moe.ep.exchange) packs rows by destination, hands them to MPI
(which copies them through shared memory), and receives the replies into a buffer of its own
before summing them, here every row is written once and read once where it lies
(hpc_moe.ep.shm holds the windows, the flags and the waits):

1. post: publish the counts (rows and (row, expert) pairs to each peer); while the peers publish
   theirs, build the metadata rows; then every rank knows every segment's layout, grows the slot
   if it must (collectively: the same decision everywhere), and writes each of its rows straight
   into its place in the receiver's segment, after the rows of the sources before it (the layout
   an Ialltoallv leaves): that gather is the pack and the transfer in one pass. A flag per peer.
2. the experts run on the receiver's segment in place, and write their reply rows (the weighted
   sum per row, or one row per pair) into the receiver's own segment (``Received.out_ND``);
   reply() raises a flag per peer.
3. wait: the source sums its rows where they lie, in the receivers' segments (the segments of a
   slot are one array, hpc_moe.ep.shm.SharedSlots.window), in the order of the Ialltoallv
   exchange's receive buffer: the result is bitwise the same. Nothing of the combine is copied.

Segment of rank r, per exchange: [reply rows it computes (+ one zero row) | token rows it received |
their metadata rows], each part on a cache line, the segment a whole number of reply rows, so that
the slot's reply rows are rows of one array. A waiting rank sleeps between checks of its flags and
is watched by the watchdog like every wait (the profiler's "wait" phase).

Legend: P ranks of the channel, S sources, R receivers, W bytes of a token row, B rows back.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from hpc_moe.ep.exchange import Exchange, ExchangeTimes, Received
from hpc_moe.ep.shm import COMBINE, DISPATCH, align
from hpc_moe.rowops import take_rows


class ShmExchange(Exchange):
    """An Exchange on a shm transport (hpc_moe.ep.transport.ShmTransport): its interface and its
    accounting, with rows written into and read from the peers' shared segments."""

    def _start(self, x_TD) -> None:
        d, plan, prof = self._d, self._plan, self._prof
        slots, me, p = d.transport.slots, d.rank, d.size
        self.dispatch_times.t_start = time.perf_counter()
        self._n = n = slots.publish(plan.counts_P, plan.pair_counts_P)
        src_TW, scale_TB = d.payload(x_TD)
        meta_MW = d.metadata(plan, self._w_TK, self._layout, scale_TB)
        self._scratch, self._send = (meta_MW,), ()
        with prof.phase(self.layer, "wait", what="the dispatch's count exchange"):
            t = time.perf_counter()
            slots.wait(lambda: slots.all_published(n))
            self.dispatch_times.blocked += time.perf_counter() - t
        rows_SR, pairs_SR = slots.counts(n)
        self._back_SR = pairs_SR if self.pairs else rows_SR  # rows receiver r returns to source s
        self.recv_counts_P = rows_SR[:, me].copy()
        self._row_w, self._out_w = src_TW.shape[1], self.hidden * self.dtype.itemsize
        parts = self._parts(rows_SR)
        unit = math.lcm(self._out_w, 64)
        self._window, self._seg = slots.window(n, int(parts[:, 3].max()), unit)

        # Each receiver's rows in source order, as its Ialltoallv would have left them.
        first_SR = np.cumsum(rows_SR, axis=0) - rows_SR
        sent = np.concatenate([[0], np.cumsum(plan.counts_P)])
        for r in np.nonzero(plan.counts_P)[0]:
            lo, hi, at = int(sent[r]), int(sent[r + 1]), int(first_SR[me, r])
            rows, meta = self._received_part(r, parts)
            take_rows(np, src_TW, plan.token_M[lo:hi], rows[at:at + hi - lo])
            meta[at:at + hi - lo] = meta_MW[lo:hi]
        self._parts_P = parts
        self._recv = self._received_part(me, parts)
        self._out = self._reply_part(me)
        self._out[-1] = 0  # the zero row padded reduction entries point at
        slots.signal(n, DISPATCH, range(p))
        self.dispatch_times.t_post = time.perf_counter()
        self._state = "dispatching"

    # ---- the segments --------------------------------------------------------------------------
    def _parts(self, rows_SR: np.ndarray) -> np.ndarray:
        """Every rank's segment layout for this exchange, int64 [P, 4]: reply rows it computes
        (a zero row included), token rows it receives, where its metadata rows start, its bytes."""
        q_R = self._back_SR.sum(axis=0) + 1
        n_R = rows_SR.sum(axis=0)
        rows_at = np.array([align(v) for v in q_R * self._out_w])
        meta_at = rows_at + np.array([align(v) for v in n_R * self._row_w])
        return np.stack([q_R, n_R, meta_at, meta_at + n_R * self._layout.width], axis=1)

    def _received_part(self, r: int, parts: np.ndarray):
        """Rank r's token rows uint8 [N, W] and metadata rows [N, meta width] (views of the slot)."""
        q, n, meta_at, _ = (int(v) for v in parts[r])
        seg = self._window[r * self._seg:(r + 1) * self._seg]
        rows_at = align(q * self._out_w)
        return (seg[rows_at:rows_at + n * self._row_w].reshape(n, self._row_w),
                seg[meta_at:meta_at + n * self._layout.width].reshape(n, self._layout.width))

    def _reply_part(self, r: int):
        """Rank r's reply rows, its zero row last: [Q + 1, D] compute dtype (a view of the slot)."""
        q = int(self._parts_P[r, 0])
        return self._window[r * self._seg:r * self._seg + q * self._out_w].view(self.dtype).reshape(q, self.hidden)

    @property
    def dispatch_row_bytes(self) -> int:
        return self._row_w + self._layout.width

    # ---- progress ------------------------------------------------------------------------------
    def progress(self) -> bool:
        which = {"dispatching": DISPATCH, "combining": COMBINE}.get(self._state)
        if which is not None and self._d.transport.slots.landed(self._n, which):
            self._landed()
        return self._state in ("combined", "done")

    def _block(self, times: ExchangeTimes) -> None:
        slots = self._d.transport.slots
        which = DISPATCH if times is self.dispatch_times else COMBINE
        with self._prof.phase(self.layer, "wait", what="the dispatch" if which == DISPATCH else "the combine"):
            t = time.perf_counter()
            slots.wait(lambda: slots.landed(self._n, which))
            times.blocked += time.perf_counter() - t
        self._landed()

    # ---- the expert phase and the combine ------------------------------------------------------
    def received(self) -> Received:
        """The rows, with ``out_ND``: where the reply rows go (this rank's segment, which the
        sources read): [N, D] weighted, [Q, D] pairs, compute dtype."""
        fresh = self._received is None
        rec = super().received()
        if fresh:
            rec = self._received = dataclasses.replace(rec, out_ND=self._out[:-1])
        return rec

    def reply(self, out) -> None:
        """The reply rows (weighted form y_ND [N, D]; pairs form out_QD [Q, D], in source order)
        into this rank's segment, unless the experts wrote them there (Received.out_ND)."""
        d, xp = self._d, self._d.backend.xp
        self.reply_counts_P = self._back_SR[:, d.rank].copy()
        dest = self.received().out_ND
        if tuple(out.shape) != dest.shape:
            raise ValueError(f"reply rows {tuple(out.shape)} must be {list(dest.shape)}")
        self.combine_times.t_start = self.combine_times.t_post = time.perf_counter()
        if not (isinstance(out, np.ndarray) and out.dtype == dest.dtype and out.ctypes.data == dest.ctypes.data):
            dest[...] = xp.asarray(out)  # (NumPy buffers an overlapping source)
        d.transport.slots.signal(self._n, COMBINE, range(d.size))
        self._state = "combining"

    def wait(self, pair_rows: bool = False):
        """Wait for every receiver's reply rows and reduce them where they lie -> y_TD [T, D]
        (pair_rows: the rows themselves, one per valid (token, k), as Exchange.wait)."""
        if self._state == "combining":
            self._block(self.combine_times)
        if self._state != "combined":
            raise RuntimeError(f"wait() on an exchange that is {self._state}")
        rows = self._window[:self._d.size * self._seg].view(self.dtype).reshape(-1, self.hidden)
        at = self._back_rows()
        if pair_rows:
            index = self._plan.pair_index_TC[self._plan.pair_index_TC < len(at) - 1]
            y = take_rows(np, rows, at[index])
        else:
            y = self.reduce(rows, at)
        self.release()
        return y

    def _back_rows(self) -> np.ndarray:
        """Where this rank's rows back lie in the slot, as rows of it, int64 [B + 1]: receiver by
        receiver (each receiver's reply rows are in source order), then this rank's zero row."""
        me, rows_per_seg = self._d.rank, self._seg // self._out_w
        first_SR = np.cumsum(self._back_SR, axis=0) - self._back_SR
        parts = [r * rows_per_seg + first_SR[me, r] + np.arange(self._back_SR[me, r]) for r in range(self._d.size)]
        zero = me * rows_per_seg + int(self._parts_P[me, 0]) - 1
        return np.concatenate(parts + [[zero]]).astype(np.int64)

    def release(self) -> None:
        super().release()
        self._d.transport.slots.finish(self._n)
