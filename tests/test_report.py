"""Report: summary numbers equal hand-computed ones on synthetic traces, plots carry the right
data (checked on the figure's artists, not pixels) and render to non-blank PNGs, CLI exit codes."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from test_trace import (
    Dims,
    feed,
    layout,
    meta,
    open_writer,
    synthetic_step,
    write_synthetic,
)

import hpc_moe.trace.plots as plots
from hpc_moe.flags import add_flags, from_args
from hpc_moe.trace.reader import read_trace
from hpc_moe.trace.report import (
    ReportOptions,
    make_report,
    run_report,
    scaling_points,
    scaling_table,
    summary_stats,
    summary_table,
)
from hpc_moe.trace.writer import MemoryTrace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(path, trace, appended step dicts) of the default 6-step, 4-rank, 2-node synthetic trace."""
    path = tmp_path_factory.mktemp("trace") / "synth.h5"
    steps = write_synthetic(path)
    return path, read_trace(path), steps


def _stack(steps, name):
    return np.stack([s[name] for s in steps])


def test_summary_numbers_match_hand_computation(synthetic):
    _, tr, steps = synthetic
    st = summary_stats(tr)
    wall, tin = _stack(steps, "wall_time_s"), _stack(steps, "input_tokens")
    prefill = np.array([s["kind"] == "prefill" for s in steps])
    row = next(r for r in st["throughput"] if (r["kind"], r["direction"]) == ("prefill", "input"))
    assert row["tok_s"] == pytest.approx(tin[prefill].sum() / wall[prefill].sum())
    assert row["per_rank"] == pytest.approx(row["tok_s"] / 4) and row["per_gpu"] == pytest.approx(row["tok_s"] / 4)
    assert row["per_node"] == pytest.approx(row["tok_s"] / 2)
    out_all = next(r for r in st["throughput"] if (r["kind"], r["direction"]) == ("all", "output"))
    assert out_all["tok_s"] == pytest.approx(_stack(steps, "output_tokens").sum() / wall.sum())
    assert not any(r["direction"] == "input" and r["kind"] == "decode" for r in st["throughput"])
    t = _stack(steps, "phase_time_s")
    np.testing.assert_allclose(st["layer_ms"], t.mean(axis=(0, 2)) * 1e3)
    decode = np.array([s["kind"] == "decode" for s in steps])
    np.testing.assert_allclose(st["step_ms"]["decode"], t[decode].sum(axis=1).mean(axis=(0, 1)) * 1e3)
    assert st["wall_ms"]["decode"] == pytest.approx(wall[decode].mean() * 1e3)
    b = _stack(steps, "bytes_sent")
    intra = sum(b[:, i, j].sum() for i in range(4) for j in range(4) if i != j and i // 2 == j // 2)
    inter = sum(b[:, i, j].sum() for i in range(4) for j in range(4) if i // 2 != j // 2)
    assert st["comm"]["intra_node_bytes_per_step"] == pytest.approx(intra / 6)
    assert st["comm"]["inter_node_bytes_per_step"] == pytest.approx(inter / 6)
    assert st["comm"]["bytes_per_step"] == pytest.approx((intra + inter) / 6)
    comm = tr.phase_ids(["dispatch", "combine", "wait"])
    bw = [(b[:, r].sum() - b[:, r, r].sum()) / t[:, :, r][..., comm].sum() for r in range(4)]
    assert st["comm"]["bw_min"] == pytest.approx(min(bw)) and st["comm"]["bw_max"] == pytest.approx(max(bw))
    counts = _stack(steps, "expert_tokens")
    np.testing.assert_allclose(st["imbalance"], (counts.max(axis=2) / counts.mean(axis=2)).mean(axis=0))


def test_summary_table_text(synthetic):
    _, tr, steps = synthetic
    text = summary_table(tr)
    tps = _stack(steps, "input_tokens").sum() / _stack(steps, "wall_time_s").sum()
    assert f"{tps:,.0f}" in text and f"{tps / 4:,.0f}" in text
    for needle in ("Throughput", "Time per layer", "Time per step by phase", "dispatch", "wait",
                   "Communication", "GB/s", "Expert load imbalance", "4 ranks on 2 nodes", "completed"):
        assert needle in text, needle
    layer_rows = [ln for ln in text.splitlines() if ln.split()[:2] in (["0", "dense"], ["3", "moe"])]
    assert len(layer_rows) == 2


def test_summary_table_of_memory_trace(synthetic):
    """``hpc-moe run --trace none`` prints its summary from a MemoryTrace: the same text as from
    the file written with the same calls, but for the name/path line and the creation time."""
    _, tr, steps = synthetic
    with MemoryTrace(meta(), **layout(Dims())) as mem:
        feed(mem, Dims(), steps)
    got = summary_table(mem.trace()).splitlines()
    want = summary_table(tr).replace(tr.meta["created"], mem.trace().meta["created"]).splitlines()
    assert got[0] == "== <memory> (<memory>) ==" and got[1:] == want[1:]
    assert "Throughput" in got[5] and "completed" in got[1]


def test_scaling_efficiency(tmp_path):
    traces = []
    for ranks in (2, 4, 8):
        write_synthetic(tmp_path / f"ep{ranks}.h5", Dims(num_ranks=ranks, ranks_per_node=2), num_steps=4)
        traces.append(read_trace(tmp_path / f"ep{ranks}.h5"))
    pts = scaling_points(traces[::-1])
    assert [p["ranks"] for p in pts] == [2, 4, 8]
    tput = [t.output_tokens.sum() / t.wall_time_s.sum() for t in traces]
    for p, tp, r in zip(pts, tput, (2, 4, 8)):
        assert p["output_tok_s"] == pytest.approx(tp)
        assert p["output_eff"] == pytest.approx((tp / r) / (tput[0] / 2))
    text = scaling_table(traces)
    assert f"{pts[2]['output_eff'] * 100:.1f}" in text and "100.0" in text
    fig = plots.plot_scaling(pts)
    eff_line = next(ln for ln in fig.axes[1].lines if ln.get_label() == "output")
    np.testing.assert_allclose(eff_line.get_ydata(), [p["output_eff"] * 100 for p in pts])
    ideal = next(ln for ln in fig.axes[0].lines if ln.get_label() == "output, linear ideal")
    np.testing.assert_allclose(ideal.get_ydata(), tput[0] * np.array([1, 2, 4]))


def test_phase_breakdown_data(synthetic):
    _, tr, steps = synthetic
    fig = plots.plot_phase_breakdown(tr)
    t = _stack(steps, "phase_time_s")
    kinds = [s["kind"] for s in steps]
    for ax, kind in zip(fig.axes, ("prefill", "decode", "mixed")):
        mask = np.array([k == kind for k in kinds])
        heights = np.array([[bar.get_height() for bar in cont] for cont in ax.containers]).T  # [L, P]
        np.testing.assert_allclose(heights, t[mask].mean(axis=(0, 2)) * 1e3)


def test_timeline_data(synthetic):
    _, tr, _ = synthetic
    fig = plots.plot_timeline(tr)  # default: the last sampled step
    ev = tr.events[tr.events["step"] == 5]
    colls = {c.get_gid(): c for c in fig.axes[0].collections if c.get_gid()}
    assert set(colls) == set(tr.phases)
    for p, phase in enumerate(tr.phases):
        sel = ev[ev["phase"] == p]
        x = np.array([(v[:, 0].min(), v[:, 0].max()) for v in (path.vertices for path in colls[phase].get_paths())])
        np.testing.assert_allclose(np.sort(x, axis=0), np.sort(np.column_stack([sel["t_start_s"], sel["t_end_s"]]) * 1e3, axis=0))
        y = np.array([np.ptp(v[:, 1]) / 2 + v[:, 1].min() for v in (q.vertices for q in colls[phase].get_paths())])
        lane = 0.24 if phase in tr.comm_phases else -0.24  # comm below the rank's centre line
        np.testing.assert_allclose(np.sort(y), np.sort(sel["rank"] + lane))
    assert plots.plot_timeline(tr.subset(tr.kind == "prefill")) is None  # no events there


def test_expert_load_and_traffic_data(synthetic):
    _, tr, steps = synthetic
    counts = _stack(steps, "expert_tokens")
    fig = plots.plot_expert_load(tr)
    tot = counts.sum(axis=0)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), tot / tot.mean(axis=1, keepdims=True))
    widths = [bar.get_width() for bar in fig.axes[1].patches]
    np.testing.assert_allclose(widths, (counts.max(axis=2) / counts.mean(axis=2)).mean(axis=0))
    img = plots.plot_traffic(tr).axes[0].images[0].get_array()
    want = _stack(steps, "bytes_sent").mean(axis=0) / 1e6
    np.fill_diagonal(want, np.nan)
    np.testing.assert_allclose(np.ma.filled(img, np.nan), want)
    lines = plots.plot_step_throughput(tr).axes[0].lines
    pre = next(ln for ln in lines if ln.get_label() == "input tok/s, prefill")
    mask = tr.kind == "prefill"
    np.testing.assert_allclose(pre.get_ydata(), tr.input_tokens[mask] / tr.wall_time_s[mask])


def _check_png(path: str) -> None:
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500, path
    rgb = img[..., :3]
    assert rgb.std() > 0.05, f"{path} looks blank"
    assert (rgb.min(axis=2) < 0.9).mean() > 0.01, f"{path} is all white"


def test_make_report_writes_pngs(synthetic, tmp_path):
    path, _, _ = synthetic
    backend = matplotlib.get_backend()
    small = tmp_path / "small.h5"
    write_synthetic(small, Dims(num_ranks=2, ranks_per_node=1, num_experts=4), num_steps=3)
    files = make_report([path, small], tmp_path / "out")
    names = sorted(Path(f).name for f in files)
    kinds = ("phases", "timeline", "expert_load", "rank_load", "steps", "traffic", "stragglers")
    assert names == sorted([f"{s}_{k}.png" for s in ("synth", "small") for k in kinds] + ["scaling.png"])
    for f in files:
        _check_png(f)
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_run_report_cli(synthetic, tmp_path, capsys):
    path, _, _ = synthetic
    parser = argparse.ArgumentParser()
    add_flags(parser, ReportOptions)

    def report(*args):
        return run_report(from_args(ReportOptions, parser.parse_args(list(args))))

    assert report(str(path), "--out", str(tmp_path / "o"), "--skip-steps", "2") == 0
    out = capsys.readouterr().out
    assert "4 steps, completed" in out and out.count("wrote ") == 7
    assert report(str(tmp_path / "nope.h5"), "--no-plots") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    (tmp_path / "bad.h5").write_text("garbage")
    assert report(str(path), str(tmp_path / "bad.h5"), "--no-plots") == 2
    assert "cannot read trace" in capsys.readouterr().err
    # Two traces of one size are no scaling series: their overlap side by side, no efficiency.
    assert report(str(path), str(path), "--no-plots") == 0
    out = capsys.readouterr().out
    assert "Scaling" not in out and out.count("== synth") == 2
    assert report(str(path), "--out", str(tmp_path / "p"), "--no-tables") == 0
    out = capsys.readouterr().out
    assert "Throughput" not in out and out.count("wrote ") == 7
    assert "slowest rank" in summary_table(read_trace(path))


def test_report_on_killed_and_empty_traces(tmp_path, capsys):
    d = Dims()
    w = open_writer(tmp_path / "cut.h5", d)
    for s in range(2):
        w.append_step(**synthetic_step(d, s))
    # No close(): as after SIGKILL the status stays "running" (the file is read while still open).
    text = summary_table(read_trace(tmp_path / "cut.h5"))
    assert "2 steps, still running, or killed" in text
    w.close()
    open_writer(tmp_path / "empty.h5", d).close()
    assert "(no steps recorded)" in summary_table(read_trace(tmp_path / "empty.h5"))
    assert make_report([tmp_path / "empty.h5"], tmp_path / "o") == []


def test_import_does_not_load_matplotlib():
    code = "import sys, hpc_moe.trace.report, hpc_moe.trace.writer; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
