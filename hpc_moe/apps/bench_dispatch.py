"""``hpc-moe bench dispatch``: dispatch/combine latency against the raw Ialltoallv floor of the same
bytes, the local passes alone, and OSU-style overlap, on EP = world size.

Definitions (every time is the max over ranks of one iteration; median and p99 over iterations):
* dispatch: ``Dispatcher.post`` (route, pack, count exchange, post) until the rows have arrived;
  combine: posting the reply rows until the source's sum is done (the receiver's weighting of its
  experts' outputs belongs to the expert phase and is done before); exchange: the blocking
  one-call form with the chosen algorithm and the identity expert.
* raw: one Ialltoallv + Wait on the same transport of exactly the per-peer bytes of the dispatch
  (token rows + metadata rows) and of the combine, buffers ready: the floor of what they move.
  ratio = (dispatch + combine) / (raw dispatch + raw combine), medians.
* local: the passes that are not transfer (plan + pack the rows; reduce the rows that came back),
  next to one memory pass (a contiguous copy of the dispatch's bytes on every rank at once): on a
  host where ranks share the memory bus, each pass over the payload costs about that much.
* MB/rank: bytes each rank sends to other ranks (mean over ranks; its own rows are a local copy).
* overlap (as osu_ialltoallv): see hpc_moe.apps.benchkit.osu_overlap.
* IMB (where the Intel MPI Benchmarks are installed, e.g. ``make install MPI=impi``; ``--no-imb``
  skips them): IMB-MPI1's Alltoallv at the mean per-peer bytes of the dispatch and of the combine,
  on as many ranks, next to the raw floor (hpc_moe.apps.imb); without IMB the table says nothing.
* schemes (with ``--ranks-per-node`` giving more than one node): the one-call exchange flat and
  hierarchical (hpc_moe.ep.hierarchical), and the bytes each sends across and inside nodes.
  The rows above are the flat exchange's.
"""
from __future__ import annotations

import numpy as np

from hpc_moe.apps.bench_options import BenchDispatchOptions
from hpc_moe.apps.benchkit import (
    Polled,
    RawFloor,
    max_over_ranks,
    mean_over_ranks,
    osu_overlap,
    summary,
    timed,
)
from hpc_moe.apps.common import on_root
from hpc_moe.apps.imb import imb_alltoallv
from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext, mpi_library
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.plan import NodeMap, flat_plan, meta_layout
from hpc_moe.errors import UsageError
from hpc_moe.outputs import check_output, write_json


def run_bench_dispatch(o: BenchDispatchOptions) -> int:
    if o.topk > o.experts:
        raise UsageError(f"--topk {o.topk} is more than --experts {o.experts}")
    ctx = ParallelContext.create(ranks_per_node=o.ranks_per_node)
    on_root(ctx, lambda: check_output(o.json, "--json"))
    be = get_backend(o.backend, o.dtype, ctx.local_rank)
    pl = ExpertPlacement.build(o.experts, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, be, DispatchOptions(o.algorithm, o.transport, o.payload, o.deterministic, "flat"))
    rng = np.random.default_rng(o.seed * 100_003 + ctx.rank)
    k = o.topk
    x = be.asarray(rng.standard_normal((o.tokens, o.hidden)).astype(np.float32))
    idx = np.argsort(rng.random((o.tokens, o.experts)), axis=1)[:, :k].astype(np.int64)
    w = rng.random((o.tokens, k)).astype(np.float32)
    comm, sync = ctx.ep_comm, be.synchronize

    def identity(rec):
        """An expert phase that costs nothing: the received rows themselves (one per pair in the
        pairs form), unweighted; the values do not matter here. On shared memory they are written
        where the sources read them, as the experts' last pass writes its rows there."""
        rows = rec.x_ND[rec.row_Q] if d.options.deterministic else rec.x_ND
        if rec.out_ND is None:
            return rows
        rec.out_ND[...] = rows
        return rec.out_ND

    ex = d.post(None, x, idx, w)
    reply = identity(ex.received())
    ex.reply(reply)
    ex.wait()
    out_row = o.hidden * be.dtype.itemsize
    raw = {"dispatch": RawFloor(d.transport, ex.send_counts_P, ex.recv_counts_P, ex.dispatch_row_bytes),
           "combine": RawFloor(d.transport, ex.reply_counts_P, ex.back_counts_P, out_row)}
    rows = {name: [] for name in ("dispatch", "combine", "exchange", "raw_dispatch", "raw_combine", "copy", "pack",
                                  "reduce")}
    copy_src = be.xp.ones((int(ex.send_counts_P.sum()), ex.dispatch_row_bytes), np.uint8)
    copy_dst = be.xp.empty_like(copy_src)
    back = be.xp.zeros((int(ex.back_counts_P.sum()) + 1, o.hidden), be.dtype)
    for it in range(o.warmup + o.iters):
        td, ex = timed(comm, sync, lambda: _dispatched(d, x, idx, w))
        reply = identity(ex.received())
        tc, _ = timed(comm, sync, lambda ex=ex, reply=reply: (ex.reply(reply), ex.wait()))
        tx, _ = timed(comm, sync, lambda: d.exchange(None, x, idx, w, identity))
        trd, _ = timed(comm, sync, raw["dispatch"].run)
        trc, _ = timed(comm, sync, raw["combine"].run)
        tm, _ = timed(comm, sync, lambda: be.xp.copyto(copy_dst, copy_src))
        tp, _ = timed(comm, sync, lambda: _pack_only(d, x, idx, w))
        tr, _ = timed(comm, sync, lambda ex=ex: ex.reduce(back))
        if it >= o.warmup:
            for key, v in zip(rows, (td, tc, tx, trd, trc, tm, tp, tr)):
                rows[key].append(v)
    times = {key: max_over_ranks(comm, v) for key, v in rows.items()}
    mine = {key: float(np.median(v)) for key, v in rows.items()}
    overlap = {}
    if not o.no_overlap:
        overlap = {
            "dispatch": osu_overlap(comm, be, lambda: _Dispatching(d, x, idx, w),
                                    lambda op: (op.ex.received(), op.ex.release()), mine["dispatch"], o.iters),
            "raw_dispatch": osu_overlap(comm, be, lambda: Polled(raw["dispatch"].post()), lambda op: op.req.Wait(),
                                        mine["raw_dispatch"], o.iters),
        }
    remote = np.arange(ctx.ep_size) != ctx.ep_rank
    sent = {"dispatch": mean_over_ranks(comm, float((ex.send_counts_P * ex.dispatch_row_bytes)[remote].sum())),
            "combine": mean_over_ranks(comm, float((ex.reply_counts_P * out_row)[remote].sum()))}
    result = _figures(o, ctx, d, times, sent, mean_over_ranks(comm, float(ex.send_counts_P.sum())), overlap)
    result["schemes"] = _schemes(o, ctx, pl, be, x, idx, w, identity) if ctx.num_nodes > 1 else {}
    result["imb"] = {"skipped": "--no-imb"}
    if not o.no_imb:  # the same total bytes as the raw floor, spread evenly over the peers (self included)
        per_peer = {"dispatch": float((ex.send_counts_P * ex.dispatch_row_bytes).sum()),
                    "combine": float((ex.reply_counts_P * out_row).sum())}
        lengths = {k: max(1, round(mean_over_ranks(comm, v) / ctx.ep_size)) for k, v in per_peer.items()}
        result["imb"] = imb_alltoallv(comm, ctx.machines, lengths, o.iters)
    if ctx.rank == 0:
        print(_table(result))
        if o.json:
            write_json(o.json, result)
    for r in raw.values():
        r.close()
    d.close()
    ctx.free()
    return 0


def _schemes(o: BenchDispatchOptions, ctx, pl, be, x, idx, w, identity) -> dict:
    """Flat against hierarchical on the simulated nodes (hierarchical where it can run: the
    alltoallv algorithm, nodes of one size): the one-call exchange (median ms, max over ranks) and
    the bytes each rank sends across nodes and inside its node (mean over ranks, MB)."""
    out = {}
    other = np.asarray(ctx.node_of_ep_rank) != ctx.node_id
    two_stage = o.algorithm == "alltoallv" and NodeMap.of(pl.node_of_rank).unusable is None
    for scheme in ("flat", "hierarchical") if two_stage else ("flat",):
        d = Dispatcher(ctx, pl, be, DispatchOptions(o.algorithm, o.transport, o.payload, o.deterministic, scheme))

        def one(d=d):
            ex = d.post(None, x, idx, w)
            ex.run_experts(identity)
            ex.wait()
            return ex

        seconds, bytes_P = [], None
        for it in range(o.warmup + o.iters):
            t, ex = timed(ctx.ep_comm, be.synchronize, one)
            if it >= o.warmup:
                seconds.append(t)
            bytes_P = ex.send_bytes_P
        own = np.arange(ctx.ep_size) == ctx.ep_rank
        out[scheme] = {"exchange_ms": 1e3 * float(np.median(max_over_ranks(ctx.ep_comm, seconds))),
                       "internode_mb_per_rank": mean_over_ranks(ctx.ep_comm, float(bytes_P[other].sum())) / 1e6,
                       "intranode_mb_per_rank": mean_over_ranks(ctx.ep_comm, float(bytes_P[~other & ~own].sum())) / 1e6}
        d.close()
    return out


def _dispatched(d: Dispatcher, x, idx, w):
    ex = d.post(None, x, idx, w)
    ex.received()
    return ex  # its combine follows, timed apart


def _pack_only(d: Dispatcher, x, idx, w) -> None:
    """The route + pack pass of a dispatch alone (no communication)."""
    rows, meta = d.pack(flat_plan(d.placement, d.nodes, d.rank, None, idx), x, w,
                        meta_layout(d.options.payload, x.shape[1], idx.shape[1]))
    d.transport.release(rows, meta)


class _Dispatching:
    """A posted dispatch with the progress() that the overlap measurement polls."""

    def __init__(self, d: Dispatcher, x, idx, w):
        self.ex = d.post(None, x, idx, w)

    def progress(self) -> bool:
        return self.ex.progress()


def _figures(o: BenchDispatchOptions, ctx, d, times, sent, rows_sent, overlap) -> dict:
    ops = {
        "dispatch": summary(times["dispatch"], sent["dispatch"]),
        "combine": summary(times["combine"], sent["combine"]),
        f"exchange ({o.algorithm})": summary(times["exchange"], sent["dispatch"] + sent["combine"]),
        "raw Ialltoallv (dispatch bytes)": summary(times["raw_dispatch"], sent["dispatch"]),
        "raw Ialltoallv (combine bytes)": summary(times["raw_combine"], sent["combine"]),
        "memory pass (dispatch bytes)": summary(times["copy"], sent["dispatch"]),
        "local: route + pack rows": summary(times["pack"]),
        "local: combine reduce": summary(times["reduce"]),
    }
    med = {key: float(np.median(v)) for key, v in times.items()}
    floor = med["raw_dispatch"] + med["raw_combine"]
    return {
        "config": {"ep_size": ctx.ep_size, "nodes": ctx.num_nodes, "tokens_per_rank": o.tokens, "hidden": o.hidden,
                   "topk": o.topk, "experts": o.experts, "dtype": o.dtype, "payload": o.payload,
                   "algorithm": o.algorithm, "deterministic": o.deterministic, "transport": d.transport.name,
                   "iters": o.iters, "warmup": o.warmup, "mpi": mpi_library()},
        "rows_sent_per_rank": rows_sent,
        "pairs_per_rank": o.tokens * o.topk,
        "ops": ops,
        "floor_ms": 1e3 * floor,
        "ratio_vs_raw": (med["dispatch"] + med["combine"]) / floor if floor > 0 else None,
        "ratio_exchange_vs_raw": med["exchange"] / floor if floor > 0 else None,
        "overlap": overlap,
    }


def _table(r: dict) -> str:
    c = r["config"]
    lines = [(f"# hpc-moe bench dispatch: EP {c['ep_size']} ({c['nodes']} node(s)), {c['tokens_per_rank']} "
              f"tokens/rank, hidden {c['hidden']}, top-{c['topk']} of {c['experts']} experts, {c['dtype']}, "
              f"payload {c['payload']}, combine {'pairs' if c['deterministic'] else 'weighted'}, transport "
              f"{c['transport']}, {c['iters']} iters (+{c['warmup']} warmup)"),
             f"# {c['mpi']}",
             (f"# rows sent per rank {r['rows_sent_per_rank']:.0f} for {r['pairs_per_rank']} (token, expert) "
              "pairs (one row per destination rank)"),
             f"{'operation':<34}{'median ms':>11}{'p99 ms':>10}{'max ms':>10}{'MB/rank':>10}{'algbw GB/s':>12}"]
    imb = r.get("imb", {})
    for name, op in r["ops"].items():
        lines.append(f"{name:<34}{op['median_ms']:>11.2f}{op['p99_ms']:>10.2f}{op['max_ms']:>10.2f}"
                     f"{op['mb_per_rank']:>10.1f}{op['algbw_gbps']:>12.2f}")
        kind = name.startswith("raw Ialltoallv (") and name[len("raw Ialltoallv ("):].split()[0]
        if kind in imb:  # IMB's one time per call, max over ranks, in the median column
            mb = op["mb_per_rank"]
            lines.append(f"{'IMB-MPI1 Alltoallv (' + kind + ' bytes)':<34}{imb[kind]['t_max_ms']:>11.2f}{'':>10}{'':>10}"
                         f"{mb:>10.1f}{mb / imb[kind]['t_max_ms'] if imb[kind]['t_max_ms'] > 0 else 0.0:>12.2f}")  # MB/ms = GB/s
    lines.append(f"(dispatch + combine) / raw floor: {r['ratio_vs_raw']:.2f}; "
                 f"exchange / raw floor: {r['ratio_exchange_vs_raw']:.2f}")
    if "binary" in imb:
        lines.append(f"(IMB: {imb['binary']} Alltoallv on {imb['ranks']} ranks, t_max of equal per-peer "
                     f"messages of the same total bytes: {imb['dispatch']['bytes_per_peer']} and "
                     f"{imb['combine']['bytes_per_peer']} B)")
    for name, s in r["schemes"].items():
        lines.append(f"{name + ' exchange':<34}{s['exchange_ms']:>11.2f}   across nodes {s['internode_mb_per_rank']:.1f} MB/rank,"
                     f" inside nodes {s['intranode_mb_per_rank']:.1f} MB/rank")
    for name, op in r["overlap"].items():
        lines.append(f"overlap {name:<13} {op['overlap_pct']:5.1f} % (min over ranks {op['overlap_pct_min']:.1f}; "
                     f"pure {op['t_pure_ms']:.1f} ms, compute {op['t_cpu_ms']:.1f} ms, overlapped "
                     f"{op['t_overlapped_ms']:.1f} ms)")
    return "\n".join(lines)
