"""Experts that change owner at a re-placement, fetched from their old owners while a step runs.

A re-placement (``--replan-every``) gives some ranks experts they did not hold. Loading them from
the weights between two steps stalls every rank for the slowest load; instead each such expert's
tensors (gate_up, down) travel from a rank that holds them as non-blocking point-to-point
messages, posted before a step and waited for after it: that step still runs on the old
placement (its exchanges' MPI calls progress the transfers), the next one on the new.

Legend: D hidden size, I an expert's intermediate size on this rank (its tensor-parallel share).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.model.moe import ExpertWeights


@dataclass(frozen=True)
class Move:
    """Expert ``expert`` of MoE layer ``layer`` goes from EP rank ``src`` to EP rank ``dst``."""

    layer: int
    expert: int
    src: int
    dst: int


def moves(old: ExpertPlacement, new: ExpertPlacement, layers: list[int]) -> list[Move]:
    """Every expert an EP rank runs under ``new`` but not under ``old``, with the rank that sends it:
    an old owner's rank of the same tensor-parallel shard, the old replicas taken in turn over the
    receivers so that one hot expert copied to several ranks does not load one sender. The same
    list, in the same order, on every rank (both sides post their messages in this order)."""
    out = []
    for layer in layers:
        turn: dict[int, int] = {}
        for dst in range(new.ep_size):
            had = set(old.local_experts(dst, layer))
            for e in new.local_experts(dst, layer):
                if e in had:
                    continue
                slots = old.owners(e, layer)
                k = turn.get(e, 0)
                turn[e] = k + 1
                src = old.slot_ranks(slots[k % len(slots)])[dst % old.expert_tp]
                out.append(Move(layer, e, src, dst))
    return out


@dataclass(frozen=True)
class FetchRecord:
    """One rank's side of a re-placement: experts and bytes received and sent, seconds from
    posting to done (fetch_s), of those spent posting (post_s: between two steps) and blocked in
    the final wait (wait_s: after the step the transfers ran under)."""

    experts_received: int
    bytes_received: int
    bytes_sent: int
    fetch_s: float
    post_s: float
    wait_s: float


class ExpertFetch:
    """This rank's posted transfers of one re-placement; ``wait()`` completes them.

    held: (layer, expert) -> ExpertWeights this rank holds now; shapes: gate_up [2I, D] and
    down [D, I] of one expert on this rank. Messages carry raw bytes (bf16 has no MPI type).
    """

    def __init__(self, comm: MPI.Comm, backend: Backend, held: dict, todo: list[Move], shapes, row_blocked: bool):
        self.backend, self.row_blocked = backend, row_blocked
        self.t0 = time.perf_counter()
        rank = comm.Get_rank()
        self._requests, self._sent, self._received = [], [], {}
        # One tag: messages between two ranks on one communicator match in posting order, and
        # both sides post in the order of ``todo``.
        for m in todo:
            if m.src == rank:
                w = held[(m.layer, m.expert)]
                for a in (w.gate_up, w.down):
                    host = np.ascontiguousarray(backend.to_numpy(a))
                    self._sent.append(host)  # alive until the send completes
                    self._requests.append(comm.Isend([host.view(np.uint8).reshape(-1), MPI.BYTE], dest=m.dst, tag=0))
            if m.dst == rank:
                bufs = tuple(np.empty(s, backend.dtype) for s in shapes)
                for b in bufs:
                    self._requests.append(comm.Irecv([b.view(np.uint8).reshape(-1), MPI.BYTE], source=m.src, tag=0))
                self._received[(m.layer, m.expert)] = bufs
        self.post_s = time.perf_counter() - self.t0

    def wait(self) -> tuple[dict, FetchRecord]:
        """-> ((layer, expert) -> ExpertWeights received, this rank's FetchRecord)."""
        t = time.perf_counter()
        MPI.Request.Waitall(self._requests)
        done = time.perf_counter()
        got = {k: ExpertWeights(self.backend.asarray(gu), self.backend.asarray(dn), self.row_blocked)
               for k, (gu, dn) in self._received.items()}
        rec = FetchRecord(len(got), sum(gu.nbytes + dn.nbytes for gu, dn in self._received.values()),
                          sum(a.nbytes for a in self._sent), done - self.t0, self.post_s, done - t)
        self._requests, self._sent = [], []
        return got, rec
