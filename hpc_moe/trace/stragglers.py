"""Who held the exchanges up: each rank's blocked time split into waiting for the last peer to
arrive (skew) and moving bytes after it arrived (transfer), and the ranks that arrive last.

From the exchange records of the sampled steps (``/exchanges``): one exchange instance is a (step,
layer, micro-batch, kind) that every rank of the EP group takes part in; a rank *arrives* when it
starts its side (``t_start_s``: the dispatch's count exchange, or the combine's post) and can
complete only once every peer has arrived. Of the time a rank was blocked on the instance, the
part up to the last peer's arrival is skew and the rest transfer. Each rank's clock starts at the
barrier before the step, so arrivals compare across ranks to within the barrier's own skew.

The last rank to arrive at an instance *caused* its peers' skew there. A *straggler* caused at
least ``share_needed(R)`` of all the skew (twice its fair share 1 / R, within [1/4, 3/4]); on an
even run nobody does. For each rank also how often it arrived last and its mean lateness (arrival
minus the instance's median arrival). A rank that is slow inside an exchange (descheduled while it
polls: MPI progresses only in its calls) delays its peers' transfer rather than its arrival, and
is not named. For each straggler, the phase
it spent the most time in beyond the median rank (what it was doing instead of arriving).

A resumed trace (hpc_moe.trace.segments) is analysed in its last segment with exchange records:
rank ids are each segment's own, and an instance's ranks are those of the segment that ran it
(the report analyses each segment, on ``trace.segment(k)``).

Legend: X exchange records, I instances, R ranks.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hpc_moe.trace.reader import Trace
from hpc_moe.trace.segments import segment_of


def share_needed(ranks: int) -> float:
    """The share of all skew a rank must cause to be named a straggler."""
    return min(0.75, max(2.0 / ranks, 0.25))


def straggler_stats(tr: Trace) -> dict[str, Any] | None:
    """The analysis of the module docstring, or None without exchange records (no sampled steps,
    or one rank). Keys: instances; per rank (lists [R]) skew_ms and transfer_ms (per sampled step,
    summed over its exchanges), caused_share (of all peers' skew, caused by arriving last),
    last_share (of instances it arrived last in) and lateness_ms (mean); stragglers: [{rank, node,
    host, caused_share, last_share, lateness_ms, busy_phase, busy_extra_ms}]."""
    tr = _last_sampled_segment(tr)
    ex = tr.exchanges
    if len(ex) == 0 or tr.num_ranks < 2:
        return None
    R = tr.num_ranks
    key = np.stack([ex["step"], ex["layer"], ex["micro_batch"], ex["kind"]], axis=1)
    _, inst_X = np.unique(key, axis=0, return_inverse=True)
    inst_X = inst_X.reshape(-1)
    n = int(inst_X.max()) + 1
    arrive_IR = np.full((n, R), np.nan)
    arrive_IR[inst_X, ex["rank"]] = ex["t_start_s"]
    whole = ~np.isnan(arrive_IR).any(axis=1)  # instances every rank recorded
    arrive_IR = arrive_IR[whole]
    last_I = arrive_IR.max(axis=1)
    keep_X = whole[inst_X]
    rows = ex[keep_X]
    i_X = np.searchsorted(np.flatnonzero(whole), inst_X[keep_X])  # instance of each kept row
    skew_X = np.clip(last_I[i_X] - rows["t_start_s"], 0.0, rows["blocked_s"])
    last_rank_I = np.argmax(arrive_IR, axis=1)
    caused_R = np.bincount(last_rank_I[i_X], skew_X, R)  # a row's skew is its instance's last rank's doing
    caused_share_R = caused_R / caused_R.sum() if caused_R.sum() > 0 else np.zeros(R)
    steps = max(len(np.unique(rows["step"])), 1)
    skew_R = np.bincount(rows["rank"], skew_X, R) / steps * 1e3
    transfer_R = np.bincount(rows["rank"], rows["blocked_s"] - skew_X, R) / steps * 1e3
    last_share_R = np.bincount(last_rank_I, minlength=R) / len(arrive_IR)
    lateness_R = (arrive_IR - np.median(arrive_IR, axis=1, keepdims=True)).mean(axis=0)
    out = []
    for r in np.flatnonzero(caused_share_R >= share_needed(R)):
        phase, extra = _busiest_phase(tr, int(r))
        out.append({"rank": int(r), "node": int(tr.rank_node[r]), "host": str(tr.rank_host[r]),
                    "caused_share": float(caused_share_R[r]), "last_share": float(last_share_R[r]),
                    "lateness_ms": float(lateness_R[r] * 1e3), "busy_phase": phase, "busy_extra_ms": extra})
    return {"instances": int(len(arrive_IR)), "skew_ms": skew_R.tolist(), "transfer_ms": transfer_R.tolist(),
            "caused_share": caused_share_R.tolist(), "last_share": last_share_R.tolist(),
            "lateness_ms": (lateness_R * 1e3).tolist(), "stragglers": out}


def _last_sampled_segment(tr: Trace) -> Trace:
    """tr, or of a resumed trace the last segment with exchange records alone."""
    if not tr.resumed or not len(tr.exchanges):
        return tr
    return tr.segment(int(segment_of(tr, tr.exchanges["step"]).max()))


def _busiest_phase(tr: Trace, rank: int) -> tuple[str, float]:
    """The compute phase (not "wait") in which ``rank`` spent the most beyond the median rank, ms
    a step, over the steps the exchanges were sampled in."""
    steps = np.isin(tr.step, np.unique(tr.exchanges["step"]))
    per_RP = tr.phase_time_s[steps].sum(axis=1).mean(axis=0) * 1e3  # [R, P] ms a step
    extra_P = per_RP[rank] - np.median(per_RP, axis=0)
    extra_P[tr.phases.index("wait")] = -np.inf
    p = int(np.argmax(extra_P))
    return tr.phases[p], float(extra_P[p])


def straggler_table(tr: Trace) -> str | None:
    """Text: per rank its skew and transfer ms a step and how often it arrived last; the stragglers
    named, or that there were none. None without exchange records."""
    tr = _last_sampled_segment(tr)
    s = straggler_stats(tr)
    if s is None:
        return None
    lines = [f"Stragglers ({s['instances']} exchanges of the sampled steps; skew: blocked until the last peer "
             "arrived, transfer: after; ms a step)",
             f"{'rank':>4} {'node':>4} {'skew':>9} {'transfer':>9} {'caused %':>9} {'last %':>7} {'late ms':>8}"]
    for r in range(tr.num_ranks):
        lines.append(f"{r:>4} {int(tr.rank_node[r]):>4} {s['skew_ms'][r]:>9.3f} {s['transfer_ms'][r]:>9.3f} "
                     f"{100 * s['caused_share'][r]:>9.1f} {100 * s['last_share'][r]:>7.1f} {s['lateness_ms'][r]:>8.3f}")
    if not s["stragglers"]:
        lines.append(f"no straggler: no rank caused {100 * share_needed(tr.num_ranks):.0f}% of the others' waiting "
                     "for the last arrival")
    for g in s["stragglers"]:
        lines.append(f"straggler: rank {g['rank']} (node {g['node']}, host {g['host']}) caused "
                     f"{100 * g['caused_share']:.0f}% of the others' waiting, arriving last in "
                     f"{100 * g['last_share']:.0f}% of the exchanges, {g['lateness_ms']:.3f} ms after the median "
                     f"rank; it spends {g['busy_extra_ms']:.3f} ms a step more than the median rank in {g['busy_phase']}")
    return "\n".join(lines)
