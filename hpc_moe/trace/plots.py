"""Figures of a trace (matplotlib), one function per figure; report.make_report saves them.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing here touches
matplotlib's global backend or figure registry: PNGs render with Agg through ``Figure.savefig``,
and a caller that uses pyplot interactively is not disturbed. Communication phases are drawn in
cool colours (blues, purples), compute in warm ones (reds, oranges, yellows). The figures per rank
read one rank map: of a resumed trace, report.write_plots draws them per segment (on
``trace.segment(k)``).

Shape legend: S steps, L layers, M MoE layers, E experts, R ranks, P phases.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpc_moe.trace.metrics import expert_load_imbalance
from hpc_moe.trace.reader import Trace
from hpc_moe.trace.segments import resume_gaps

_WARM = ("#d95f02", "#e6ab02", "#fdbf6f", "#e31a1c", "#fb9a99", "#a6761d", "#ffff99", "#b15928")
_COOL = ("#1f78b4", "#6a3d9a", "#a6cee3", "#cab2d6", "#0b3c5d", "#80b1d3")


def _figure(width: float, height: float):
    from matplotlib.figure import (
        Figure,  # imported late: the run itself never needs matplotlib
    )
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _plain_log_labels(axis) -> None:
    """Log-axis labels as 600, 2k, 1.5M rather than 6x10^2."""
    from matplotlib.ticker import EngFormatter, FuncFormatter
    eng = EngFormatter(sep="")
    axis.set_major_formatter(eng)
    # Only the 2x and 5x minor ticks: all of them crowd into each other below each decade.
    axis.set_minor_formatter(FuncFormatter(
        lambda v, pos: eng(v) if v > 0 and round(v / 10 ** np.floor(np.log10(v))) in (2, 5) else ""))


def phase_colors(phases: Sequence[str], comm_phases: Sequence[str]) -> dict[str, str]:
    """phase name -> colour: cool family for communication, warm family for compute."""
    comm = [p for p in phases if p in comm_phases]
    comp = [p for p in phases if p not in comm_phases]
    return {**{p: _WARM[i % len(_WARM)] for i, p in enumerate(comp)},
            **{p: _COOL[i % len(_COOL)] for i, p in enumerate(comm)}}


def _phase_label(trace: Trace, phase: str) -> str:
    return f"{phase} (comm)" if phase in trace.comm_phases else phase


def _layer_ticks(ax, num: int, axis: str = "x", labels: Sequence[int] | None = None) -> None:
    """Readable integer ticks for up to a few hundred layers/ranks/experts."""
    every = max(1, int(np.ceil(num / 16)))
    every = next(k for k in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256, every) if k >= every)
    pos = np.arange(0, num, every)
    names = pos if labels is None else np.asarray(labels)[pos]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(pos, [str(n) for n in names])


def plot_phase_breakdown(trace: Trace):
    """Stacked bars: mean ms per layer and phase (mean over steps and ranks), one panel per kind.

    Data: bar heights of panel k, phase p = trace.subset(kind == kinds[k]).phase_time_s
    .mean(axis=(0, 2))[:, p] * 1e3.
    """
    kinds = [k for k in ("prefill", "decode", "mixed") if np.any(trace.kind == k)] or ["all"]
    colors = phase_colors(trace.phases, trace.comm_phases)
    fig = _figure(12, 1.0 + 2.8 * len(kinds))
    axes = fig.subplots(len(kinds), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(trace.num_layers)
    for ax, kind in zip(axes, kinds):
        sub = trace if kind == "all" else trace.subset(trace.kind == kind)
        ms = sub.phase_time_s.mean(axis=(0, 2)) * 1e3 if sub.num_steps else np.zeros((len(x), len(trace.phases)))
        bottom = np.zeros(len(x))
        for p, phase in enumerate(trace.phases):
            ax.bar(x, ms[:, p], 0.8, bottom=bottom, color=colors[phase], label=_phase_label(trace, phase))
            bottom += ms[:, p]
        ax.set_title(f"{kind}: {sub.num_steps} steps, mean step wall "
                     f"{(sub.wall_time_s.mean() * 1e3 if sub.num_steps else 0):.2f} ms", fontsize=10, loc="left")
        ax.set_ylabel("ms per step (rank mean)")
        ax.grid(axis="y", alpha=0.3)
    _layer_ticks(axes[-1], trace.num_layers)
    axes[-1].set_xlabel("layer")
    axes[-1].set_xlim(-0.6, trace.num_layers - 0.4)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside right upper", title="phase", fontsize=9)
    fig.suptitle(f"{trace.name}: time per layer by phase ({trace.num_ranks} ranks)")
    return fig


def timeline_step(trace: Trace) -> int | None:
    """The last sampled step (steady state rather than warm-up), or None without events."""
    return int(trace.events["step"].max()) if len(trace.events) else None


def _zoom_layers(trace: Trace, ev: np.ndarray) -> list[int]:
    """Two consecutive MoE layers from the middle of the step (one if that is all there is)."""
    moe = [int(x) for x in trace.moe_layers if x in set(ev["layer"].tolist())]
    if not moe:
        return []
    mid = moe[len(moe) // 2]
    return [mid, mid + 1] if mid + 1 in moe else [mid]


def _draw_lanes(ax, trace: Trace, ev: np.ndarray, *, gid: bool) -> None:
    """Events as bars: compute in the upper lane of each rank's row, communication in the lower.

    One PolyCollection per phase (not a broken_barh per rank): 256 ranks x 61 layers stay fast.
    """
    from matplotlib.collections import PolyCollection
    colors = phase_colors(trace.phases, trace.comm_phases)
    comm_ids = set(trace.phase_ids(trace.comm_phases))
    for p, phase in enumerate(trace.phases):
        sel = ev[ev["phase"] == p]
        if not len(sel):
            continue
        y0 = sel["rank"] + (0.02 if p in comm_ids else -0.46)
        x0, x1, y1 = sel["t_start_s"] * 1e3, sel["t_end_s"] * 1e3, y0 + 0.44
        verts = np.stack([np.column_stack(c) for c in ((x0, y0), (x0, y1), (x1, y1), (x1, y0))], axis=1)
        ax.add_collection(PolyCollection(verts, facecolors=colors[phase], edgecolors="none",
                                         gid=phase if gid else None))
    for b in np.flatnonzero(np.diff(trace.rank_node)):  # node boundaries
        ax.axhline(b + 0.5, color="black", lw=0.8, ls="--")
    ax.set_xlabel("ms since the rank started the step")
    ax.grid(axis="x", alpha=0.3)


def plot_timeline(trace: Trace, step: int | None = None):
    """Per-rank timeline of one sampled step: each rank row has a compute lane (upper) and a
    communication lane (lower), so compute that hides communication shows as bars on top of each
    other. Left: the whole step; right: two MoE layers from its middle, enlarged.

    Data: on the left axes one PolyCollection per phase (gid = phase name) with one rectangle per
    event of that phase, x from t_start_s * 1e3 to t_end_s * 1e3 ms, y in the lane of its rank.
    Returns None when the trace holds no events.
    """
    step = timeline_step(trace) if step is None else step
    ev = trace.events[trace.events["step"] == step] if step is not None else trace.events[:0]
    if not len(ev):
        return None
    R = trace.num_ranks
    zoom = _zoom_layers(trace, ev)
    fig = _figure(15 if zoom else 12, min(max(4.5, 2.0 + 0.42 * R), 30.0))
    axes = fig.subplots(1, 2 if zoom else 1, sharey=True, squeeze=False)[0]
    for i, ax in enumerate(axes):
        _draw_lanes(ax, trace, ev if i == 0 else ev[np.isin(ev["layer"], zoom)], gid=i == 0)
    axes[0].set_xlim(0, ev["t_end_s"].max() * 1e3 * 1.01)
    axes[0].set_title("whole step", fontsize=10)
    if zoom:
        part = ev[np.isin(ev["layer"], zoom)]
        lo, hi = part["t_start_s"].min() * 1e3, part["t_end_s"].max() * 1e3
        axes[0].axvspan(lo, hi, color="black", alpha=0.25, lw=0, zorder=3)
        axes[1].set_xlim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        for layer in zoom:  # where each layer starts on rank 0
            x0 = part["t_start_s"][(part["layer"] == layer) & (part["rank"] == 0)].min() * 1e3
            axes[1].axvline(x0, color="black", lw=0.6, ls=":")
            axes[1].annotate(f"layer {layer}", (x0, 0), xycoords=("data", "axes fraction"),
                             xytext=(3, 3), textcoords="offset points", fontsize=8)
        axes[1].set_title(f"zoom: layer{'s' if len(zoom) > 1 else ''} {', '.join(map(str, zoom))} "
                          "(shaded on the left)", fontsize=10)
    axes[0].set_ylim(R - 0.5, -0.5)
    _layer_ticks(axes[0], R, axis="y")
    axes[0].set_ylabel("rank")
    from matplotlib.patches import Patch
    colors = phase_colors(trace.phases, trace.comm_phases)
    handles = [Patch(color=colors[p], label=_phase_label(trace, p)) for p in trace.phases]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, title="phase")
    kind = trace.kind[trace.step == step]
    fig.suptitle(f"{trace.name}: timeline of step {step} ({kind[0] if len(kind) else '?'}), "
                 f"{R} ranks on {trace.num_nodes} nodes (dashed: node boundaries)\n"
                 "per rank: compute in the upper lane, communication in the lower lane")
    return fig


def plot_expert_load(trace: Trace):
    """Heatmap MoE layer x expert of routed tokens / layer mean (all steps), plus per-layer
    imbalance (max/mean, mean over steps) as bars on the right.

    Data: image = expert_tokens.sum(0) / expert_tokens.sum(0).mean(1, keepdims=True) [M, E];
    bar widths = expert_load_imbalance(trace).mean(0) [M].
    """
    from matplotlib.colors import TwoSlopeNorm
    counts = trace.expert_tokens.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        load = counts / counts.mean(axis=1, keepdims=True)
        per_layer = np.nanmean(expert_load_imbalance(trace), axis=0) if trace.num_steps else np.full(len(counts), np.nan)
    M, E = load.shape
    fig = _figure(13, min(max(3.5, 2.2 + 0.16 * M), 14.0))
    ax, side = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": (5, 1)})
    vmax = max(2.0, float(np.nanmax(load))) if np.isfinite(load).any() else 2.0
    img = ax.imshow(load, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                    norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax))
    fig.colorbar(img, ax=ax, location="left", pad=0.02, label="tokens / layer mean (1 = balanced)")
    _layer_ticks(ax, E, "x")
    _layer_ticks(ax, M, "y", labels=trace.moe_layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    side.barh(np.arange(M), per_layer, color="#555555", height=0.8)
    side.axvline(1.0, color="black", lw=0.8)
    side.set_xlabel("max/mean per step")
    side.set_title("imbalance", fontsize=10)
    side.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{trace.name}: expert load over {trace.num_steps} steps ({E} experts, {M} MoE layers)")
    return fig


def plot_rank_load(trace: Trace):
    """Token rows each rank received per step (summed over MoE layers, mean over steps), before and
    after the first re-placement when the run re-placed experts; None without loads.

    Data: trace.rank_tokens [S, M, R] summed over M; split at trace.placements["step"].
    """
    per_step = trace.rank_tokens.sum(axis=1).astype(np.float64)  # [S, R]
    if not trace.num_steps or not per_step.any():
        return None
    fig = _figure(10, 4)
    ax = fig.subplots()
    ranks = np.arange(trace.num_ranks)
    series = [("all steps", np.ones(trace.num_steps, bool))]
    if len(trace.placements):
        first = int(trace.placements["step"].min())
        series = [(f"before re-placement (steps < {first})", trace.step < first),
                  (f"after (steps >= {first}, {len(trace.placements)} re-placements)", trace.step >= first)]
    width = 0.8 / len(series)
    for i, (label, keep) in enumerate(series):
        if keep.any():
            load = per_step[keep].mean(axis=0)
            ax.bar(ranks + (i - (len(series) - 1) / 2) * width, load, width,
                   label=f"{label}: max/mean of these means {load.max() / load.mean():.2f}")
    ax.set_xlabel("rank")
    ax.set_ylabel("token rows received per step\n(all MoE layers)")
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{trace.name}: load per rank")
    return fig


def plot_step_throughput(trace: Trace):
    """Input and output tokens/s of every step (log scale), marker per step kind; of a resumed
    trace, a dashed vertical line at the first step of each resume, labelled with its ranks and
    nodes and the time lost before it.

    Data: one line per (direction, kind) with x = step, y = tokens / wall_time_s (zero-token
    points left out); per resume here one axvline at its first step (label "resumed on R ranks /
    N nodes after X s", hpc_moe.trace.segments.resume_gaps' lost_s).
    """
    fig = _figure(10, 4.2)
    ax = fig.subplots()
    markers = {"prefill": "o", "decode": "s", "mixed": "^"}
    for direction, tokens, color in (("input", trace.input_tokens, "#d95f02"),
                                     ("output", trace.output_tokens, "#1f78b4")):
        for kind, marker in markers.items():
            keep = (trace.kind == kind) & (tokens > 0)
            if keep.any():
                ax.plot(trace.step[keep], tokens[keep] / trace.wall_time_s[keep], marker, color=color,
                        ms=4, ls="none", label=f"{direction} tok/s, {kind}")
    for seg, gap in zip(trace.segments[1:], resume_gaps(trace)):
        if seg.holds(trace.step).any():
            lost = "an unknown time" if gap["lost_s"] is None else f"{gap['lost_s']:.1f} s"
            ax.axvline(seg.first_step, color="black", lw=0.9, ls="--",
                       label=f"resumed on {seg.num_ranks} ranks / {seg.num_nodes} nodes after {lost}")
    ax.set_yscale("log")
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s (whole job)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ranks = " then ".join(str(seg.num_ranks) for seg in trace.segments)  # one number unless resumed
    fig.suptitle(f"{trace.name}: throughput per step ({ranks} ranks)")
    return fig


def plot_traffic(trace: Trace):
    """Heatmap of mean expert-parallel bytes per step sent[src, dst] in MB, node boundaries drawn.

    Data: image = bytes_sent.mean(axis=0) / 1e6 [R, R] with the diagonal (self-sends) NaN.
    """
    mb = trace.bytes_sent.mean(axis=0) / 1e6 if trace.num_steps else np.zeros((trace.num_ranks,) * 2)
    off = ~np.eye(trace.num_ranks, dtype=bool)
    fig = _figure(7.5, 6.5)
    ax = fig.subplots()
    # Self-sends are local copies, not network traffic: left blank.
    img = ax.imshow(np.where(off, mb, np.nan), cmap="viridis", interpolation="nearest")
    fig.colorbar(img, ax=ax, label="MB per step")
    for b in np.flatnonzero(np.diff(trace.rank_node)):
        ax.axhline(b + 0.5, color="white", lw=0.8)
        ax.axvline(b + 0.5, color="white", lw=0.8)
    _layer_ticks(ax, trace.num_ranks, "x")
    _layer_ticks(ax, trace.num_ranks, "y")
    ax.set_xlabel("destination rank")
    ax.set_ylabel("source rank")
    same = trace.rank_node[:, None] == trace.rank_node[None, :]
    total = mb[off].sum()
    inter = mb[off & ~same].sum() / total * 100 if total else 0.0
    fig.suptitle(f"{trace.name}: all-to-all traffic per step\n"
                 f"{total:,.1f} MB off-rank, {inter:.0f}% between nodes ({trace.num_nodes} nodes)", fontsize=11)
    return fig


def plot_scaling(points: Sequence[dict]):
    """Throughput vs ranks (log-log, linear ideal dashed) and efficiency vs ranks (ideal 100 %).

    points: report.scaling_points() rows (ranks, input_tok_s, output_tok_s, input_eff, output_eff);
    line data are exactly those numbers (efficiency in %).
    """
    fig = _figure(12, 4.6)
    ax_t, ax_e = fig.subplots(1, 2)
    ranks = np.array([p["ranks"] for p in points], float)
    for direction, color in (("input", "#d95f02"), ("output", "#1f78b4")):
        tps = np.array([p[f"{direction}_tok_s"] for p in points], float)
        if not np.any(tps > 0):
            continue
        ax_t.plot(ranks, tps, "o-", color=color, label=f"{direction} tok/s")
        ax_t.plot(ranks, tps[0] * ranks / ranks[0], "--", color=color, alpha=0.6, label=f"{direction}, linear ideal")
        eff = np.array([p[f"{direction}_eff"] for p in points], float) * 100
        ax_e.plot(ranks, eff, "o-", color=color, label=direction)
        for x, y in zip(ranks, eff):
            ax_e.annotate(f"{y:.0f}%", (x, y), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=8)
    ax_e.axhline(100, color="black", ls="--", lw=0.8, label="linear ideal")
    for ax in (ax_t, ax_e):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(int(r)) for r in ranks])
        ax.set_xlabel("ranks (GPUs)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    ax_t.set_yscale("log")
    _plain_log_labels(ax_t.yaxis)
    ax_t.set_ylabel("tokens/s (whole job)")
    ax_t.set_title("throughput", fontsize=10)
    ax_e.set_ylabel("efficiency, % of linear from the smallest run")
    effs = [p[f"{d}_eff"] * 100 for p in points for d in ("input", "output")]
    ax_e.set_ylim(0, max(110.0, np.nanmax(effs + [0.0]) + 10))
    ax_e.set_title("scaling efficiency", fontsize=10)
    fig.suptitle(f"scaling over {len(points)} runs")
    return fig


def plot_stragglers(trace: Trace):
    """Per rank, its blocked time a sampled step split into skew (waiting for the last peer to
    arrive) and transfer (after it did), with how often it arrived last; the stragglers named in
    the title. None without exchange records.

    Data: hpc_moe.trace.stragglers.straggler_stats(trace).
    """
    from hpc_moe.trace.stragglers import straggler_stats
    s = straggler_stats(trace)
    if s is None:
        return None
    fig = _figure(10, 4)
    ax = fig.subplots()
    ranks = np.arange(len(s["skew_ms"]))  # a resumed trace's: its last sampled segment's (straggler_stats)
    ax.bar(ranks, s["skew_ms"], label="skew: blocked until the last peer arrived", color="#d62728")
    ax.bar(ranks, s["transfer_ms"], bottom=s["skew_ms"], label="transfer: blocked after", color="#1f77b4")
    for r in ranks:
        ax.annotate(f"last {100 * s['last_share'][r]:.0f}%", (r, s["skew_ms"][r] + s["transfer_ms"][r]),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("rank")
    ax.set_ylabel("blocked in exchanges, ms a step")
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    named = ", ".join(f"rank {g['rank']} ({g['busy_phase']})" for g in s["stragglers"]) or "none"
    fig.suptitle(f"{trace.name}: who the exchanges waited for (stragglers: {named})")
    return fig
