"""Summary tables and PNG plots of throughput traces: ``hpc-moe report TRACE.h5 [MORE.h5 ...]``.

``summary_stats`` computes the numbers, ``summary_table`` / ``scaling_table`` format them, and
``make_report`` writes the figures of hpc_moe.trace.plots. Throughput is tokens over the summed step wall
time of the whole job; "per rank" divides it by the ranks, "per GPU" by the ranks that drive a
GPU, "per node" by the distinct hosts. A resumed trace (hpc_moe.trace.resumed) reads as one run:
its throughput counts every step once, per rank over each segment's rank-seconds, and the figures
that depend on the rank map come per segment.

Shape legend: S steps, L layers, M MoE layers, E experts, R ranks, P phases.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpc_moe.flags import flag
from hpc_moe.outputs import OutputError, check_output
from hpc_moe.trace.metrics import comm_stats, exchange_overlap, expert_load_imbalance, load_stats, rank_stats
from hpc_moe.trace.reader import KINDS, Trace, TraceError, read_trace
from hpc_moe.trace.resumed import last_view, rank_counts, segment_title, segment_views, segments_json, segments_lines
from hpc_moe.trace.stragglers import straggler_stats, straggler_table
from hpc_moe.trace.text import fmt_bytes, fmt_num, text_table


def _groups(trace: Trace) -> list[tuple[str, np.ndarray]]:
    """(name, step mask [S]) for each step kind present, plus "all" when there are several."""
    groups = [(k, trace.kind == k) for k in KINDS if np.any(trace.kind == k)]
    return groups + [("all", np.ones(trace.num_steps, bool))] if len(groups) > 1 else groups


def throughput_rows(trace: Trace) -> list[dict[str, Any]]:
    """One dict per (step kind, direction) with tokens > 0: tokens, wall_s, tok_s and tok_s per
    rank / GPU (NaN on a CPU run) / node (of a resumed trace: per rank-second, resumed.rank_counts)."""
    rows = []
    for kind, mask in _groups(trace):
        wall = float(trace.wall_time_s[mask].sum())
        ranks, gpus, nodes = rank_counts(trace, mask)
        for direction, tokens in (("input", trace.input_tokens), ("output", trace.output_tokens)):
            n = int(tokens[mask].sum())
            if n:
                tps = n / wall
                rows.append({"kind": kind, "direction": direction, "steps": int(mask.sum()),
                             "wall_s": wall, "tokens": n, "tok_s": tps, "per_rank": tps / ranks,
                             "per_gpu": tps / gpus if gpus else float("nan"), "per_node": tps / nodes})
    return rows


def summary_stats(trace: Trace) -> dict[str, Any]:
    """The numbers behind summary_table.

    throughput: throughput_rows(); layer_ms: float64 [L, P] mean ms over all steps and ranks;
    step_ms: {kind: float64 [P]} ms per step summed over layers (mean over steps and ranks);
    wall_ms: {kind: mean step wall ms}; comm: comm_stats(); imbalance: float64 [M] per MoE layer
    max/mean tokens per expert, mean over steps.
    """
    step_ms, wall_ms = {}, {}
    for kind, mask in _groups(trace):
        step_ms[kind] = trace.phase_time_s[mask].sum(axis=1).mean(axis=(0, 1)) * 1e3
        wall_ms[kind] = float(trace.wall_time_s[mask].mean() * 1e3)
    imbalance = expert_load_imbalance(trace)
    with np.errstate(invalid="ignore"):
        per_layer = np.nanmean(imbalance, axis=0) if trace.num_steps else np.full(imbalance.shape[1], np.nan)
    return {"throughput": throughput_rows(trace), "layer_ms": trace.phase_time_s.mean(axis=(0, 2)) * 1e3,
            "step_ms": step_ms, "wall_ms": wall_ms, "comm": comm_stats(trace), "imbalance": per_layer}


def _header(trace: Trace) -> list[str]:
    m = trace.meta
    gpus = ", ".join(m.get("device_names", [])) if trace.num_gpus else "no GPUs"
    state = {"completed": "completed", "failed": "FAILED (closed after an error)",
             "stopped": "stopped early by a signal (the steps written are complete)",
             "running": "still running, or killed (valid up to the last flushed step)"}[trace.state]
    slurm = f", Slurm job {m['slurm_job_id']}" if m.get("slurm_job_id") else ""
    ranks = (" then ".join(f"{s.num_ranks} ranks on {s.num_nodes} nodes" for s in trace.segments) + f" ({gpus})"
             if trace.resumed else f"{trace.num_ranks} ranks on {trace.num_nodes} nodes, {trace.num_gpus} GPUs ({gpus})")
    return [f"== {trace.name} ({trace.path}) ==",
            f"{trace.num_steps} steps, {state}",
            (f"{ranks}; "
             f"backend {m.get('array_backend')}, transport {m.get('transport')}, CUDA-aware MPI {m.get('cuda_aware')}"),
            (f"{trace.num_layers} layers ({len(trace.moe_layers)} MoE{', truncated' if m.get('truncated') else ''}), "
             f"{trace.num_experts} experts; hpc_moe {m.get('software_version')} (git {str(m.get('git_commit'))[:12]}), "
             f"created {m.get('created')}{slurm}")]


def summary_table(trace: Trace) -> str:
    """Text summary of one trace: throughput, time per layer split into phases, communication,
    expert load imbalance. Scaling over several traces is scaling_table's. A resumed trace: its
    segments and the time lost at each resume first, the rank-dependent sections per segment."""
    out = _header(trace)
    if not trace.num_steps:
        return "\n".join(out + ["(no steps recorded)"])
    st = summary_stats(trace)
    out += segments_lines(trace)
    per = "; per rank, GPU and node: over each segment's rank-seconds" if trace.resumed else ""
    out += ["", f"Throughput (tokens/s, whole job; one GPU per rank{per})", text_table(
        ["kind", "steps", "wall s", "tokens", "tok/s", "per rank", "per GPU", "per node"],
        [[f"{r['kind']} {r['direction']}", r["steps"], f"{r['wall_s']:.3f}", f"{r['tokens']:,}",
          fmt_num(r["tok_s"]), fmt_num(r["per_rank"]), fmt_num(r["per_gpu"]), fmt_num(r["per_node"])]
         for r in st["throughput"]])]
    for seg, view in segment_views(trace):
        out += ["", segment_title(seg, view)] if trace.resumed else []
        out += _rank_sections(view, summary_stats(view) if trace.resumed else st)
    imb = st["imbalance"]
    if imb.size and np.isfinite(imb).any():
        worst = int(np.nanargmax(imb))
        out += ["", "Expert load imbalance (max/mean tokens per expert, mean over steps; 1.00 = balanced)",
                (f"  mean over MoE layers {np.nanmean(imb):.2f}, worst layer {trace.moe_layers[worst]}: "
                 f"{imb[worst]:.2f}, best {np.nanmin(imb):.2f}")]
    return "\n".join(out)


def _rank_sections(trace: Trace, st: dict[str, Any]) -> list[str]:
    """The sections of summary_table that depend on the rank map (of a trace of one segment; st:
    its summary_stats): phases, ranks, layers, communication, exchanges, stragglers, loads,
    re-placements."""
    phases = list(trace.phases)
    out = ["", "Time per step by phase (ms, summed over layers, mean over steps and ranks; wall - sum: outside "
            "the layers, embedding, head, sampling and the step's barriers)", text_table(
        ["kind", *phases, "sum", "wall"],
        [[kind, *(f"{v:.3f}" for v in ms), f"{ms.sum():.3f}", f"{st['wall_ms'][kind]:.3f}"]
         for kind, ms in st["step_ms"].items()])]
    rk = rank_stats(trace)
    out += ["", "Ranks (medians over steps)",
            (f"  computing (phases less waiting in exchanges): slowest rank {rk['slowest_rank']} on "
             f"{trace.rank_host[rk['slowest_rank']]} {rk['compute_ms_max']:.3f} ms, fastest {rk['compute_ms_min']:.3f} ms"),
            (f"  own step time (to the end of its work): longest rank {rk['last_rank']} {rk['own_ms_max']:.3f} ms, "
             f"shortest {rk['own_ms_min']:.3f} ms" if rk["own_ms_max"] else "  own step time: not recorded (an older trace)")]
    moe, ms = set(trace.moe_layers.tolist()), st["layer_ms"]
    rows = [[layer, "moe" if layer in moe else "dense", *(f"{v:.3f}" for v in ms[layer]), f"{ms[layer].sum():.3f}"]
            for layer in range(trace.num_layers)]
    out += ["", f"Time per layer (ms, mean over all {trace.num_steps} steps and {trace.num_ranks} ranks)",
            text_table(["layer", "type", *phases, "total"], rows)]
    c = st["comm"]
    inter = c["inter_node_bytes_per_step"] / c["bytes_per_step"] * 100 if c["bytes_per_step"] else 0.0
    out += ["", "Communication (expert-parallel all-to-all, off-rank bytes)",
            f"  per step: {fmt_bytes(c['bytes_per_step'])} ({inter:.1f}% between nodes)",
            (f"  achieved bandwidth per rank, bytes / (dispatch + combine + wait) time: min {fmt_num(c['bw_min'] / 1e9, 3)}, "
             f"mean {fmt_num(c['bw_mean'] / 1e9, 3)}, max {fmt_num(c['bw_max'] / 1e9, 3)} GB/s")]
    if len(trace.moe_layers):
        out += ["", overlap_table([trace])]
    stragglers = straggler_table(trace)
    if stragglers:
        out += ["", stragglers]
    loads = load_stats(trace)
    if loads["rank_load_max_over_mean"] is not None:
        out += ["", "Load per rank and nodes per token (token rows received; a token counts once per rank)",
                f"  rank load max/mean {loads['rank_load_max_over_mean']:.2f} (each step's and MoE layer's, then their mean; "
                "1.00 = balanced)" + _modelled(trace),
                f"  nodes a token reached: mean {loads['nodes_per_token_mean']:.2f}, max {loads['nodes_per_token_max']} "
                f"of {trace.num_nodes}"]
    return out + _replacement_table(trace)


def summary_json(trace: Trace) -> dict[str, Any]:
    """The summary as JSON-able numbers (``hpc-moe run --summary-json``; keys in docs/trace-format.md).
    Of a resumed trace, the figures that depend on the rank map (ranks, nodes, phases, bytes,
    exchanges, loads, ranks named) are its last segment's with steps; throughput, step times and
    the expert load are over all steps."""
    last = last_view(trace)
    st = summary_stats(trace)
    wall = float(trace.wall_time_s.sum())
    ov = exchange_overlap(last)
    imb = st["imbalance"]
    c = st["comm"] if last is trace else comm_stats(last)
    per_step = last.phase_time_s.sum(axis=1).mean(axis=(0, 1)) * 1e3 if last.num_steps else np.zeros(len(last.phases))

    def num(x) -> float | None:
        return float(x) if np.isfinite(x) else None

    return {
        "steps": trace.num_steps, "ranks": last.num_ranks, "nodes": last.num_nodes, "state": trace.state,
        "input_tokens_per_s": num(trace.input_tokens.sum() / wall) if wall else None,
        "output_tokens_per_s": num(trace.output_tokens.sum() / wall) if wall else None,
        "step_ms_median": num(np.median(trace.wall_time_s) * 1e3) if trace.num_steps else None,
        "phase_ms_per_step": {p: float(v) for p, v in zip(trace.phases, per_step)},
        "offrank_bytes_per_step": num(c["bytes_per_step"]),
        "intranode_bytes_per_step": num(c["intra_node_bytes_per_step"]),
        "internode_bytes_per_step": num(c["inter_node_bytes_per_step"]),
        "exchange_in_flight_ms_per_step": ov["total_in_flight"],
        "exchange_exposed_ms_per_step": ov["total_blocked"],
        "exchange_hidden_fraction": num(ov["total_hidden"]),
        "expert_load_imbalance": num(np.nanmean(imb)) if imb.size and np.isfinite(imb).any() else None,
        **load_stats(last),
        **(rank_stats(last) if last.num_steps else {}),
        "stragglers": [g["rank"] for g in (straggler_stats(last) or {"stragglers": []})["stragglers"]],
        **segments_json(trace),
    }


def _modelled(trace: Trace) -> str:
    """What the placement expected of the rank load (the run's extra['placement']), or nothing."""
    model = (trace.meta.get("extra") or {}).get("placement") or {}
    if not model.get("modelled_rank_load"):
        return ""
    return (f"; the {model['policy']} placement expected {np.mean(model['modelled_rank_load']):.2f} "
            "(mean over MoE layers, from the loads it was placed by)")


def replacement_rows(trace: Trace) -> list[dict[str, Any]]:
    """Each re-placement (--replan-every): the step it took effect from, the experts and bytes
    that moved, the seconds their transfers took (fetch), spent posting them before the step they
    ran under and waiting after it (outside every step's wall time), and that step's wall ms
    against the median of the steps before it on the same placement (None where not in the trace,
    or where an older trace loaded the experts between steps: fetch time 0)."""
    rows, prev = [], int(trace.step.min()) if trace.num_steps else 0
    for p in trace.placements:
        ran = trace.wall_time_s[(trace.step == p["step"] - 1) & (p["fetch_time_s"] > 0)]
        before = trace.wall_time_s[(trace.step >= prev) & (trace.step < p["step"] - 1)]
        rows.append({"step": int(p["step"]), "experts": int(p["experts_moved"]), "bytes": int(p["bytes_moved"]),
                     "fetch_ms": 1e3 * p["fetch_time_s"], "post_ms": 1e3 * p["post_time_s"],
                     "wait_ms": 1e3 * p["wait_time_s"], "step_ms": 1e3 * ran[0] if len(ran) else None,
                     "before_ms": 1e3 * float(np.median(before)) if len(before) else None})
        prev = int(p["step"])
    return rows


def _replacement_table(trace: Trace) -> list[str]:
    rows = replacement_rows(trace)
    if not rows:
        return []
    return ["", "Re-placements (the moved experts travel during the step before the one they serve; post and wait: "
            "outside every step)", text_table(
                ["from step", "experts moved", "bytes", "fetch ms", "post ms", "wait ms", "that step ms",
                 "median before ms", "ratio"],
                [[r["step"], r["experts"], fmt_bytes(r["bytes"]), f"{r['fetch_ms']:.1f}", f"{r['post_ms']:.1f}",
                  f"{r['wait_ms']:.1f}", "-" if r["step_ms"] is None else f"{r['step_ms']:.1f}",
                  "-" if r["before_ms"] is None else f"{r['before_ms']:.1f}",
                  f"{r['step_ms'] / r['before_ms']:.2f}x" if r["step_ms"] and r["before_ms"] else "-"] for r in rows])]


def overlap_table(traces: Sequence[Trace]) -> str:
    """Per MoE layer and in total: exposed (blocked) all-to-all ms per step and the share of the
    in-flight time that ran under compute, one column pair per trace (e.g. --overlap off and on)."""
    stats = [exchange_overlap(t) for t in traces]
    layers = traces[0].moe_layers
    header = ["layer"]
    for t in traces:
        tag = f" ({t.name})" if len(traces) > 1 else ""
        header += [f"in flight ms{tag}", f"exposed ms{tag}", f"hidden %{tag}"]
    rows = []
    for i, layer in enumerate(layers):
        row = [int(layer)]
        for s in stats:
            ok = i < len(s["in_flight"])
            row += [f"{s['in_flight'][i]:.3f}", f"{s['blocked'][i]:.3f}", fmt_num(s["hidden"][i] * 100, 1)] if ok else ["-"] * 3
        rows.append(row)
    rows.append(["total", *(v for s in stats for v in (f"{s['total_in_flight']:.3f}", f"{s['total_blocked']:.3f}",
                                                        fmt_num(s["total_hidden"] * 100, 1)))])
    return "\n".join(["Exchanges (all-to-all per step, mean over steps and ranks; exposed = the rank was blocked, "
                      "hidden = in flight under compute)", text_table(header, rows)])


def scaling_points(traces: Sequence[Trace]) -> list[dict[str, Any]]:
    """One dict per trace, sorted by ranks: input/output tok/s over all steps and efficiency =
    (tok/s per rank) / (that of the smallest run); NaN where either run has no such tokens."""
    pts = []
    for t in sorted(traces, key=lambda t: t.num_ranks):
        wall = float(t.wall_time_s.sum()) or float("nan")
        pts.append({"name": t.name, "ranks": t.num_ranks, "nodes": t.num_nodes, "steps": t.num_steps,
                    "input_tok_s": t.input_tokens.sum() / wall, "output_tok_s": t.output_tokens.sum() / wall})
    for p in pts:
        for d in ("input", "output"):
            base = pts[0][f"{d}_tok_s"] / pts[0]["ranks"]
            ok = base > 0 and p[f"{d}_tok_s"] > 0  # a run without such tokens has no efficiency
            p[f"{d}_eff"] = p[f"{d}_tok_s"] / p["ranks"] / base if ok else float("nan")
    return pts


def scaling_table(traces: Sequence[Trace]) -> str:
    """Throughput and scaling efficiency per trace, by rank count (efficiency 100% = linear)."""
    pts = scaling_points(traces)
    rows = [[p["name"], p["ranks"], p["nodes"], p["steps"], fmt_num(p["input_tok_s"]),
             fmt_num(p["input_tok_s"] / p["ranks"]), fmt_num(p["input_eff"] * 100, 1), fmt_num(p["output_tok_s"]),
             fmt_num(p["output_tok_s"] / p["ranks"]), fmt_num(p["output_eff"] * 100, 1)] for p in pts]
    return "\n".join([f"Scaling (efficiency = tok/s per rank relative to the {pts[0]['ranks']}-rank run)",
                      text_table(["trace", "ranks", "nodes", "steps", "input tok/s", "per rank", "eff %",
                              "output tok/s", "per rank", "eff %"], rows)])


def _unique_stems(traces: Sequence[Trace]) -> list[str]:
    stems = [t.name for t in traces]
    return stems if len(set(stems)) == len(stems) else [f"{i}_{s}" for i, s in enumerate(stems)]


def write_plots(traces: Sequence[Trace], out_dir: str | os.PathLike, *, step: int | None = None) -> list[str]:
    """Save the figures of each trace (and the scaling figure when rank counts differ) as PNGs.
    Of a resumed trace, those drawn per rank come once per segment (<stem>_segment<k>_<figure>)."""
    import hpc_moe.trace.plots as plots
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise TraceError(f"cannot create report directory {out_dir}: {e.strerror}") from None
    written = []

    def save(fig, name: str) -> None:
        if fig is not None:
            path = os.path.join(out_dir, name)
            try:
                fig.savefig(path)
            except OSError as e:
                raise TraceError(f"cannot write {path}: {e.strerror}") from None
            written.append(path)

    for trace, stem in zip(traces, _unique_stems(traces)):
        if not trace.num_steps:
            continue
        views = [(view, f"{stem}_segment{seg.index}" if trace.resumed else stem) for seg, view in segment_views(trace)]
        figures = (("phases", plots.plot_phase_breakdown, True), ("timeline", lambda t: plots.plot_timeline(t, step), True),
                   ("expert_load", plots.plot_expert_load, False), ("rank_load", plots.plot_rank_load, True),
                   ("steps", plots.plot_step_throughput, False), ("traffic", plots.plot_traffic, True),
                   ("stragglers", plots.plot_stragglers, True))
        for name, plot, per_rank in figures:
            for view, tag in views if per_rank else [(trace, stem)]:
                save(plot(view), f"{tag}_{name}.png")
    if len({t.num_ranks for t in traces if t.num_steps}) > 1:
        save(plots.plot_scaling(scaling_points([t for t in traces if t.num_steps])), "scaling.png")
    return written


def make_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, skip_steps: int = 0,
                step: int | None = None) -> list[str]:
    """Read traces, drop ``skip_steps`` warm-up steps of each and write the PNGs into ``out_dir``.

    Returns the written paths: per trace <stem>_phases, _timeline (when it has events),
    _expert_load, _rank_load (when it has per-rank loads), _steps, _traffic (a resumed trace's per
    rank figures once per segment: write_plots); scaling.png when the traces have different rank
    counts.
    """
    traces = [read_trace(p).subset(slice(skip_steps, None)) for p in paths]
    return write_plots(traces, out_dir, step=step)


@dataclass(frozen=True)
class ReportOptions:
    """``hpc-moe report``: traces (several: a scaling series), where the plots go, what to print."""

    traces: tuple[str, ...] = flag(positional=True, nargs="+", metavar="TRACE.h5",
                                   help="trace files (several: a scaling series)")
    out: str | None = flag(None, metavar="DIR",
                           help="directory for the PNG plots (default: report/ next to the first trace)")
    skip_steps: int = flag(0, metavar="N",
                           help="leave out the first N measured steps of each trace (warm-up steps are never written)")
    step: int | None = flag(None, type=int, help="step for the timeline plot (default: the last sampled; run records "
                            "timelines every --events-every measured steps, 10 by default)")
    no_plots: bool = flag(False, help="print the tables only")
    no_tables: bool = flag(False, help="write the plots only (the run printed its summary)")


def run_report(o: ReportOptions) -> int:
    """Print summary tables (and the scaling table for several traces), write plots; 0 on success,
    2 with a one-line error for a missing, corrupt or unwritable file."""
    try:
        if o.skip_steps < 0:
            raise TraceError(f"--skip-steps must be >= 0, got {o.skip_steps}")
        out = o.out or os.path.join(os.path.dirname(os.path.abspath(o.traces[0])), "report")
        if not o.no_plots:
            check_output(os.path.join(out, "plot.png"), "--out")
        traces = [read_trace(p).subset(slice(o.skip_steps, None)) for p in o.traces]
        tables = [] if o.no_tables else [summary_table(t) for t in traces]
        if len({t.num_ranks for t in traces}) > 1 and not o.no_tables:  # a scaling series
            tables.append(scaling_table(traces))
        if len(traces) > 1 and len({t.num_layers for t in traces}) == 1 and len(traces[0].moe_layers) \
                and not o.no_tables:
            tables.append(overlap_table([last_view(t) for t in traces]))  # a resumed one: its last ranks
        for text in tables:
            print(text, end="\n\n")
        if not o.no_plots:
            for path in write_plots(traces, out, step=o.step):
                print(f"wrote {path}")
    except (TraceError, OutputError) as e:
        print(f"hpc-moe report: error: {e}", file=sys.stderr)
        return 2
    return 0
