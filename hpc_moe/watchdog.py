"""The watchdog: a rank that waits in communication longer than the limit ends the job, naming who
did not answer, instead of hanging until the allocation runs out.

Each rank runs one daemon thread. The main thread marks every blocking wait (``waiting``: the
exchanges' waits through the profiler's "wait" phase, the step loop's broadcasts and gathers).
When a wait has lasted ``limit_s``, the thread asks every other rank, on a communicator of its
own, what it is doing; ranks answer from their own watchdog thread (so a rank blocked in a
collective still answers) and a rank that does not answer within ``answer_s`` (stopped, hung in
a system call, or dead) is named. Then one line on stderr and ``MPI_Abort``. The thread calls
MPI only when the library runs at ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it); otherwise it
writes the line and ends the process, which ends the job under mpiexec and srun.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
from mpi4py import MPI

from hpc_moe.comm import abort_job
from hpc_moe.errors import EXIT_WATCHDOG

_ASK, _ANSWER = 71, 72  # message tags on the watchdog's own communicator


class Watchdog:
    """limit_s: seconds a rank may wait in communication (0: no watchdog, every method a no-op);
    comm: the world; hosts: the host of every rank of comm [size] (the report names them: a node
    that died or lost its link shows as all of its ranks silent). Collective to create and to close."""

    def __init__(self, comm: MPI.Comm, limit_s: float, answer_s: float = 5.0, hosts: tuple[str, ...] = ()):
        self.limit_s, self.answer_s, self.hosts = float(limit_s), float(answer_s), hosts
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.step = -1
        self._what, self._since = "", 0.0
        self._mpi = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._thread = None
        if self.limit_s > 0:
            self.comm = comm.Dup()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="hpc-moe-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def waiting(self, what: str):
        """Mark a blocking wait of the main thread (what: e.g. "dispatch of layer 3")."""
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._since = 0.0

    def close(self) -> None:
        """Stop the thread and free the communicator. Collective."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.comm.Free()
            self._thread = None

    # ---- the thread ----------------------------------------------------------------------------
    def _state(self) -> np.ndarray:
        """int64 [2]: this rank's step and the seconds it has been waiting (-1: not waiting)."""
        since = self._since
        return np.array([self.step, int(time.monotonic() - since) if since else -1], np.int64)

    def _run(self) -> None:
        tick = min(1.0, self.limit_s / 10)
        self._ask_buf, self._asked_at = np.zeros(1, np.int64), -1e9
        self._ask = self.comm.Irecv([self._ask_buf, MPI.INT64_T], MPI.ANY_SOURCE, _ASK) if self._mpi else None
        while not self._stop.wait(tick):
            self._answer()
            since = self._since
            # A rank that was just asked leaves the report to the rank that asked: one message.
            if since and time.monotonic() - since > self.limit_s and time.monotonic() - self._asked_at > 2 * self.answer_s:
                self._fire(time.monotonic() - since)
        if self._ask is not None:
            self._ask.Cancel()
            self._ask.Wait()

    def _answer(self) -> int:
        """Tell the ranks that asked what this one is doing (its step, and how long it has waited);
        -> the lowest of them (self.size: none)."""
        status, lowest = MPI.Status(), self.size
        while self._ask is not None and self._ask.Test(status):
            self._asked_at = time.monotonic()
            lowest = min(lowest, status.Get_source())
            self.comm.Send([self._state(), MPI.INT64_T], status.Get_source(), _ANSWER)
            self._ask = self.comm.Irecv([self._ask_buf, MPI.INT64_T], MPI.ANY_SOURCE, _ASK)
        return lowest

    def _fire(self, waited: float) -> None:
        where = f"rank {self.rank} waited {waited:.0f} s for {self._what} (step {self.step})"
        if not self._mpi:
            sys.stderr.write(f"hpc-moe: watchdog: {where}; MPI is not thread-multiple, so the other ranks "
                             "cannot be asked\n")
            sys.stderr.flush()
            os._exit(EXIT_WATCHDOG)
        peers = [p for p in range(self.size) if p != self.rank]
        answers = {p: np.full(2, -2, np.int64) for p in peers}
        reqs = [self.comm.Irecv([answers[p], MPI.INT64_T], p, _ANSWER) for p in peers]
        for p in peers:
            self.comm.Send([np.zeros(1, np.int64), MPI.INT64_T], p, _ASK)
        deadline, lower_fired = time.monotonic() + self.answer_s, False
        while time.monotonic() < deadline and not MPI.Request.Testall(reqs):
            lower_fired |= self._answer() < self.rank  # a rank that fired at the same moment asks us too
            time.sleep(0.05)
        if lower_fired:  # the lowest of the ranks that fired together reports: one message
            deadline = time.monotonic() + 2 * self.answer_s
            while time.monotonic() < deadline:  # it aborts the job meanwhile, unless it died
                self._answer()
                time.sleep(0.05)
        silent = [p for p in peers if answers[p][0] == -2]
        busy = [p for p in peers if answers[p][0] != -2 and answers[p][1] < 0]
        parts = [where]
        if silent:
            parts.append(f"rank(s) {self._ranks(silent)} did not answer (stopped, hung or dead)")
        if busy:
            parts.append(f"rank(s) {self._ranks(busy)} are not waiting (still computing, or behind)")
        if not silent and not busy:
            parts.append("every rank is waiting: a collective that some rank never entered")
        abort_job("hpc-moe: watchdog: " + "; ".join(parts) + "; aborting the job", EXIT_WATCHDOG)

    def _ranks(self, ranks: list[int]) -> str:
        """"2, 3" or, with hosts, "2, 3 on node1; 9 on node4" (hosts in order of first rank)."""
        if not self.hosts:
            return _some(ranks)
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            by_host.setdefault(self.hosts[r], []).append(r)
        shown = [f"{_some(rs)} on {h}" for h, rs in list(by_host.items())[:8]]
        return "; ".join(shown) + (f"; and on {len(by_host) - 8} more hosts" if len(by_host) > 8 else "")


def _some(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks[:16]) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")
