"""A resumed trace (``hpc-moe run --resume``): the writer's cut copy, the segments as read back, and
the report, plots, Perfetto export, frames and straggler analysis reading it as one run whose
segments ran on their own ranks.

The trace: 6 steps on 4 ranks (2 nodes) whose writer is killed, resumed at step 4 (steps 4 and 5
are cut) on 3 ranks of other hosts (2 nodes), which write steps 4..7. The clock times are then set
to round values, so that the time lost reads as fixed numbers: the last kept step ends at 1003 s,
the resumed run opens the trace at 1063 s and its first step starts at 1100 s.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_trace import Dims, feed, open_writer, placement, synthetic_step, write_synthetic

from hpc_moe.trace.export import perfetto_events
from hpc_moe.trace.reader import TraceError, read_trace
from hpc_moe.trace.report import make_report, summary_json, summary_stats, summary_table
from hpc_moe.trace.segments import resume_gaps
from hpc_moe.trace.stragglers import straggler_stats
from hpc_moe.trace.writer import TraceWriter

FIRST = Dims()  # 4 ranks, 2 a node
SECOND = Dims(num_ranks=3, ranks_per_node=2, event_steps=(6,))  # 3 ranks on 2 nodes
RESUME_AT = 4
RESTART_S, STARTUP_S = 60.0, 37.0


def second_rank_map() -> list[dict]:
    """The resumed run's ranks: other hosts than the first run's (resume0, resume1)."""
    return [{"host": f"resume{r // 2}", "gpu": r % 2, "device": "NVIDIA H100 80GB HBM3"} for r in range(3)]


def killed_trace(path, d: Dims = FIRST, num_steps: int = 6) -> list[dict]:
    """A trace of ``num_steps`` steps whose writer died: flushed, its file closed without close()."""
    steps = [synthetic_step(d, s) for s in range(num_steps)]
    w = open_writer(path, d)
    feed(w, d, steps)
    w.flush()
    w._file.close()
    return steps


def resume(path, **kw) -> TraceWriter:
    args = {"steps": RESUME_AT, "placement": placement(SECOND), "rank_map": second_rank_map(), "after": "running",
            "previous_end_unix": float(read_trace(path).time_unix[RESUME_AT - 1])}
    return TraceWriter.resume(path, **{**args, **kw})


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """(path, trace, first run's step dicts, resumed run's step dicts) of the trace above."""
    path = tmp_path_factory.mktemp("resumed") / "resumed.h5"
    first = killed_trace(path)
    second = [synthetic_step(SECOND, s) for s in range(RESUME_AT, 8)]
    with resume(path) as w:
        feed(w, SECOND, second)
    with h5py.File(path, "r+") as f:  # round clock times: the lost time as fixed numbers
        wall = f["steps/wall_time_s"][:]
        end = np.where(np.arange(8) < RESUME_AT, 1000.0 + np.arange(8), 0.0)
        end[RESUME_AT:] = 1003.0 + RESTART_S + STARTUP_S + np.cumsum(wall[RESUME_AT:])
        f["steps/time_unix"][:] = end
        seg = f["segments"][:]
        seg["previous_end_unix"][1], seg["started_unix"][1] = 1003.0, 1003.0 + RESTART_S
        f["segments"][:] = seg
    return path, read_trace(path), first[:RESUME_AT], second


def test_the_resumed_writer_keeps_the_committed_steps_and_adds_a_segment(resumed):
    path, tr, first, second = resumed
    np.testing.assert_array_equal(tr.step, np.arange(8))
    np.testing.assert_array_equal(tr.wall_time_s, [s["wall_time_s"] for s in first + second])
    assert sorted(set(tr.events["step"].tolist())) == [2, 6] == sorted(set(tr.exchanges["step"].tolist()))
    assert tr.placements["step"].tolist() == [RESUME_AT]  # the first run's re-placement at step 4 was cut
    with h5py.File(path, "r") as f:
        assert {f[f"steps/{n}"].shape[0] for n in f["steps"]} == {8}
        assert set(np.unique(f["events"]["step"]).tolist()) == {2, 6}  # step 5's events are gone
    assert tr.state == "completed" and tr.resumed and len(tr.segments) == 2
    s0, s1 = tr.segments
    assert (s0.first_step, s0.end_step, s0.after, s0.num_ranks, s0.num_nodes) == (0, RESUME_AT, "", 4, 2)
    assert (s1.first_step, s1.end_step, s1.after, s1.num_ranks, s1.num_nodes) == (RESUME_AT, None, "running", 3, 2)
    assert s1.ranks["host"].tolist() == ["resume0", "resume0", "resume1"]
    assert s1.ranks["node"].tolist() == [0, 0, 1]
    # The per-step rank axes keep the first run's 4 columns; the resumed rows leave column 3 zero.
    assert tr.phase_time_s.shape[2] == 4 and not tr.phase_time_s[RESUME_AT:, :, 3].any()
    np.testing.assert_array_equal(tr.phase_time_s[RESUME_AT:, :, :3], [s["phase_time_s"] for s in second])


def test_segment_views_have_their_own_ranks(resumed):
    _, tr, first, second = resumed
    a, b = tr.segment(0), tr.segment(1)
    assert a.phase_time_s.shape == (4, 4, 4, 8) and b.phase_time_s.shape == (4, 4, 3, 8)
    assert b.bytes_sent.shape == (4, 3, 3) and b.rank_time_s.shape == (4, 3) and b.rank_tokens.shape == (4, 3, 3)
    np.testing.assert_array_equal(b.bytes_sent, [s["bytes_sent"] for s in second])
    assert a.rank_host.tolist() == ["node000", "node000", "node001", "node001"]
    assert b.rank_host.tolist() == ["resume0", "resume0", "resume1"] and b.num_nodes == 2
    assert b.placement.shape == (1, 8, 4) and (b.placement[..., :2] == placement(SECOND)).all()
    assert (b.placement[..., 2:] == -1).all() and len(b.placements) == 0
    assert not a.resumed and not b.resumed and b.events["rank"].max() == 2


def test_resume_gaps_and_a_cut_first_step(resumed):
    _, tr, _, _ = resumed
    (gap,) = resume_gaps(tr)
    assert gap["step"] == RESUME_AT and gap["after"] == "running" and (gap["ranks"], gap["nodes"]) == (3, 2)
    assert gap["lost_s"] == pytest.approx(RESTART_S + STARTUP_S)
    assert gap["restart_s"] == pytest.approx(RESTART_S) and gap["startup_s"] == pytest.approx(STARTUP_S)
    # Without the resumed segment's first step its start is unknown, not the next step's.
    (late,) = resume_gaps(tr.subset(tr.step != RESUME_AT))
    assert late["lost_s"] is None and late["startup_s"] is None and late["restart_s"] == pytest.approx(RESTART_S)


def test_summary_reads_as_one_run(resumed):
    _, tr, first, second = resumed
    text = summary_table(tr)
    lines = text.splitlines()
    assert lines[1] == "8 steps, completed"
    assert lines[2].startswith("4 ranks on 2 nodes then 3 ranks on 2 nodes (")
    seg = lines.index(next(ln for ln in lines if ln.startswith("Segments (the run and 1 resume:")))
    assert seg < lines.index(next(ln for ln in lines if ln.startswith("Throughput")))
    rows = [ln.split() for ln in lines[seg + 3:seg + 5]]
    assert rows[0][:6] == ["0", "0..3", "4", "2", "2", "-"] and rows[1][:6] == ["1", "4..7", "3", "2", "2", "killed"]
    out0 = sum(s["output_tokens"] for s in first) / sum(s["wall_time_s"] for s in first)
    assert rows[0][7] == f"{out0:,.0f}"
    assert ("  step 4, after the run was killed: 97.000 s lost = 60.000 s to restart (detection, the job's end, "
            "the scheduler, the launch) + 37.000 s to start up (weights, placement, warm-up)") in lines
    assert any(ln.startswith("  in all 97.000 s lost") for ln in lines)
    assert "outside every step's wall time, so outside the throughput" in text
    assert "-- segment 0: steps 0..3 on 4 ranks, 2 nodes --" in lines
    assert "-- segment 1: steps 4..7 on 3 ranks, 2 nodes --" in lines
    assert "Time per layer (ms, mean over all 4 steps and 3 ranks)" in lines
    # Segment 1's rank sections are those of its own trace's summary, as they stand there.
    alone = summary_table(tr.segment(1)).splitlines()
    part = alone[alone.index(next(ln for ln in alone if ln.startswith("Time per step by phase"))):
                 alone.index(next(ln for ln in alone if ln.startswith("Expert load imbalance"))) - 1]
    at = lines.index("-- segment 1: steps 4..7 on 3 ranks, 2 nodes --") + 2
    assert lines[at:at + len(part)] == part and len(part) > 20
    # --skip-steps past the first segment: it is listed without steps, its sections are gone.
    late = summary_table(tr.subset(slice(5, None))).splitlines()
    assert "-- segment 1: steps 5..7 on 3 ranks, 2 nodes --" in late and not any("-- segment 0" in ln for ln in late)
    assert next(ln for ln in late if ln.startswith("0 ")).split()[1:3] == ["-", "4"]


def test_throughput_per_rank_counts_rank_seconds(resumed):
    _, tr, first, second = resumed
    rows = {(r["kind"], r["direction"]): r for r in summary_stats(tr)["throughput"]}
    wall0, wall1 = (sum(s["wall_time_s"] for s in part) for part in (first, second))
    tokens = sum(s["output_tokens"] for s in first + second)
    row = rows[("all", "output")]
    assert row["steps"] == 8 and row["tok_s"] == pytest.approx(tokens / (wall0 + wall1))
    assert row["per_rank"] == pytest.approx(tokens / (4 * wall0 + 3 * wall1))
    assert row["per_gpu"] == pytest.approx(tokens / (4 * wall0 + 3 * wall1))
    assert row["per_node"] == pytest.approx(tokens / (2 * wall0 + 2 * wall1))
    decode = [s for s in first + second if s["kind"] == "decode"]
    d0 = sum(s["wall_time_s"] for s in decode if s["step"] < RESUME_AT)
    d1 = sum(s["wall_time_s"] for s in decode if s["step"] >= RESUME_AT)
    assert rows[("decode", "output")]["per_rank"] == pytest.approx(
        sum(s["output_tokens"] for s in decode) / (4 * d0 + 3 * d1))


def test_summary_json_segments_and_time_lost(resumed):
    _, tr, first, second = resumed
    s = json.loads(json.dumps(summary_json(tr)))
    assert s["steps"] == 8 and (s["ranks"], s["nodes"]) == (3, 2) and s["time_lost_s"] == pytest.approx(97.0)
    wall = tr.wall_time_s.sum()
    assert s["output_tokens_per_s"] == pytest.approx(tr.output_tokens.sum() / wall)
    assert [(g["first_step"], g["steps"], g["ranks"], g["nodes"], g["after"]) for g in s["segments"]] == \
        [(0, 4, 4, 2, ""), (4, 4, 3, 2, "running")]
    assert s["segments"][0]["lost_s"] is None and s["segments"][1]["lost_s"] == pytest.approx(97.0)
    out1 = sum(x["output_tokens"] for x in second) / sum(x["wall_time_s"] for x in second)
    assert s["segments"][1]["output_tokens_per_s"] == pytest.approx(out1)
    last = summary_json(tr.segment(1))  # the rank figures: the last segment's
    for key in ("phase_ms_per_step", "offrank_bytes_per_step", "internode_bytes_per_step", "slowest_rank",
                "exchange_exposed_ms_per_step", "rank_load_max_over_mean", "stragglers"):
        assert s[key] == pytest.approx(last[key]), key
    assert summary_json(tr.subset(tr.step != RESUME_AT))["time_lost_s"] is None


def test_report_plots_per_segment_and_marks_the_resume(resumed, tmp_path):
    import hpc_moe.trace.plots as plots
    path, tr, _, _ = resumed
    names = sorted(Path(f).name for f in make_report([path], tmp_path / "out"))
    per_rank = ("phases", "timeline", "rank_load", "traffic", "stragglers")
    assert names == sorted(["resumed_expert_load.png", "resumed_steps.png",
                            *(f"resumed_segment{k}_{n}.png" for k in (0, 1) for n in per_rank)])
    ax = plots.plot_step_throughput(tr).axes[0]
    (mark,) = [ln for ln in ax.lines if ln.get_label().startswith("resumed")]
    assert mark.get_label() == "resumed on 3 ranks / 2 nodes after 97.0 s" and list(mark.get_xdata()) == [4, 4]
    # A timeline step picks its segment: only that segment draws it, on its own 3 ranks.
    one = make_report([path], tmp_path / "six", step=6)
    assert sum("timeline" in f for f in one) == 1 and "resumed_segment1_timeline.png" in [Path(f).name for f in one]


def test_perfetto_frames_and_stragglers_map_ranks_by_segment(resumed):
    _, tr, _, _ = resumed
    ev = perfetto_events(tr)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in ev if e["name"] == "thread_name"}
    assert names[(2, 4)] == "segment 1 (from step 4): rank 0 (node 0, host resume0)"
    assert names[(3, 6)] == "segment 1 (from step 4): rank 2 (node 1, host resume1)"
    assert names[(1, 3)] == "segment 0 (from step 0): rank 3 (node 1, host node001)" and len(names) == 7
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert procs[3] == "segment 1 (from step 4): node 1 (resume1)" and len(procs) == 4
    slices = [e for e in ev if e["ph"] in ("X", "b")]
    assert {e["tid"] for e in slices if e["args"]["step"] == 6} == {4, 5, 6}
    assert {e["tid"] for e in slices if e["args"]["step"] == 2} == {0, 1, 2, 3}
    assert all(names[(e["pid"], e["tid"])] for e in slices)  # every slice on a named thread of its node
    frame = tr.events_frame()
    late = frame[frame.step == 6]
    assert sorted(set(zip(late["rank"], late["host"], late["node"]))) == \
        [(0, "resume0", 0), (1, "resume0", 0), (2, "resume1", 1)]
    assert set(frame[frame.step == 2].host) == {"node000", "node001"}
    s = straggler_stats(tr)  # the last sampled segment's ranks
    assert len(s["skew_ms"]) == 3 and s == straggler_stats(tr.segment(1))


def test_resume_refuses_more_ranks_than_the_trace_has(tmp_path):
    path = tmp_path / "t.h5"
    killed_trace(path)
    before = path.read_bytes()
    five = [{"host": "h", "gpu": r, "device": "d"} for r in range(5)]
    with pytest.raises(TraceError, match="5 ranks do not fit the trace's 4 rank columns") as e:
        resume(path, rank_map=five, placement=placement(Dims(num_ranks=5)))
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]


def test_a_step_cut_while_appended_is_cut_from_the_copy(tmp_path):
    path, d = tmp_path / "t.h5", FIRST
    steps = [synthetic_step(d, s) for s in range(8)]
    w = open_writer(path, d)
    feed(w, d, steps[:6])
    w._rows["phase_time_s"].append(np.full((1, 4, 4, 8), 99.0))  # killed inside the append of step 6
    w._rows["expert_tokens"].append(np.full((1, 3, 8), 99))
    w.flush()
    w._file.close()
    assert read_trace(path).num_steps == 6
    w = TraceWriter.resume(path, steps=6, placement=placement(d), rank_map=[
        {"host": f"node{r // 2:03d}", "gpu": r % 2, "device": "NVIDIA H100 80GB HBM3"} for r in range(4)],
        after="running", previous_end_unix=0.0)
    with h5py.File(path, "r", swmr=True) as f:
        assert {f[f"steps/{n}"].shape[0] for n in f["steps"]} == {6}
    feed(w, d, steps[6:])
    w.close()
    tr = read_trace(path)
    np.testing.assert_array_equal(tr.step, np.arange(8))
    np.testing.assert_array_equal(tr.phase_time_s[6], steps[6]["phase_time_s"])
    np.testing.assert_array_equal(tr.expert_tokens[6], steps[6]["expert_tokens"])
    assert resume_gaps(tr)[0]["lost_s"] is None  # the end of the step before was not given


@pytest.mark.parametrize("fail", ["copy", "cut"])
def test_a_failed_copy_leaves_the_original_and_no_temporary_file(tmp_path, monkeypatch, fail):
    path = tmp_path / "t.h5"
    killed_trace(path)
    before = path.read_bytes()
    if fail == "copy":  # the second object fails to copy: the copy had started
        real, calls = h5py.Group.copy, []

        def copy(self, *a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            return real(self, *a, **kw)
        monkeypatch.setattr(h5py.Group, "copy", copy)
    else:  # the copy is complete, cutting it fails
        monkeypatch.setattr(h5py.Dataset, "resize", lambda *a, **kw: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(TraceError, match="cannot copy trace .* to resume it: disk full"):
        resume(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]
    assert read_trace(path).num_steps == 6


def test_a_run_never_resumed_reads_as_before(tmp_path):
    """One segment: no Segments block, no segment headings, per rank = tok/s over the ranks; the
    JSON's segments hold the one run and no time lost."""
    write_synthetic(tmp_path / "t.h5")
    tr = read_trace(tmp_path / "t.h5")
    text = summary_table(tr)
    assert "Segments" not in text and "-- segment" not in text and "rank-seconds" not in text
    assert "\nThroughput (tokens/s, whole job; one GPU per rank)\n" in text
    row = summary_stats(tr)["throughput"][-1]
    assert row["per_rank"] == row["tok_s"] / 4 and row["per_node"] == row["tok_s"] / 2
    s = summary_json(tr)
    assert s["time_lost_s"] == 0.0 and [g["ranks"] for g in s["segments"]] == [4] and s["segments"][0]["lost_s"] is None
    names = sorted(Path(f).name for f in make_report([tmp_path / "t.h5"], tmp_path / "out"))
    assert not any("segment" in n for n in names) and len(names) == 7


def test_overlap_side_by_side_takes_the_last_segment(resumed, tmp_path, capsys):
    from hpc_moe.cli import main
    from hpc_moe.trace.metrics import exchange_overlap
    path, tr, _, _ = resumed
    write_synthetic(tmp_path / "plain.h5")
    assert main(["report", str(path), str(tmp_path / "plain.h5"), "--no-plots"]) == 0
    out = capsys.readouterr().out.splitlines()
    total = next(ln for ln in out if ln.startswith("total") and len(ln.split()) == 7).split()
    assert total[1] == f"{exchange_overlap(tr.segment(1))['total_in_flight']:.3f}"
