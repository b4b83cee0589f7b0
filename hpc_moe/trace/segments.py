"""The segments of a trace: the first run, and each ``hpc-moe run --resume`` that continued it.

A run that stops (a signal, a lost node, a killed job) can be continued on the same or fewer
ranks; the resumed run appends to the same file from the first step not written. Each part is a
segment with its own ranks (hosts, nodes, GPUs), the step it started at and when it started, and
how the part before it ended. Per-step rank-indexed datasets keep the first run's R columns; a
segment of fewer ranks fills its first R_k columns and leaves the rest zero.

Shape legend: S steps, R ranks of the segment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SEGMENT_DTYPE = np.dtype([("first_step", "<i8"), ("num_ranks", "<i4"), ("started_unix", "<f8"),
                          ("after_state", "i1"), ("previous_end_unix", "<f8")])


def segment_group(k: int) -> str:
    """Where segment k >= 1 keeps its rank columns (segment 0's are /layout/rank_*)."""
    return f"layout/segment{k}"


@dataclass(frozen=True, eq=False)
class Segment:
    """One run of a trace. first_step: the measured step it started at; end_step: the next
    segment's first step (None for the last); started_unix: when it opened the trace;
    after: how the segment before it ended ("" for the first; "stopped", "failed", or "running":
    killed); previous_end_unix: when the last step written before it ended (0 where none was);
    ranks: its rank columns by name (host, node, local_rank, gpu, device, machine), each [R]."""

    index: int
    first_step: int
    end_step: int | None
    started_unix: float
    after: str
    previous_end_unix: float
    ranks: dict[str, np.ndarray]

    @property
    def num_ranks(self) -> int:
        return len(self.ranks["node"])

    @property
    def num_nodes(self) -> int:
        return int(self.ranks["node"].max()) + 1

    def holds(self, step_S: np.ndarray) -> np.ndarray:
        """bool [S]: which of these steps the segment ran."""
        return (step_S >= self.first_step) & (step_S < (np.iinfo(np.int64).max if self.end_step is None
                                                       else self.end_step))


def segments_of(rows: np.ndarray, rank_columns: list[dict[str, np.ndarray]], states: tuple[str, ...]) -> tuple:
    """Segment objects from the /segments rows (SEGMENT_DTYPE [G]) and each segment's rank columns."""
    firsts = [int(r["first_step"]) for r in rows]
    return tuple(Segment(k, firsts[k], firsts[k + 1] if k + 1 < len(rows) else None, float(r["started_unix"]),
                         "" if r["after_state"] < 0 else states[int(r["after_state"])], float(r["previous_end_unix"]),
                         rank_columns[k]) for k, r in enumerate(rows))


def segment_of(trace, step_N: np.ndarray) -> np.ndarray:
    """int64 [N]: the index of the segment that ran each of these steps."""
    firsts = [seg.first_step for seg in trace.segments]
    return np.maximum(np.searchsorted(firsts, np.asarray(step_N), side="right") - 1, 0)


def rank_column(trace, name: str, step_N: np.ndarray, rank_N: np.ndarray) -> np.ndarray:
    """[N]: rank column ``name`` (host, node, ...) of each (step, rank id) pair, read from the
    segment that ran the step: the rank ids of /events and /exchanges are their segment's own."""
    seg_N, rank_N = segment_of(trace, step_N), np.asarray(rank_N)
    out = np.empty(len(rank_N), np.result_type(*(seg.ranks[name] for seg in trace.segments)))
    for k, seg in enumerate(trace.segments):
        mine = seg_N == k
        out[mine] = seg.ranks[name][rank_N[mine]]
    return out


def resume_gaps(trace) -> list[dict[str, Any]]:
    """Each resume of a trace (segments after the first): the step it resumed at, how the run
    before it ended, its ranks and nodes, and the seconds lost: from the end of the last step
    written before it to the start of its first step (``lost_s``), split into the time until the
    resumed run opened the trace (``restart_s``: the failure's detection, the job's end, the
    scheduler, the launch) and from then to its first measured step (``startup_s``: weights, the
    placement, warm-up). Times are None where a step's end time is not in the trace."""
    out = []
    for seg in trace.segments[1:]:
        mine = np.flatnonzero(seg.holds(trace.step))
        # Unknown when the segment's first step is not among these steps (a subset that dropped it).
        whole = len(mine) and trace.step[mine[0]] == seg.first_step
        first_start = float(trace.time_unix[mine[0]] - trace.wall_time_s[mine[0]]) if whole else None
        known = seg.previous_end_unix > 0
        out.append({"step": seg.first_step, "after": seg.after, "ranks": seg.num_ranks, "nodes": seg.num_nodes,
                    "lost_s": first_start - seg.previous_end_unix if known and first_start else None,
                    "restart_s": seg.started_unix - seg.previous_end_unix if known else None,
                    "startup_s": first_start - seg.started_unix if first_start else None})
    return out
