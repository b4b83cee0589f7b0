"""``hpc-moe export TRACE.h5 --perfetto OUT.json[.gz]``: the trace's timelines in the Chrome trace
event format that Perfetto (ui.perfetto.dev) and chrome://tracing open, every rank on one zoomable
timeline.

One process per node (named by node and host, labelled with the run's model, layout and MPI), one
thread per rank (``rank R (node N, host H)``); every phase of the sampled steps' timelines is a
complete slice (its layer and step in ``args``), every exchange an async slice on its rank from
post to done (its kind, layer, micro-batch, and the time the rank was blocked on it in ``args``;
bytes are recorded per step and peer, not per exchange: the step's instant event carries them),
and every step an instant event at its start. Each rank's clock starts at the barrier before the
step (the trace's alignment); steps follow one another by their wall times, so that step s starts
at the sum of the walls before it. Only the steps ``run --events-every`` sampled have timelines.
A resumed trace (hpc_moe.trace.segments) has a process per node and a thread per rank of each
segment (numbered on after the segment before's, named with the segment), and a step's rank ids
are those of the segment that ran it.

Legend: S steps, R ranks.
"""
from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np

from hpc_moe.outputs import OutputError, check_output
from hpc_moe.timing import EXCHANGE_KINDS
from hpc_moe.trace.reader import Trace, TraceError, read_trace
from hpc_moe.trace.segments import Segment, segment_of

_US = 1e6  # the format's timestamps are microseconds


def perfetto_events(tr: Trace, steps: slice = slice(None)) -> list[dict]:
    """The trace event list of the measured steps ``steps`` selects (by position, as a slice)."""
    keep = np.arange(tr.num_steps)[steps]
    start_S = np.concatenate([[0.0], np.cumsum(tr.wall_time_s)])[:-1] * _US
    at = dict(zip(tr.step[keep].tolist(), start_S[keep]))
    out: list[dict] = []
    pids, tids = [], []  # per segment, int [R_k]: the process (node) and thread of each of its ranks
    for seg in tr.segments:
        pid0, tid0 = (sum(getattr(s, n) for s in tr.segments[:seg.index]) for n in ("num_nodes", "num_ranks"))
        pids.append(pid0 + seg.ranks["node"].astype(np.int64))
        tids.append(tid0 + np.arange(seg.num_ranks))
        out += _processes(tr, seg, pid0, tid0)
    for i in keep:
        out.append({"ph": "i", "s": "g", "name": f"step {int(tr.step[i])}", "ts": float(start_S[i]), "pid": 0, "tid": 0,
                    "args": {"kind": str(tr.kind[i]), "wall_ms": float(tr.wall_time_s[i] * 1e3),
                             "input_tokens": int(tr.input_tokens[i]), "output_tokens": int(tr.output_tokens[i]),
                             "offrank_bytes": int(tr.bytes_sent[i].sum() - np.trace(tr.bytes_sent[i]))}})
    ev = tr.events[np.isin(tr.events["step"], list(at))]
    for e, k in zip(ev, segment_of(tr, ev["step"])):
        base, r = at[int(e["step"])], int(e["rank"])
        out.append({"ph": "X", "name": tr.phases[int(e["phase"])], "ts": base + e["t_start_s"] * _US,
                    "dur": (e["t_end_s"] - e["t_start_s"]) * _US, "pid": int(pids[k][r]), "tid": int(tids[k][r]),
                    "args": {"layer": int(e["layer"]), "step": int(e["step"])}})
    ex = tr.exchanges[np.isin(tr.exchanges["step"], list(at))]
    for i, (x, k) in enumerate(zip(ex, segment_of(tr, ex["step"]))):
        base, r = at[int(x["step"])], int(x["rank"])
        name = f"{EXCHANGE_KINDS[int(x['kind'])]} layer {int(x['layer'])}"
        common = {"cat": "exchange", "name": name, "id": i, "pid": int(pids[k][r]), "tid": int(tids[k][r])}
        out.append({**common, "ph": "b", "ts": base + x["t_post_s"] * _US,
                    "args": {"layer": int(x["layer"]), "micro_batch": int(x["micro_batch"]), "step": int(x["step"]),
                             "started_us": float(base + x["t_start_s"] * _US),
                             "blocked_ms": float(x["blocked_s"] * 1e3)}})
        out.append({**common, "ph": "e", "ts": base + x["t_done_s"] * _US})
    return out


def _processes(tr: Trace, seg: Segment, pid0: int, tid0: int) -> list[dict]:
    """The metadata events naming a segment's nodes (processes from pid0) and ranks (threads from
    tid0), labelled with the run's model, this segment's layout and MPI."""
    m = tr.meta
    label = (f"{m['model_config'].get('n_routed_experts')} experts, {seg.num_ranks} ranks on {seg.num_nodes} nodes; "
             f"{m.get('array_backend')}; {str(m.get('mpi_library_version')).splitlines()[0]}")
    tag = f"segment {seg.index} (from step {seg.first_step}): " if tr.resumed else ""
    node_R, host_R = seg.ranks["node"], seg.ranks["host"]
    out: list[dict] = []
    for n in range(seg.num_nodes):
        hosts = sorted(set(host_R[node_R == n]))
        out += [{"ph": "M", "name": "process_name", "pid": pid0 + n, "args": {"name": f"{tag}node {n} ({', '.join(hosts)})"}},
                {"ph": "M", "name": "process_labels", "pid": pid0 + n, "args": {"labels": label}},
                {"ph": "M", "name": "process_sort_index", "pid": pid0 + n, "args": {"sort_index": pid0 + n}}]
    for r in range(seg.num_ranks):
        n = int(node_R[r])
        out += [{"ph": "M", "name": "thread_name", "pid": pid0 + n, "tid": tid0 + r,
                 "args": {"name": f"{tag}rank {r} (node {n}, host {host_R[r]})"}},
                {"ph": "M", "name": "thread_sort_index", "pid": pid0 + n, "tid": tid0 + r, "args": {"sort_index": tid0 + r}}]
    return out


def parse_steps(text: str | None, num_steps: int) -> slice:
    """``A:B`` (Python slice bounds over the measured steps, either may be empty) -> slice."""
    if not text:
        return slice(None)
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = (int(v) if v.strip() else None for v in (a, b))
    except ValueError:
        raise TraceError(f"--steps: expected A:B, as 10:20 or :5 (got {text!r})") from None
    if num_steps and not len(range(num_steps)[slice(lo, hi)]):
        raise TraceError(f"--steps {text} selects none of the trace's {num_steps} steps")
    return slice(lo, hi)


def run_export(trace: str, perfetto: str, steps: str | None = None) -> int:
    """Write the Perfetto file (gzip when OUT ends in .gz); 0, or 2 with one line."""
    try:
        check_output(perfetto, "--perfetto")
        tr = read_trace(trace)
        events = perfetto_events(tr, parse_steps(steps, tr.num_steps))
        doc = {"traceEvents": events, "displayTimeUnit": "ms",
               "otherData": {"trace": os.path.abspath(trace), "software_version": str(tr.meta.get("software_version"))}}
        tmp = f"{perfetto}.tmp-{os.getpid()}"
        try:
            with (gzip.open(tmp, "wt") if perfetto.endswith(".gz") else open(tmp, "w")) as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, perfetto)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise OutputError(f"cannot write {perfetto}: {e.strerror}") from None
    except (TraceError, OutputError) as e:
        print(f"hpc-moe export: error: {e}", file=sys.stderr)
        return 2
    n = sum(e["ph"] in ("X", "b") for e in events)
    print(f"wrote {perfetto}: {n} slices of {tr.num_ranks} ranks on {tr.num_nodes} node{'' if tr.num_nodes == 1 else 's'} "
          f"(open it in https://ui.perfetto.dev or chrome://tracing)")
    return 0
