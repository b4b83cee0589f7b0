"""``hpc-moe bench dispatch``: dispatch/combine latency against the raw Ialltoallv floor, and
OSU-style overlap, on EP = world size (OSU / nccl-tests style report).

Definitions (every time is the max over ranks of one iteration; median and p99 over iterations):
* dispatch, combine: the blocking calls (combine of the identity expert's outputs); exchange: the
  one-call API with the chosen algorithm (identity expert).
* raw: one Ialltoallv + Wait on the same transport with exactly the per-peer bytes of the dispatch
  (rows of the packed width) and of the combine, buffers ready: the floor of what dispatch and
  combine move. ratio = (dispatch + combine) / (raw dispatch + raw combine), medians (target <= 1.3).
* local: the two local passes alone (routing + packing rows by destination; the weighted sum of
  the returned rows), to show what dispatch and combine add to the raw floor.
* MB/rank: bytes each rank sends to other ranks (mean over ranks; its own rows are a local copy);
  algbw = MB/rank / median time.
* overlap (as osu_ialltoallv): t_pure = median time of the operation alone; a dummy compute (a matmul
  loop) is sized to t_pure and timed alone (t_cpu), then run between posting and waiting with a
  test() after every matmul (t_ovl): overlap = max(0, 100 (1 - (t_ovl - t_cpu) / t_pure)), the mean
  over ranks (target >= 70 % when compute >= communication).

Run: mpiexec -n 8 python -m mpi4py -m hpc_moe bench dispatch --tokens 512 --hidden 7168 ...
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.dispatch import ALGORITHMS, PAYLOADS, Dispatcher, DispatchOptions
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.transport import TRANSPORTS


def add_dispatch_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of the dispatch benchmark (self-contained: backend and transport included)."""
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256, help="routed experts (uniform random routing)")
    p.add_argument("--algorithm", default="alltoallv", choices=ALGORITHMS, help="for the exchange row")
    p.add_argument("--payload", default="native", choices=PAYLOADS)
    p.add_argument("--transport", default="auto", choices=TRANSPORTS)
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ranks-per-node", type=int, default=None, help="simulate nodes of k ranks")
    p.add_argument("--no-overlap", action="store_true", help="skip the overlap measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON (rank 0)")
    return p


def run_dispatch(args) -> int:
    """Run the benchmark on MPI.COMM_WORLD; rank 0 prints the table. Returns the exit status."""
    ctx = ParallelContext.create(ranks_per_node=args.ranks_per_node)
    be = get_backend(args.backend, args.dtype, ctx.local_rank)
    pl = ExpertPlacement.build(args.experts, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, be, DispatchOptions(args.algorithm, args.transport, args.payload))
    rng = np.random.default_rng(args.seed * 100_003 + ctx.rank)
    t, k, e = args.tokens, min(args.topk, args.experts), args.experts
    x = be.asarray(rng.standard_normal((t, args.hidden)).astype(np.float32))
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int64)
    w = be.xp.asarray(rng.random((t, k)).astype(np.float32))
    comm, sync = ctx.ep_comm, be.synchronize

    def timed(fn):
        comm.Barrier()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    recv_x, pairs, h = d.dispatch(x, idx, w)
    out = pairs.gather(recv_x, be)
    raw = _RawFloor(d, h, args.hidden, be.dtype.itemsize)
    rows = {"dispatch": [], "combine": [], "exchange": [], "raw_dispatch": [], "raw_combine": [],
            "pack": [], "reduce": []}
    n_back, row_bytes = int(h.back_counts_P.sum()) + 1, args.hidden * be.dtype.itemsize
    for it in range(args.warmup + args.iters):
        td, (recv_x, pairs, h) = timed(lambda: d.dispatch(x, idx, w))
        out = pairs.gather(recv_x, be)
        tc, _ = timed(lambda out=out, h=h: d.combine(out, h))
        tx, _ = timed(lambda: d.exchange(x, idx, w, lambda xq, le: xq))
        trd, _ = timed(lambda: raw.run("dispatch"))
        trc, _ = timed(lambda: raw.run("combine"))
        # the local passes alone: routing + packing the rows, and the weighted sum of combine
        tp, _ = timed(lambda: d.transport.release(d.prepare(x, idx, None)[1]))
        back = d.transport.empty(n_back, row_bytes)
        back[:] = 0
        tr_, _ = timed(lambda back=back, h=h: d.weighted_sum(back, h))
        if it >= args.warmup:
            for key, v in zip(rows, (td, tc, tx, trd, trc, tp, tr_)):
                rows[key].append(v)
    mine = {key: float(np.median(v)) for key, v in rows.items()}
    times = {key: _max_over_ranks(comm, v) for key, v in rows.items()}
    overlap = {} if args.no_overlap else _overlap(d, be, x, idx, w, h, out, raw, mine, args.iters)
    stats = h.stats.as_dict()
    sent = {"dispatch": stats["dispatch_send_bytes_remote"], "combine": stats["combine_send_bytes_remote"]}
    mean_sent = {key: _mean(comm, v) for key, v in sent.items()}
    rows_sent = _mean(comm, float(sum(stats["send_rows_P"])))
    result = _figures(args, ctx, d, times, mean_sent, rows_sent, overlap)
    if ctx.rank == 0:
        print(_table(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    d.close()
    raw.close()
    ctx.free()
    return 0


class _RawFloor:
    """Pre-built buffers for a bare Ialltoallv of the dispatch's and the combine's per-peer bytes."""

    def __init__(self, d: Dispatcher, h, hidden: int, itemsize: int):
        width = d.layout(hidden, h.back_index_TC.shape[1] // d.tp, h.dtype).width
        st, tr = h.stats, d.transport
        self.tr = tr
        self.ops = {
            "dispatch": self._bufs(st.send_rows_P, st.recv_rows_P, width),
            "combine": self._bufs(h.reply_counts_P, h.back_counts_P, hidden * itemsize),
        }

    def _bufs(self, send_counts, recv_counts, width):
        xp = self.tr.backend.xp
        send = self.tr.to_wire(xp.zeros((max(int(send_counts.sum()), 1), width), dtype=np.uint8))
        return send, send_counts, self.tr.empty(int(recv_counts.sum()), width), recv_counts

    def post(self, op: str):
        return self.tr.ialltoallv(*self.ops[op])

    def run(self, op: str) -> None:
        self.post(op).Wait()

    def close(self) -> None:
        for send, _, recv, _ in self.ops.values():
            self.tr.release(send, recv)


def _overlap(d, be, x, idx, w, h, out, raw, mine, iters) -> dict:
    """OSU osu_ialltoallv overlap for the async dispatch, the async combine and the raw floor."""
    xp, comm = be.xp, d.comm
    a = xp.asarray(np.random.default_rng(1).standard_normal((256, 256)), dtype=np.float32)

    def unit():
        a @ a
        be.synchronize()

    t0 = time.perf_counter()
    for _ in range(20):
        unit()
    t_unit = (time.perf_counter() - t0) / 20
    ops = {
        "dispatch": (lambda: d.dispatch_async(x, idx, w), mine["dispatch"]),
        "combine": (lambda: d.combine_async(out, h), mine["combine"]),
        "raw_dispatch": (lambda: _Polled(raw.post("dispatch")), mine["raw_dispatch"]),
    }
    result = {}
    for name, (post, t_pure) in ops.items():
        n = max(1, round(t_pure / t_unit))
        t_cpu, t_ovl = [], []
        for _ in range(max(3, iters // 2)):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(n):
                unit()
            t_cpu.append(time.perf_counter() - t0)
            comm.Barrier()
            t0 = time.perf_counter()
            op = post()
            for _ in range(n):
                unit()
                op.test()
            op.wait()
            be.synchronize()
            t_ovl.append(time.perf_counter() - t0)
        tc, to = float(np.median(t_cpu)), float(np.median(t_ovl))
        pct = max(0.0, 100.0 * (1.0 - (to - tc) / t_pure)) if t_pure > 0 else 0.0
        result[name] = {"overlap_pct": _mean(comm, pct), "overlap_pct_min": _min(comm, pct),
                        "t_pure_ms": 1e3 * _mean(comm, t_pure), "t_cpu_ms": 1e3 * _mean(comm, tc),
                        "t_overlapped_ms": 1e3 * _mean(comm, to)}
    return result


class _Polled:
    def __init__(self, req):
        self.req = req

    def test(self) -> bool:
        return self.req.Test()

    def wait(self) -> None:
        self.req.Wait()


def _max_over_ranks(comm, v) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.MAX)
    return a


def _mean(comm, v: float) -> float:
    a = np.array([v], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.SUM)
    return float(a[0]) / comm.Get_size()


def _min(comm, v: float) -> float:
    a = np.array([v], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.DOUBLE], op=MPI.MIN)
    return float(a[0])


def _figures(args, ctx, d, times, mean_sent, rows_sent, overlap) -> dict:
    def summary(v, nbytes):
        med = float(np.median(v))
        return {"median_ms": 1e3 * med, "p99_ms": 1e3 * float(np.percentile(v, 99)),
                "max_ms": 1e3 * float(np.max(v)), "mb_per_rank": nbytes / 1e6,
                "algbw_gbps": nbytes / med / 1e9 if med > 0 else 0.0}

    ops = {
        "dispatch": summary(times["dispatch"], mean_sent["dispatch"]),
        "combine": summary(times["combine"], mean_sent["combine"]),
        f"exchange ({args.algorithm})": summary(times["exchange"], mean_sent["dispatch"] + mean_sent["combine"]),
        "raw Ialltoallv (dispatch bytes)": summary(times["raw_dispatch"], mean_sent["dispatch"]),
        "raw Ialltoallv (combine bytes)": summary(times["raw_combine"], mean_sent["combine"]),
        "local: route + pack rows": summary(times["pack"], 0),
        "local: combine weighted sum": summary(times["reduce"], 0),
    }
    med = {key: float(np.median(v)) for key, v in times.items()}
    floor = med["raw_dispatch"] + med["raw_combine"]
    return {
        "config": {"ep_size": ctx.ep_size, "nodes": ctx.num_nodes, "tokens_per_rank": args.tokens,
                   "hidden": args.hidden, "topk": args.topk, "experts": args.experts,
                   "dtype": args.dtype, "payload": args.payload, "algorithm": args.algorithm,
                   "transport": d.transport.name, "iters": args.iters, "warmup": args.warmup,
                   "mpi": MPI.Get_library_version().splitlines()[0].strip()},
        "rows_sent_per_rank": rows_sent,
        "pairs_per_rank": args.tokens * min(args.topk, args.experts),
        "ops": ops,
        "ratio_vs_raw": (med["dispatch"] + med["combine"]) / floor if floor > 0 else None,
        "ratio_exchange_vs_raw": med["exchange"] / floor if floor > 0 else None,
        "overlap": overlap,
    }


def _table(r: dict) -> str:
    c = r["config"]
    lines = [(f"# hpc-moe bench dispatch: EP {c['ep_size']} ({c['nodes']} node(s)), {c['tokens_per_rank']} "
              f"tokens/rank, hidden {c['hidden']}, top-{c['topk']} of {c['experts']} experts, {c['dtype']}, "
              f"payload {c['payload']}, transport {c['transport']}, {c['iters']} iters (+{c['warmup']} warmup)"),
             f"# {c['mpi']}",
             (f"# rows sent per rank {r['rows_sent_per_rank']:.0f} for {r['pairs_per_rank']} (token, expert) "
              "pairs (one row per destination rank)"),
             f"{'operation':<34}{'median ms':>11}{'p99 ms':>10}{'max ms':>10}{'MB/rank':>10}{'algbw GB/s':>12}"]
    for name, o in r["ops"].items():
        lines.append(f"{name:<34}{o['median_ms']:>11.2f}{o['p99_ms']:>10.2f}{o['max_ms']:>10.2f}"
                     f"{o['mb_per_rank']:>10.1f}{o['algbw_gbps']:>12.2f}")
    lines.append(f"(dispatch + combine) / raw floor: {r['ratio_vs_raw']:.2f} (target <= 1.3); "
                 f"exchange / raw floor: {r['ratio_exchange_vs_raw']:.2f}")
    for name, o in r["overlap"].items():
        lines.append(f"overlap {name:<13} {o['overlap_pct']:5.1f} % (min over ranks {o['overlap_pct_min']:.1f}; "
                     f"pure {o['t_pure_ms']:.1f} ms, compute {o['t_cpu_ms']:.1f} ms, overlapped "
                     f"{o['t_overlapped_ms']:.1f} ms; target >= 70 %)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc_moe bench")
    sub = parser.add_subparsers(dest="what", required=True)
    add_dispatch_args(sub.add_parser("dispatch", help="dispatch/combine against the raw Ialltoallv floor"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hpc-moe: %(message)s", stream=sys.stderr)
    return run_dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
