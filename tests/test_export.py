"""hpc-moe export --perfetto: the Chrome trace event JSON of a trace, checked against the trace."""
import gzip
import json

import numpy as np
import pytest
from test_trace import write_synthetic

from hpc_moe.cli import main
from hpc_moe.trace.reader import read_trace


@pytest.mark.parametrize("steps, name", [(None, "all.json"), ("2:", "late.json.gz")])
def test_perfetto_slices_are_the_traces_rows_inside_their_steps(tmp_path, steps, name):
    write_synthetic(tmp_path / "t.h5")
    tr = read_trace(tmp_path / "t.h5")
    out = tmp_path / name
    assert main(["export", str(tmp_path / "t.h5"), "--perfetto", str(out), *(["--steps", steps] if steps else [])]) == 0
    doc = json.loads((gzip.open(out, "rt") if name.endswith(".gz") else open(out)).read())
    ev = doc["traceEvents"]
    keep = tr.step[2:] if steps else tr.step
    slices = [e for e in ev if e["ph"] == "X"]
    begins, ends = ([e for e in ev if e["ph"] == p] for p in ("b", "e"))
    assert len(slices) == np.isin(tr.events["step"], keep).sum() > 0
    assert len(begins) == len(ends) == np.isin(tr.exchanges["step"], keep).sum() > 0
    start = dict(zip(tr.step.tolist(), np.concatenate([[0], np.cumsum(tr.wall_time_s)])[:-1] * 1e6))
    wall = dict(zip(tr.step.tolist(), tr.wall_time_s * 1e6))
    for s in slices:
        step = s["args"]["step"]
        assert start[step] - 1e-3 <= s["ts"] and s["ts"] + s["dur"] <= start[step] + wall[step] + 1e-3
        assert s["pid"] == tr.rank_node[s["tid"]] and s["name"] in tr.phases
    for b, e in zip(begins, ends):
        assert b["id"] == e["id"] and b["ts"] <= e["ts"] and b["args"]["blocked_ms"] >= 0
    names = {e["tid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[3] == f"rank 3 (node {tr.rank_node[3]}, host {tr.rank_host[3]})" and len(names) == tr.num_ranks
    assert [e["name"] for e in ev if e["ph"] == "i"] == [f"step {s}" for s in keep]


def test_export_bad_input_is_one_line(tmp_path, capsys):
    write_synthetic(tmp_path / "t.h5")
    assert main(["export", str(tmp_path / "t.h5"), "--perfetto", str(tmp_path / "o.json"), "--steps", "9:"]) == 2
    assert main(["export", str(tmp_path / "t.h5"), "--perfetto", str(tmp_path / "o.json"), "--steps", "x"]) == 2
    assert main(["export", str(tmp_path / "nope.h5"), "--perfetto", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "selects none" in err[0] and "expected A:B" in err[1] and "no such file" in err[2]
    assert not (tmp_path / "o.json").exists()
