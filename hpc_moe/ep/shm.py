"""Shared-memory windows for the exchanges of ranks on one node (``--transport shm``).

Ranks of one node see each other's memory through MPI-3 shared windows
(``MPI.Win.Allocate_shared``), so an exchange needs no copy by MPI: a sender writes each row
straight into its slot in the receiver's segment, and raises a flag there (hpc_moe.ep.shm_exchange
says what goes where). This module owns the windows, the flags and the waits; it knows nothing of
rows.

Two kinds of window, on the channel's communicator (every rank of it on one node):

* control, fixed: per rank, per slot, the exchange number it last published counts for, its
  counts (rows and (row, expert) pairs to each peer) and, written by its peers, a flag per peer
  for "your dispatch rows are in" and "your combine rows are in" (the exchange's number);
* data, one window per slot: per rank one segment, grown (collectively, re-allocated) when an
  exchange needs more than it has. Every rank sees every rank's counts, so every rank decides
  alike when a slot grows, and every writer can compute where in a peer's segment its rows go.
  The segments lie one after the other (MPI-3 allocates them contiguously), so a reader sees
  the whole slot as one array and gathers rows from any peer's segment by one index.

Exchanges are numbered in post order (the same on every rank) and exchange n uses slot
n % DEPTH: a rank finishes exchange n before it posts n + DEPTH, so when every rank has published
n + DEPTH nobody reads slot n % DEPTH any more and it can be written (or re-allocated). Memory
ordering is MPI's for shared windows in the unified model: the writer calls ``Win.Sync`` between
its data and its flag, the reader between seeing the flag and reading the data, inside a
``Lock_all`` epoch that lasts as long as the windows.

A waiting rank checks its flags, pokes MPI's progress engine (other channels' transfers may be in
flight) and sleeps, backing off to a millisecond: it gives its core to the ranks still computing
instead of polling. Legend: P ranks of the channel, D slots.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

DEPTH = 2  # exchanges one channel holds in flight (two micro-batches' layers on one channel)
_ALIGN = 64  # regions start on cache lines
_POKE_TAG = 32766  # never sent: Iprobe on it only drives MPI's progress
_ROWS, _PAIRS = 0, 1  # the two count vectors a rank publishes
DISPATCH, COMBINE = 0, 1  # the two flags a peer raises


def align(n: int) -> int:
    return -(-int(n) // _ALIGN) * _ALIGN


class NotContiguous(RuntimeError):
    """The MPI library placed the ranks' segments of a shared window apart (MPI-3 makes them
    contiguous unless asked otherwise)."""


def _whole(win: MPI.Win, size: int, seg: int) -> np.ndarray:
    """Every rank's segment of a shared window allocated with ``seg`` bytes each, as one array."""
    base = win.Shared_query(0)[0].address
    if any(win.Shared_query(r)[0].address != base + r * seg for r in range(size)):
        raise NotContiguous("the MPI library's shared-window segments are not contiguous")
    return np.frombuffer(MPI.buffer.fromaddress(base, size * seg), np.uint8)


def on_one_node(comm: MPI.Comm) -> bool:
    """Whether every rank of comm shares memory with every other (collective)."""
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    alone = shared.Get_size() == comm.Get_size()
    shared.Free()
    return bool(comm.allreduce(int(alone), op=MPI.MIN))


class SharedSlots:
    """The control window and the DEPTH data windows of one channel. Collective to create (on a
    communicator whose ranks share one node: on_one_node) and to close."""

    def __init__(self, comm: MPI.Comm, depth: int = DEPTH):
        self.comm, self.rank, self.size, self.depth = comm, comm.Get_rank(), comm.Get_size(), depth
        p = self.size
        # per rank: posted [D], counts [D, 2, P], dispatch flags [D, P], combine flags [D, P]
        words = depth + 2 * depth * p + 2 * depth * p
        self._ctrl_win = MPI.Win.Allocate_shared(align(8 * words), 8, comm=comm)
        self._ctrl_win.Lock_all(MPI.MODE_NOCHECK)
        whole = _whole(self._ctrl_win, p, align(8 * words)).view(np.int64).reshape(p, -1)
        ctrl = [whole[r, :words] for r in range(p)]
        self._posted = [c[:depth] for c in ctrl]
        self._counts = [c[depth:depth + 2 * depth * p].reshape(depth, 2, p) for c in ctrl]
        self._flags = [c[depth + 2 * depth * p:].reshape(2, depth, p) for c in ctrl]
        ctrl[self.rank][:] = -1
        self._ctrl_win.Sync()
        comm.Barrier()
        self._ctrl_win.Sync()
        self._data: list[tuple[MPI.Win, np.ndarray, int] | None] = [None] * depth
        self._next, self._open = 0, set()

    # ---- counts --------------------------------------------------------------------------------
    def publish(self, counts_P: np.ndarray, pair_counts_P: np.ndarray) -> int:
        """Publish this rank's counts of the next exchange -> its number n. Raises RuntimeError
        when DEPTH exchanges of this rank are still open (finish() one first)."""
        if len(self._open) >= self.depth:
            raise RuntimeError(f"a shared-memory channel holds at most {self.depth} exchanges in flight")
        n, k = self._next, self._next % self.depth
        self._next += 1
        self._open.add(n)
        self._counts[self.rank][k, _ROWS] = counts_P
        self._counts[self.rank][k, _PAIRS] = pair_counts_P
        self._ctrl_win.Sync()  # the counts before the number that says they are there
        self._posted[self.rank][k] = n
        return n

    def all_published(self, n: int) -> bool:
        self._ctrl_win.Sync()
        k = n % self.depth
        return all(self._posted[r][k] == n for r in range(self.size))

    def counts(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's published counts of exchange n (after all_published): rows and pairs,
        int64 [P sources, P destinations]."""
        k = n % self.depth
        c = np.stack([self._counts[r][k] for r in range(self.size)])  # [P, 2, P]
        return c[:, _ROWS].copy(), c[:, _PAIRS].copy()

    # ---- data ----------------------------------------------------------------------------------
    def window(self, n: int, need: int, unit: int) -> tuple[np.ndarray, int]:
        """Exchange n's slot as one array (MPI allocates the segments of a shared window one after
        the other): uint8 [P * seg], rank r's segment at [r * seg, (r + 1) * seg), seg a multiple
        of ``unit`` bytes and at least ``need``. Collective when the slot must grow: every rank
        calls it with the same need and unit (each computes them from the published counts)."""
        k = n % self.depth
        slot = self._data[k]
        if slot is None or slot[2] < need or slot[2] % unit:
            if slot is not None:
                slot[0].Unlock_all()
                slot[0].Free()
                self._data[k] = None
            # A quarter more than asked: a batch a little larger next step does not re-allocate.
            seg = max(1, -(-(need + need // 4) // unit)) * unit
            win = MPI.Win.Allocate_shared(seg, 1, comm=self.comm)
            win.Lock_all(MPI.MODE_NOCHECK)
            slot = self._data[k] = (win, _whole(win, self.size, seg), seg)
        return slot[1], slot[2]

    def capacity(self) -> int:
        """Bytes of this rank's segments, all slots."""
        return sum(s[2] for s in self._data if s is not None)

    # ---- flags ---------------------------------------------------------------------------------
    def signal(self, n: int, which: int, peers) -> None:
        """Tell ``peers`` that this rank's rows of exchange n (which: DISPATCH or COMBINE) are in
        their segments."""
        k = n % self.depth
        data = self._data[k]
        (data[0] if data is not None else self._ctrl_win).Sync()  # the rows before the flags
        for r in peers:
            self._flags[r][which, k, self.rank] = n

    def landed(self, n: int, which: int) -> bool:
        """Whether every peer's rows of exchange n (which) are in this rank's segment."""
        self._ctrl_win.Sync()
        return bool((self._flags[self.rank][which, n % self.depth] == n).all())

    def finish(self, n: int) -> None:
        """This rank is done with exchange n: nothing of it is read or written any more here."""
        self._open.discard(n)

    def wait(self, ready: Callable[[], bool]) -> None:
        """Until ready(): pokes MPI's progress and sleeps between checks (backing off to 1 ms)."""
        pause = 0.0
        while not ready():
            self.comm.Iprobe(MPI.ANY_SOURCE, _POKE_TAG)
            if pause == 0.0:
                os.sched_yield()
                pause = 2e-5
            else:
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)

    def close(self) -> None:
        """Free every window (once). Collective."""
        if self._ctrl_win == MPI.WIN_NULL:
            return
        for slot in self._data:
            if slot is not None:
                slot[0].Unlock_all()
                slot[0].Free()
        self._data = [None] * self.depth
        self._ctrl_win.Unlock_all()
        self._ctrl_win.Free()
