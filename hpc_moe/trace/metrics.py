"""Figures derived from a read trace (hpc_moe.trace.reader.Trace): what the report, the plots and
users' scripts compute from the recorded arrays. Those per rank read one rank map: of a resumed
trace, compute them on ``trace.segment(k)`` (hpc_moe.trace.resumed.segment_views).

Shape legend: S steps, L layers, M MoE layers, R ranks, P phases.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hpc_moe.trace.reader import Trace


def phase_totals_per_layer(trace: Trace) -> np.ndarray:
    """float64 [L, P]: seconds per layer and phase, summed over steps, mean over ranks."""
    return trace.phase_time_s.sum(axis=0).mean(axis=1)


def expert_load_imbalance(trace: Trace, *, per_step: bool = True) -> np.ndarray:
    """max/mean of routed tokens over experts: float64 [S, M] per step, or [M] for all steps summed.

    1.0 is perfect balance; the slowest expert bounds a layer, so per-step values are what costs time.
    NaN where a layer routed no tokens.
    """
    counts = trace.expert_tokens if per_step else trace.expert_tokens.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts.max(axis=-1) / counts.mean(axis=-1)


def achieved_bandwidth(trace: Trace, *, per_step: bool = False) -> np.ndarray:
    """Bytes/s each rank sent to other ranks per second it spent communicating (the comm phases:
    dispatch and combine, their local work, and wait, the time blocked on them).

    float64 [R] over all steps, or [S, R] per step; self-sends (the diagonal) are local copies and
    do not count. NaN where a rank spent no time in them.
    """
    sent = trace.bytes_sent.sum(axis=2) - np.diagonal(trace.bytes_sent, axis1=1, axis2=2)  # [S, R]
    secs = trace.phase_time_s[..., trace.phase_ids(trace.comm_phases)].sum(axis=(1, 3))  # [S, R]
    if not per_step:
        sent, secs = sent.sum(axis=0), secs.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(secs > 0, sent / np.where(secs > 0, secs, 1), np.nan)


def exchange_overlap(trace: Trace) -> dict[str, np.ndarray]:
    """Per MoE layer (and in total) the all-to-all time of a step, mean over steps and ranks, ms:
    in_flight float64 [M] (started to seen complete, dispatch + combine, all micro-batches),
    blocked float64 [M] (the exposed part: the rank waited), hidden float64 [M] the share of the
    in-flight time that ran under compute (1 - blocked / in_flight; NaN without exchanges); and
    the same over all layers as scalars under "total_*"."""
    x = trace.exchange_time_s[:, trace.moe_layers] if trace.num_steps else np.zeros((0, len(trace.moe_layers), 1, 2, 2))
    per = x.sum(axis=3).mean(axis=(0, 2)) * 1e3 if len(x) else np.zeros((len(trace.moe_layers), 2))  # [M, 2]
    flight, blocked = per[:, 0], per[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        hidden = np.where(flight > 0, 1 - np.minimum(blocked, flight) / flight, np.nan)
        total_hidden = 1 - min(blocked.sum(), flight.sum()) / flight.sum() if flight.sum() > 0 else float("nan")
    return {"in_flight": flight, "blocked": blocked, "hidden": hidden, "total_in_flight": float(flight.sum()),
            "total_blocked": float(blocked.sum()), "total_hidden": float(total_hidden)}


def comm_stats(trace: Trace) -> dict[str, float]:
    """Off-rank all-to-all bytes per step (total, intra-node, inter-node) and achieved bandwidth
    per rank (bytes / dispatch+combine seconds; min, mean, max over ranks) in B/s."""
    off = trace.bytes_sent.sum(axis=0) * ~np.eye(trace.num_ranks, dtype=bool)  # [R, R], all steps
    same = trace.rank_node[:, None] == trace.rank_node[None, :]
    steps = max(trace.num_steps, 1)
    bw = achieved_bandwidth(trace)
    ok = bw[np.isfinite(bw)]
    return {"bytes_per_step": off.sum() / steps, "intra_node_bytes_per_step": (off * same).sum() / steps,
            "inter_node_bytes_per_step": (off * ~same).sum() / steps,
            "bw_min": float(ok.min()) if ok.size else float("nan"),
            "bw_mean": float(ok.mean()) if ok.size else float("nan"),
            "bw_max": float(ok.max()) if ok.size else float("nan")}


def rank_stats(trace: Trace) -> dict[str, Any]:
    """Which rank held the step up: per rank, the median over steps of its compute (every phase but
    "wait", summed over layers) and of its own step time (/steps/rank_time_s); the slowest and last
    ranks and the extremes in ms."""
    wait = trace.phases.index("wait")
    compute_R = np.median(np.delete(trace.phase_time_s, wait, axis=3).sum(axis=(1, 3)), axis=0) * 1e3
    own_R = np.median(trace.rank_time_s, axis=0) * 1e3
    return {"slowest_rank": int(np.argmax(compute_R)), "compute_ms_max": float(compute_R.max()),
            "compute_ms_min": float(compute_R.min()), "last_rank": int(np.argmax(own_R)),
            "own_ms_max": float(own_R.max()), "own_ms_min": float(own_R.min())}


def load_stats(trace: Trace) -> dict[str, float | None]:
    """rank_load_max_over_mean: max/mean token rows received over ranks, mean over steps and MoE
    layers (1 = balanced); nodes_per_token_mean / _max: nodes a token reached (its own included)."""
    rows = trace.rank_tokens.astype(np.float64)  # [S, M, R]
    with np.errstate(invalid="ignore", divide="ignore"):
        per = rows.max(axis=2) / rows.mean(axis=2)
    nodes = trace.nodes_reached.sum(axis=(0, 2))  # [M, 3] summed over steps and ranks
    tokens = nodes[:, 0].sum()
    return {"rank_load_max_over_mean": float(np.nanmean(per)) if np.isfinite(per).any() else None,
            "nodes_per_token_mean": float(nodes[:, 1].sum() / tokens) if tokens else None,
            "nodes_per_token_max": int(trace.nodes_reached[..., 2].max()) if tokens else None}
