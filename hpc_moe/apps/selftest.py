"""``hpc-moe selftest``: what a job needs from the machine, checked on every rank in seconds.

One line per check on rank 0. The same checks (but the trace path) run at the start of ``run``
and ``generate``, which stop with one line if one fails:

* mpi: every rank answers an Allreduce and a gather of its rank id, in order;
* gpu: each rank drives a GPU of its own (unless ``--allow-shared-gpu``), or the run is on NumPy;
* transport: the dispatch transport moves variable-count rows between every pair of ranks,
  zero counts and self-sends included, each row tagged with its source so that misrouting shows;
* trace: the trace's directory is writable (selftest only, given ``--trace``);
* links: the bandwidth and latency between every pair of nodes and inside each node
  (hpc_moe.links; selftest only: run measures them itself).
"""
from __future__ import annotations

import logging
import os

import numpy as np
from mpi4py import MPI

from hpc_moe.apps.common import on_root
from hpc_moe.apps.options import SelftestOptions
from hpc_moe.backend import Backend, get_backend
from hpc_moe.comm import ParallelContext, mpi_library
from hpc_moe.ep.shm import DISPATCH
from hpc_moe.ep.transport import make_transport
from hpc_moe.errors import InputError
from hpc_moe.links import Links, measure_links
from hpc_moe.outputs import check_output


class SelftestError(InputError):
    """A check of the machine failed (the message names it)."""


def check_mpi(ctx: ParallelContext) -> str:
    total = ctx.world.allreduce(ctx.rank)
    order = ctx.world.allgather(ctx.rank)
    if total != ctx.size * (ctx.size - 1) // 2 or order != list(range(ctx.size)):
        raise SelftestError(f"mpi: the ranks' answers do not add up (sum {total}, order {order[:8]}...)")
    return f"{ctx.size} ranks on {ctx.num_nodes} node(s) answer ({mpi_library()})"


def check_gpu(ctx: ParallelContext, backend: Backend, allow_shared: bool) -> str:
    devices = ctx.world.allgather((ctx.node_id, backend.device_id))
    if not backend.is_gpu:
        return "no GPU: the NumPy backend"
    shared = len(set(devices)) < len(devices)
    if shared and not allow_shared:
        raise SelftestError("gpu: ranks of one node share a GPU (one rank per GPU, or --allow-shared-gpu)")
    return f"{len(set(devices))} GPUs for {ctx.size} ranks" + (" (shared)" if shared else "")


def check_transport(ctx: ParallelContext, backend: Backend, transport) -> str:
    """Rows of 16 bytes tagged (source, destination, index), (s + 2 d + 1) % 3 of them from s to d:
    zero counts (with 2 ranks or more), self-sends and uneven counts in one Ialltoallv."""
    p, r, w = ctx.ep_size, ctx.ep_rank, 16
    send_P = np.array([(r + 2 * d + 1) % 3 for d in range(p)], np.int64)
    recv_P = np.array([(s + 2 * r + 1) % 3 for s in range(p)], np.int64)

    def rows(src, dst, n):
        out = np.zeros((n, w), np.uint8)
        out[:, 0], out[:, 1], out[:, 2] = src % 251, dst % 251, np.arange(n)
        return out

    send = np.concatenate([rows(r, d, int(send_P[d])) for d in range(p)] or [np.zeros((0, w), np.uint8)])
    want = np.concatenate([rows(s, r, int(recv_P[s])) for s in range(p)] or [np.zeros((0, w), np.uint8)])
    words = backend.xp.asarray(send) if transport.device_buffers else send
    recv = transport.empty(int(recv_P.sum()), w)
    transport.ialltoallv(transport.to_wire(words), send_P, recv, recv_P).Wait()
    got = backend.to_numpy(transport.from_wire(recv, int(recv_P.sum())))
    ok = np.array_equal(got, want)
    transport.release(recv)
    slots = getattr(transport, "slots", None)
    if slots is not None:  # the shared-memory exchange's own path: rows written into the peers' segments
        ok &= np.array_equal(_through_shared_windows(slots, send, send_P), want)
    if not ctx.ep_comm.allreduce(int(ok), op=MPI.MIN):
        raise SelftestError(f"transport: {transport.name} delivered wrong rows (zero counts, self-sends, uneven counts)")
    return f"{transport.name} moves variable-count rows, zero counts and self-sends included"


def _through_shared_windows(slots, send, send_P: np.ndarray) -> np.ndarray:
    """The rows of send [M, W] (send_P to each peer) written into the peers' shared segments, as
    hpc_moe.ep.shm_exchange writes them -> the rows this rank received, in source order."""
    n, w, me = slots.publish(send_P, send_P), send.shape[1], slots.rank
    slots.wait(lambda: slots.all_published(n))
    counts_SR, _ = slots.counts(n)
    window, seg = slots.window(n, int(counts_SR.sum(axis=0).max()) * w, 64)
    first_SR, sent = np.cumsum(counts_SR, axis=0) - counts_SR, np.concatenate([[0], np.cumsum(send_P)])
    for d in range(slots.size):
        at = d * seg + int(first_SR[me, d]) * w
        window[at:at + int(send_P[d]) * w] = send[sent[d]:sent[d + 1]].reshape(-1)
    slots.signal(n, DISPATCH, range(slots.size))
    slots.wait(lambda: slots.landed(n, DISPATCH))
    got = window[me * seg:me * seg + int(counts_SR[:, me].sum()) * w].reshape(-1, w).copy()
    slots.finish(n)
    return got


def _link_table(links: Links) -> list[str]:
    """One line per node: its bandwidth to every node in GB/s (to itself: inside it)."""
    head = "links GB/s, from \\ to " + " ".join(f"{b:>7}" for b in range(links.num_nodes))
    return [head] + [f"{a:>21} " + " ".join(f"{x / 1e9:7.3f}" for x in row) for a, row in enumerate(links.bytes_per_s_NN)]


def run_checks(ctx: ParallelContext, backend: Backend, transport, allow_shared_gpu: bool = False) -> list[str]:
    """The machine checks, collective; -> one line per check, or SelftestError on every rank."""
    lines = [f"mpi: {check_mpi(ctx)}"]
    lines.append(f"gpu: {check_gpu(ctx, backend, allow_shared_gpu)}")
    lines.append(f"transport: {check_transport(ctx, backend, transport)}")
    return lines


def run_selftest(o: SelftestOptions) -> int:
    ctx = ParallelContext.create()
    on_root(ctx, lambda: check_output(o.trace, "trace"))
    trace = [f"trace: {os.path.dirname(os.path.abspath(o.trace))} is writable"] if o.trace else []
    backend = get_backend(o.backend, o.dtype, ctx.local_rank)
    transport = make_transport(ctx.ep_comm, backend, o.transport, logger=logging.getLogger("hpc_moe.channel"))
    lines = run_checks(ctx, backend, transport, o.allow_shared_gpu) + trace
    links = measure_links(ctx)
    lines.append(f"links: {links.describe()}")
    if links.num_nodes > 1:
        lines.extend(_link_table(links))
    if ctx.rank == 0:
        print("\n".join(f"ok  {line}" for line in lines), flush=True)
    transport.close()
    ctx.free()
    return 0
