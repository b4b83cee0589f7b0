"""The report of a resumed trace (hpc_moe.trace.segments): one run whose segments ran on different
ranks. Every step counts once in the throughput; the figures that depend on the rank map (phases
over ranks, nodes, stragglers, per-rank loads, ...) are computed on each segment alone
(``segment_views``); the time lost between a stop and its resume is shown, and is in no step's
wall time, so in no throughput.

Shape legend: S steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hpc_moe.trace.reader import Trace
from hpc_moe.trace.segments import Segment, resume_gaps, segment_of
from hpc_moe.trace.text import fmt_num, text_table

# How the segment before a resume ended, as the report says it (/status states).
_ENDED = {"running": "killed", "stopped": "stopped", "failed": "failed", "": "-"}


def segment_views(trace: Trace) -> list[tuple[Segment, Trace]]:
    """(segment, the trace of it alone) for each segment with steps here, or [(its segment,
    trace)] for a trace never resumed: what every rank-dependent figure is computed on."""
    if not trace.resumed:
        return [(trace.segments[0], trace)]
    views = []
    for seg in trace.segments:
        view = trace.segment(seg.index)
        if seg.index:  # the modelled rank load in meta is the first run's placement's, not this one's
            extra = {k: v for k, v in (view.meta.get("extra") or {}).items() if k != "placement"}
            view = dataclasses.replace(view, meta={**view.meta, "extra": extra})
        if view.num_steps:
            views.append((seg, view))
    return views


def last_view(trace: Trace) -> Trace:
    """The trace of the last segment with steps here (the ranks the run ended on); the trace
    itself when never resumed or without steps: what one figure per rank map is computed on."""
    views = segment_views(trace)
    return views[-1][1] if views else trace


def rank_counts(trace: Trace, mask_S: np.ndarray) -> tuple[float, float, float]:
    """(ranks, GPUs, nodes) that ran the steps of mask_S (bool [S]): each segment's counts weighted
    by its share of their summed wall time, so that tokens/s over them divided by the ranks is
    tokens per rank-second (tokens / sum over segments of wall_k x R_k); a trace never resumed:
    its own counts."""
    if not trace.resumed:
        return trace.num_ranks, trace.num_gpus, trace.num_nodes
    wall = trace.wall_time_s[mask_S].sum()
    seg_S = segment_of(trace, trace.step)
    counts = np.zeros(3)
    for seg in trace.segments:
        share = trace.wall_time_s[mask_S & (seg_S == seg.index)].sum() / wall if wall else 0.0
        counts += share * np.array([seg.num_ranks, np.sum(seg.ranks["gpu"] >= 0), seg.num_nodes])
    return float(counts[0]), float(counts[1]), float(counts[2])


def segment_rows(trace: Trace) -> list[dict[str, Any]]:
    """One dict per segment: its steps here (first_step, last_step: None without steps, steps),
    ranks, nodes, hosts, after (how the segment before it ended, "" for the first), input and
    output tokens/s of its steps (None without steps), and for a resume the seconds lost, split
    into restart_s and startup_s (hpc_moe.trace.segments.resume_gaps; None for the first or
    where unknown)."""
    gaps = [{}, *resume_gaps(trace)]
    rows = []
    for seg, gap in zip(trace.segments, gaps):
        mine = seg.holds(trace.step)
        wall = float(trace.wall_time_s[mine].sum())
        rows.append({"first_step": seg.first_step, "last_step": int(trace.step[mine].max()) if mine.any() else None,
                     "steps": int(mine.sum()), "ranks": seg.num_ranks, "nodes": seg.num_nodes,
                     "hosts": len(set(seg.ranks["host"].tolist())), "after": seg.after,
                     **{f"{d}_tokens_per_s": float(tokens[mine].sum() / wall) if wall else None
                        for d, tokens in (("input", trace.input_tokens), ("output", trace.output_tokens))},
                     **{k: gap.get(k) for k in ("lost_s", "restart_s", "startup_s")}})
    return rows


def segments_json(trace: Trace) -> dict[str, Any]:
    """summary_json's "segments" (per segment: first_step, steps, ranks, nodes, after, input and
    output tokens/s, lost_s) and "time_lost_s" (lost_s summed over the resumes: 0.0 without one,
    None where one is unknown)."""
    rows = segment_rows(trace)
    lost = [r["lost_s"] for r in rows[1:]]
    keys = ("first_step", "steps", "ranks", "nodes", "after", "input_tokens_per_s", "output_tokens_per_s", "lost_s")
    return {"segments": [{k: r[k] for k in keys} for r in rows],
            "time_lost_s": None if None in lost else float(sum(lost))}


def _secs(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.3f} s"


def segment_title(seg: Segment, view: Trace) -> str:
    """The heading of a segment's rank-dependent sections."""
    return (f"-- segment {seg.index}: steps {int(view.step.min())}..{int(view.step.max())} on {seg.num_ranks} ranks, "
            f"{seg.num_nodes} nodes --")


def segments_lines(trace: Trace) -> list[str]:
    """The report's "Segments" block of a resumed trace (nothing for one never resumed): each
    segment's steps, ranks, nodes, hosts, how the one before ended and its throughput; then the
    time lost at each resume."""
    if not trace.resumed:
        return []
    rows = segment_rows(trace)
    table = text_table(["segment", "steps", "ranks", "nodes", "hosts", "the run before", "input tok/s", "output tok/s"],
                       [[k, "-" if r["last_step"] is None else f"{r['first_step']}..{r['last_step']}", r["ranks"],
                         r["nodes"], r["hosts"], _ENDED[r["after"]],
                         *(fmt_num(r[f"{d}_tokens_per_s"]) if r[f"{d}_tokens_per_s"] is not None else "-"
                           for d in ("input", "output"))] for k, r in enumerate(rows)])
    lines = ["", f"Segments (the run and {len(rows) - 1} resume{'s' if len(rows) > 2 else ''}: every step once; "
             "throughput over all of them, the rank figures per segment below)", table,
             "Time lost at each resume (from the end of the last step before it to the start of its first: outside "
             "every step's wall time, so outside the throughput)"]
    for r in rows[1:]:
        lines.append(f"  step {r['first_step']}, after the run was {_ENDED[r['after']]}: {_secs(r['lost_s'])} lost = "
                     f"{_secs(r['restart_s'])} to restart (detection, the job's end, the scheduler, the launch) + "
                     f"{_secs(r['startup_s'])} to start up (weights, placement, warm-up)")
    lost = segments_json(trace)["time_lost_s"]
    if lost is not None:
        lines.append(f"  in all {lost:.3f} s lost, against {trace.wall_time_s.sum():.3f} s of measured steps")
    return lines
