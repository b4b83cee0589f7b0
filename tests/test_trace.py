"""Trace recorders and reader: schema = docs/trace-format.md, crash safety (SIGKILL), live SWMR
reading, and MemoryTrace (``--trace none``) giving exactly what reading the written file gives.

The synthetic data is self-consistent: expert token counts of every MoE layer sum to top_k x tokens
processed in the step, dense layers spend no time in MoE phases, the step wall time covers the
slowest rank, and events overlap dispatch with the shared expert. ``synthetic_step`` is a pure
function of (dims, step) so that a parent process can check rows written by a child.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_moe.trace.metrics import achieved_bandwidth, expert_load_imbalance, phase_totals_per_layer
from hpc_moe.trace.reader import (
    EVENT_DTYPE,
    EXCHANGE_DTYPE,
    PHASES,
    SCHEMA_VERSION,
    Trace,
    TraceError,
    read_trace,
    throughput_per_step,
)
from hpc_moe.trace.writer import MemoryTrace, TraceWriter

REPO = Path(__file__).resolve().parents[1]
HIDDEN_BYTES = 7168 * 2  # one bf16 token row, as the run would send it


@dataclass(frozen=True)
class Dims:
    num_layers: int = 4
    moe_layers: tuple = (1, 2, 3)
    num_ranks: int = 4
    num_experts: int = 8
    top_k: int = 2
    ranks_per_node: int = 2
    kinds: tuple = ("prefill", "prefill", "decode", "decode", "decode", "mixed")
    event_steps: tuple = (2, 5)
    phases: tuple = field(default=PHASES)


def rank_map(d: Dims) -> list[dict]:
    return [{"host": f"node{r // d.ranks_per_node:03d}", "gpu": r % d.ranks_per_node,
             "device": "NVIDIA H100 80GB HBM3"} for r in range(d.num_ranks)]


def placement(d: Dims) -> np.ndarray:
    """[1, E, 2]: expert e on rank e % R; expert 0 has a second replica on the last rank."""
    p = np.full((1, d.num_experts, 2), -1, np.int64)
    p[0, :, 0] = np.arange(d.num_experts) % d.num_ranks
    p[0, 0, 1] = d.num_ranks - 1
    return p


def meta(**over) -> dict:
    m = {"model_config": {"num_hidden_layers": 61, "n_routed_experts": 8, "num_experts_per_tok": 2},
         "run_config": {"steps": 6}, "parallel_config": {"ep": 4},
         "mpi_library_version": "MPICH Version: 4.3.0\n", "transport": "mpi-host-staging",
         "cuda_aware": False, "array_backend": "numpy", "truncated": True,
         "command_line": "hpc-moe run --layers 4",
         "links": {"bytes_per_s": [[2e9, 1e8], [1e8, 2e9]], "latency_s": [[1e-5, 1e-4], [1e-4, 1e-5]],
                   "message_bytes": 1 << 20}}
    return {**m, **over}


def layout(d: Dims) -> dict:
    """The layout keyword arguments of both recorders."""
    return {"num_layers": d.num_layers, "moe_layers": d.moe_layers, "placement": placement(d),
            "rank_map": rank_map(d), "phases": d.phases}


def open_writer(path, d: Dims = Dims(), **kw) -> TraceWriter:
    return TraceWriter(path, meta(), **layout(d), **kw)


def open_recorder(which: str, tmp_path, d: Dims = Dims()) -> TraceWriter | MemoryTrace:
    """which: "file" (a TraceWriter of tmp_path/t.h5) or "memory"."""
    return open_writer(tmp_path / "t.h5", d) if which == "file" else MemoryTrace(meta(), **layout(d))


def synthetic_step(d: Dims, step: int) -> dict:
    """Keyword arguments of TraceWriter.append_step for step ``step``; the wall time is the end
    of the slowest rank's timeline (see _timeline) plus 0.2 ms."""
    rng = np.random.default_rng(1000 + step)
    kind = d.kinds[step % len(d.kinds)]
    nseq = int(rng.integers(2, 6)) * d.num_ranks
    prompt = int(rng.integers(16, 64)) * nseq if kind != "decode" else 0
    decode = nseq if kind != "prefill" else 0
    tokens = prompt + decode  # tokens that pass through every layer
    L, R, P = d.num_layers, d.num_ranks, len(d.phases)
    # Decode-like base times in ms, scaled with the tokens per rank; ranks off node 0 dispatch and
    # combine slower (inter-node); 15 % log-normal noise.
    base = {"attention": 0.30, "dense_mlp": 0.35, "gate": 0.05, "dispatch": 0.25, "expert": 0.30,
            "combine": 0.25, "shared": 0.15, "wait": 0.08}
    scale = 1.0 + tokens / R / 64
    t = np.array([base.get(p, 0.1) for p in d.phases]) * 1e-3 * scale * rng.lognormal(0, 0.15, (L, R, P))
    far = np.arange(R) >= d.ranks_per_node
    ph = {n: i for i, n in enumerate(d.phases)}
    t[:, far, ph["dispatch"]] *= 1.6
    t[:, far, ph["combine"]] *= 1.6
    dense = np.setdiff1d(np.arange(L), d.moe_layers)
    t[np.ix_(dense, np.arange(R), [ph[n] for n in ("gate", "dispatch", "expert", "combine", "shared", "wait")])] = 0
    t[np.ix_(list(d.moe_layers), np.arange(R), [ph["dense_mlp"]])] = 0
    skew = np.linspace(1.0, 3.0, d.num_experts)  # later experts hotter: imbalance > 1
    counts = np.stack([rng.multinomial(d.top_k * tokens, skew / skew.sum()) for _ in d.moe_layers])
    sent = rng.integers(1, 50, (R, R)) * HIDDEN_BYTES * len(d.moe_layers) * 2
    wall = float(_timeline(d, t)[:, 4].max() + 2e-4)
    # In flight: the dispatch overlaps the shared expert, the combine is waited for.
    in_flight = np.stack([t[..., ph["dispatch"]] + t[..., ph["shared"]], t[..., ph["combine"]] + t[..., ph["wait"]]], -1)
    blocked = np.stack([0.2 * t[..., ph["dispatch"]], t[..., ph["wait"]]], -1)
    return {"step": step, "kind": kind, "wall_time_s": wall,
            "input_tokens": prompt, "output_tokens": nseq, "num_sequences": nseq,
            "phase_time_s": t, "expert_tokens": counts, "bytes_sent": sent,
            "exchange_time_s": np.stack([in_flight, blocked], -1),
            "rank_tokens": rng.integers(1, 100, (len(d.moe_layers), R)),
            "nodes_reached": np.stack([np.full((len(d.moe_layers), R), tokens // R),
                                       rng.integers(tokens // R, 2 * tokens // R, (len(d.moe_layers), R)),
                                       np.full((len(d.moe_layers), R), 2)], -1)}


def _timeline(d: Dims, t: np.ndarray) -> np.ndarray:
    """float64 [N, 5] event rows (rank, layer, phase, t_start, t_end) for phase times t [L, R, P].

    Per rank the layers run back to back; dispatch overlaps the shared expert; each MoE layer ends
    with a wait until the slowest rank's combine is done, so the ranks line up again (sets the
    "wait" column of t in place to that wait).
    """
    ph = {n: i for i, n in enumerate(d.phases)}
    rows = []
    now = np.zeros(d.num_ranks)
    ranks = np.arange(d.num_ranks)

    def run(layer, name, start):
        end = start + t[layer, :, ph[name]]
        rows.extend(zip(ranks, [layer] * len(ranks), [ph[name]] * len(ranks), start, end))
        return end

    for layer in range(d.num_layers):
        now = run(layer, "attention", now)
        if layer not in d.moe_layers:
            now = run(layer, "dense_mlp", now)
            continue
        now = run(layer, "gate", now)
        now = np.maximum(run(layer, "dispatch", now), run(layer, "shared", now))
        done = run(layer, "combine", run(layer, "expert", now))
        t[layer, :, ph["wait"]] = done.max() - done + 2e-5
        now = run(layer, "wait", done)
    return np.array(rows, dtype=np.float64)


def synthetic_events(d: Dims, step: dict) -> dict:
    """Keyword arguments of TraceWriter.append_events for a step made by synthetic_step."""
    cols = _timeline(d, step["phase_time_s"]).T
    return {"step": step["step"], "rank": cols[0].astype(int), "layer": cols[1].astype(int),
            "phase": cols[2].astype(int), "t_start_s": cols[3], "t_end_s": cols[4]}


def synthetic_exchanges(d: Dims, step: dict) -> dict:
    """Keyword arguments of TraceWriter.append_exchanges: one dispatch and one combine per MoE layer
    and rank, with the in-flight and blocked seconds of the step's exchange_time_s."""
    layers = np.repeat(np.asarray(d.moe_layers), d.num_ranks * 2)
    ranks = np.tile(np.repeat(np.arange(d.num_ranks), 2), len(d.moe_layers))
    kinds = np.tile([0, 1], len(d.moe_layers) * d.num_ranks)
    x = step["exchange_time_s"][layers, ranks, kinds]
    post = 1e-3 * layers + 1e-4 * kinds
    return {"step": step["step"], "rank": ranks, "layer": layers, "micro_batch": 0, "kind": kinds,
            "t_start_s": post, "t_post_s": post, "t_done_s": post + x[:, 0], "blocked_s": x[:, 1]}


def write_synthetic(path, d: Dims = Dims(), num_steps: int = 6) -> list[dict]:
    """A complete trace of ``num_steps`` steps; returns the appended step dicts."""
    steps = [synthetic_step(d, s) for s in range(num_steps)]
    with open_writer(path, d) as w:
        feed(w, d, steps)
    return steps


def feed(recorder: TraceWriter | MemoryTrace, d: Dims, steps: list[dict]) -> None:
    """Append the steps made by synthetic_step, with events for those in d.event_steps."""
    for s in steps:
        recorder.append_step(**s)
        if s["step"] in d.event_steps:
            recorder.append_events(**synthetic_events(d, s))
            recorder.append_exchanges(**synthetic_exchanges(d, s))
        if s["step"] == 3:  # a re-placement from step 4 on: the experts' owners rotated
            recorder.append_placement(step=4, placement=np.roll(placement(d), 1, axis=1))


def assert_same_trace(got: Trace, want: Trace) -> None:
    """Every field equal (arrays: dtype, shape, values, read-only), but path, meta["created"] and
    the clock times (each step's end, each segment's start)."""
    for f in dataclasses.fields(Trace):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "time_unix":
            assert a.shape == b.shape and a.dtype == b.dtype and np.all(a > 0) and not a.flags.writeable
        elif f.name == "segments":
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert (x.index, x.first_step, x.end_step, x.after, x.previous_end_unix) == \
                    (y.index, y.first_step, y.end_step, y.after, y.previous_end_unix)
                assert x.started_unix > 0 and y.started_unix > 0 and x.ranks.keys() == y.ranks.keys()
                for name in x.ranks:
                    np.testing.assert_array_equal(x.ranks[name], y.ranks[name], err_msg=name)
        elif f.name == "meta":
            assert a.keys() == b.keys()
            for key in a.keys() - {"created"}:
                assert a[key] == b[key] and type(a[key]) is type(b[key]), key
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape, (f.name, a.dtype, b.dtype, a.shape, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=f.name)
            assert not a.flags.writeable, f.name
        elif f.name != "path":
            assert a == b, f.name


# --------------------------------------------------------------------------------------------- tests

def test_round_trip(tmp_path):
    d = Dims()
    steps = write_synthetic(tmp_path / "t.h5", d)
    tr = read_trace(tmp_path / "t.h5")
    assert tr.state == "completed" and tr.num_steps == 6 and tr.num_ranks == 4 and tr.num_nodes == 2
    np.testing.assert_array_equal(tr.step, np.arange(6))
    assert tr.kind.tolist() == list(d.kinds)
    for name in ("wall_time_s", "input_tokens", "output_tokens", "num_sequences", "phase_time_s",
                 "expert_tokens", "bytes_sent"):
        np.testing.assert_array_equal(getattr(tr, name), np.stack([s[name] for s in steps]))
    processed = tr.input_tokens + np.where(tr.kind == "prefill", 0, tr.num_sequences)
    np.testing.assert_array_equal(tr.expert_tokens.sum(axis=2), d.top_k * processed[:, None].repeat(3, 1))
    np.testing.assert_array_equal(tr.bytes_recv[1], steps[1]["bytes_sent"].T)
    assert set(np.unique(tr.events["step"])) == {2, 5}
    assert tr.rank_host.tolist() == ["node000", "node000", "node001", "node001"]
    assert tr.rank_local_rank.tolist() == [0, 1, 0, 1] and tr.rank_node.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(tr.placement, placement(d))
    assert tr.meta["model_config"]["n_routed_experts"] == 8 and tr.meta["cuda_aware"] is False
    assert tr.meta["schema_version"] == SCHEMA_VERSION and tr.meta["truncated"] is True
    assert tr.meta["hostnames"] == ["node000", "node001"]
    assert tr.meta["units"]["phase_time_s"] == "s"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", tr.meta["created"])
    assert tr.meta["software_version"] != "" and tr.meta["git_commit"]
    with pytest.raises(ValueError):
        tr.wall_time_s[0] = 1.0  # the arrays are read-only


def test_memory_trace_equals_file(tmp_path):
    """MemoryTrace.trace() == read_trace of a file written with the same calls: empty, while open
    (both "running"), and after a close that records a failure."""
    d = Dims()
    steps = [synthetic_step(d, s) for s in range(6)]
    w, mem = open_writer(tmp_path / "t.h5", d), MemoryTrace(meta(), **layout(d))
    assert_same_trace(mem.trace(), w.trace())
    assert mem.trace().num_steps == 0 and mem.trace().phase_time_s.shape == (0, 4, 4, len(PHASES))
    for rec in (w, mem):
        feed(rec, d, steps[:4])
    live = mem.trace()
    assert live.state == "running" and live.num_steps == 4 and live.path == "<memory>"
    assert_same_trace(live, w.trace())  # the writer's trace() reads its open file with SWMR
    for rec in (w, mem):
        feed(rec, d, steps[4:])
        rec.close(failed=True)
        rec.close()  # idempotent: the state stays "failed"
    got, want = mem.trace(), read_trace(tmp_path / "t.h5")
    assert got.state == "failed" and got.num_steps == 6 and set(np.unique(got.events["step"])) == {2, 5}
    assert_same_trace(got, want)
    assert_same_trace(w.trace(), want)
    np.testing.assert_allclose(expert_load_imbalance(got), expert_load_imbalance(want))


def test_memory_trace_copies_rows_and_makes_no_hdf5_call(tmp_path, monkeypatch):
    def no_hdf5(*args, **kwargs):
        raise AssertionError("MemoryTrace opened an HDF5 file")

    monkeypatch.setattr(h5py, "File", no_hdf5)
    monkeypatch.chdir(tmp_path)
    d = Dims()
    s = synthetic_step(d, 0)
    kept = s["phase_time_s"].copy()
    with MemoryTrace(meta(), **layout(d)) as mem:
        mem.append_step(**s)
        s["phase_time_s"][:] = -1.0  # a caller that reuses its buffer for the next step
    np.testing.assert_array_equal(mem.trace().phase_time_s[0], kept)
    assert mem.trace().state == "completed" and not list(tmp_path.iterdir())


def test_analysis_helpers(tmp_path):
    steps = write_synthetic(tmp_path / "t.h5")
    tr = read_trace(tmp_path / "t.h5")
    t = np.stack([s["phase_time_s"] for s in steps])
    np.testing.assert_allclose(phase_totals_per_layer(tr), t.sum(0).mean(1))
    tin, tout = throughput_per_step(tr)
    np.testing.assert_allclose(tin[0], steps[0]["input_tokens"] / steps[0]["wall_time_s"])
    np.testing.assert_allclose(tout[3], steps[3]["output_tokens"] / steps[3]["wall_time_s"])
    c = steps[4]["expert_tokens"][1]
    assert expert_load_imbalance(tr)[4, 1] == pytest.approx(c.max() / c.mean())
    tot = tr.expert_tokens.sum(0)[2]
    assert expert_load_imbalance(tr, per_step=False)[2] == pytest.approx(tot.max() / tot.mean())
    b = np.stack([s["bytes_sent"] for s in steps])
    off = b.sum(axis=(0, 2)) - np.einsum("sii->i", b)
    secs = t[..., [PHASES.index(p) for p in ("dispatch", "combine", "wait")]].sum(axis=(0, 1, 3))
    np.testing.assert_allclose(achieved_bandwidth(tr), off / secs)
    assert achieved_bandwidth(tr, per_step=True).shape == (6, 4)
    sub = tr.subset(tr.kind == "decode")
    assert sub.num_steps == 3 and set(np.unique(sub.events["step"])) == {2}
    assert list(tr.steps_table()) == ["step", "kind", "wall_time_s", "input_tokens", "output_tokens",
                                      "num_sequences", "input_tokens_per_s", "output_tokens_per_s"]


def _doc_tables() -> tuple[dict, dict]:
    """docs/trace-format.md -> ({dataset path: (dtype, shape)}, {root attribute: type}).

    Reads the rows of the tables under the headings "## Datasets" and "## Root attributes".
    """
    datasets, attrs, section, in_code = {}, {}, "", False
    for line in (REPO / "docs" / "trace-format.md").read_text().splitlines():
        in_code ^= line.startswith("```")
        if line.startswith("#") and not in_code:
            section = line.strip("# ").lower()
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `"):
            continue
        if section == "datasets":
            datasets[cells[0]] = (cells[1], cells[2])
        elif section == "root attributes":
            attrs[cells[0]] = cells[1]
    return datasets, attrs


def test_schema_matches_doc(tmp_path):
    d = Dims()
    write_synthetic(tmp_path / "t.h5", d)
    sizes = {"S": 6, "L": d.num_layers, "X": None, "H": None, "M": len(d.moe_layers), "E": d.num_experts, "R": d.num_ranks,
             "P": len(PHASES), "K": 2, "M1": 1, "G": 1}
    doc_ds, doc_attrs = _doc_tables()
    found = {}
    with h5py.File(tmp_path / "t.h5", "r") as f:
        f.visititems(lambda name, obj: found.update({"/" + name: obj}) if isinstance(obj, h5py.Dataset) else None)
        assert set(found) == set(doc_ds), "datasets in file and doc differ"
        for name, (dtype, shape) in doc_ds.items():
            ds = found[name]
            kind = ("enum" if h5py.check_enum_dtype(ds.dtype) else "compound" if ds.dtype.names
                    else "str" if h5py.check_string_dtype(ds.dtype) else ds.dtype.name)
            assert kind == dtype, name
            dims = [s.strip() for s in shape.strip("[]()").split(",") if s.strip()]
            assert len(dims) == ds.ndim, name
            for n, sym in zip(ds.shape, dims):
                if sym not in ("N", "X", "H") and not sym.isdigit():
                    assert n == sizes[sym], (name, sym)
                elif sym.isdigit():
                    assert n == int(sym), (name, sym)
        assert found["/events"].dtype == EVENT_DTYPE
        assert found["/exchanges"].dtype == EXCHANGE_DTYPE
        assert set(f.attrs) == set(doc_attrs), "root attributes in file and doc differ"
        types = {"str": str, "int": (int, np.integer), "bool": (bool, np.bool_), "json": str}
        for key, typ in doc_attrs.items():
            assert isinstance(f.attrs[key], types[typ]), key
            if typ == "json":
                json.loads(f.attrs[key])
    tr = read_trace(tmp_path / "t.h5")
    assert tr.placements["step"].tolist() == [4]
    p = tr.placements["placement"][0]
    np.testing.assert_array_equal(p[..., :placement(d).shape[2]], np.roll(placement(d), 1, axis=1))
    assert (p[..., placement(d).shape[2]:] == -1).all()


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "t.h5"
    open_writer(path).close()
    with pytest.raises(TraceError, match="exists; refusing to overwrite"):
        open_writer(path)
    open_writer(path, overwrite=True).close()
    assert read_trace(path).num_steps == 0


@pytest.mark.parametrize("bad, match", [
    ({"placement": np.full((1, 8, 1), 9)}, "placement"),
    ({"moe_layers": (3, 1)}, "moe_layers"),
    ({"rank_map": [{"host": "a"}] * 4}, "rank_map"),
    ({"meta": {"transport": "mpi"}}, "missing keys"),
    ({"meta": {**meta(), "colour": "red"}}, "unknown keys"),
    ({"path": "/nonexistent-dir/t.h5"}, "cannot create trace"),
])
def test_writer_rejects_bad_input(tmp_path, bad, match):
    d = Dims()
    kw = {"path": tmp_path / "t.h5", "meta": meta(), "num_layers": 4, "moe_layers": d.moe_layers,
          "placement": placement(d), "rank_map": rank_map(d), **bad}
    path, m = kw.pop("path"), kw.pop("meta")
    with pytest.raises(TraceError, match=match) as e:
        TraceWriter(path, m, **kw)
    assert "\n" not in str(e.value)
    if "path" not in bad:  # the same checks, the same message
        with pytest.raises(TraceError) as e_mem:
            MemoryTrace(m, **kw)
        assert str(e_mem.value) == str(e.value)


@pytest.mark.parametrize("which", ["file", "memory"])
def test_append_rejects_bad_rows(tmp_path, which):
    d = Dims()
    with open_recorder(which, tmp_path, d) as w:
        s = synthetic_step(d, 0)
        for bad, match in [({"phase_time_s": s["phase_time_s"][:2]}, "shape"),
                           ({"expert_tokens": s["expert_tokens"] * 0.5}, "integers"),
                           ({"kind": "train"}, "kind"), ({"wall_time_s": 0.0}, "positive")]:
            with pytest.raises(TraceError, match=match):
                w.append_step(**{**s, **bad})
        w.append_step(**s)
        with pytest.raises(TraceError, match="not after"):
            w.append_step(**s)
        with pytest.raises(TraceError, match="phase ids"):
            w.append_events(step=0, rank=0, layer=0, phase=len(PHASES), t_start_s=0.0, t_end_s=1.0)
    with pytest.raises(TraceError, match="closed"):
        w.append_step(**synthetic_step(d, 1))
    assert w.trace().num_steps == 1


def test_reader_errors(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w", libver="latest") as f:
        f["x"] = 1
    with pytest.raises(TraceError, match="not an hpc_moe trace"):
        read_trace(tmp_path / "other.h5")


@pytest.mark.timeout(60)
def test_a_truncated_trace_is_refused_at_once(tmp_path):
    """A copy or disk that lost the file's end: one line, no SWMR metadata retries for minutes."""
    write_synthetic(tmp_path / "t.h5", Dims())
    full = (tmp_path / "t.h5").read_bytes()
    for keep in (len(full) - 1, len(full) // 2, 40, 20):
        (tmp_path / "cut.h5").write_bytes(full[:keep])
        with pytest.raises(TraceError, match="truncated file"):
            read_trace(tmp_path / "cut.h5")
    (tmp_path / "cut.h5").write_bytes(full + b"\0" * 100)  # longer than recorded: HDF5 reads it
    assert read_trace(tmp_path / "cut.h5").num_steps == read_trace(tmp_path / "t.h5").num_steps


def test_events_from_profiler_arrays(tmp_path):
    """timing.Profiler.events_array() gives float64 [n, 4] (layer, phase id, t_start, t_end)."""
    ev = np.array([[0, 0, 0.0, 1e-3], [1, 3, 1e-3, 2.5e-3]])
    with open_writer(tmp_path / "t.h5") as w:
        w.append_step(**synthetic_step(Dims(), 0))
        for rank in (0, 3):
            w.append_events(step=0, rank=rank, layer=ev[:, 0], phase=ev[:, 1], t_start_s=ev[:, 2], t_end_s=ev[:, 3])
        with pytest.raises(TraceError, match="finite"):
            w.append_events(step=0, rank=0, layer=0, phase=0, t_start_s=0.0, t_end_s=np.inf)
        with pytest.raises(TraceError, match="layer ids must be integers"):
            w.append_events(step=0, rank=0, layer=0.5, phase=0, t_start_s=0.0, t_end_s=1.0)
    got = read_trace(tmp_path / "t.h5").events
    assert got.dtype == EVENT_DTYPE and got["rank"].tolist() == [0, 0, 3, 3]
    assert got["layer"].tolist() == [0, 1, 0, 1] and got["phase"].tolist() == [0, 3, 0, 3]
    np.testing.assert_array_equal(got["t_end_s"], np.tile(ev[:, 3], 2))


def test_failed_run_is_marked(tmp_path):
    with pytest.raises(RuntimeError), open_writer(tmp_path / "t.h5") as w:
        w.append_step(**synthetic_step(Dims(), 0))
        raise RuntimeError("rank 3 died")
    tr = read_trace(tmp_path / "t.h5")
    assert tr.state == "failed" and tr.num_steps == 1


# Child process: appends steps and reports each flushed count on stdout. With "wait", it appends one
# step per line read from stdin and closes the trace at EOF; otherwise it appends until killed.
CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_trace import Dims, open_writer, synthetic_step
w = open_writer({path!r})
print("open", flush=True)
step = 0
while {wait!r} is False or sys.stdin.readline():
    w.append_step(**synthetic_step(Dims(), step))
    step += 1
    print("flushed", step, flush=True)
w.close()
print("closed", flush=True)
"""


def _child(path, wait: bool) -> subprocess.Popen:
    code = CHILD.format(tests=str(Path(__file__).parent), path=str(path), wait=wait)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO)


def _expect(proc: subprocess.Popen, word: str) -> str:
    line = proc.stdout.readline()
    assert line.startswith(word), f"child said {line!r}, expected {word!r}"
    return line


def test_sigkill_leaves_readable_trace(tmp_path):
    path = tmp_path / "killed.h5"
    proc = _child(path, wait=False)
    try:
        _expect(proc, "open")
        while int(_expect(proc, "flushed").split()[1]) < 20:
            pass  # the child keeps appending, so the kill lands in the middle of a write
    finally:
        os.kill(proc.pid, 9)
        proc.wait()
    tr = read_trace(path)
    assert tr.state == "running" and tr.num_steps >= 20
    d = Dims()
    for i in (0, tr.num_steps - 1):  # first and last committed rows are intact
        s = synthetic_step(d, i)
        np.testing.assert_array_equal(tr.expert_tokens[i], s["expert_tokens"])
        np.testing.assert_array_equal(tr.phase_time_s[i], s["phase_time_s"])


def test_live_swmr_reader_follows_writer(tmp_path):
    path = tmp_path / "live.h5"
    proc = _child(path, wait=True)
    try:
        _expect(proc, "open")
        with h5py.File(path, "r", swmr=True) as f:
            ds = f["steps/step"]
            seen = []
            for expected in (1, 2, 3):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                _expect(proc, f"flushed {expected}")
                ds.refresh()
                seen.append(ds.shape[0])
            live = read_trace(path)
            assert live.state == "running" and live.num_steps == 3
            proc.stdin.close()
            _expect(proc, "closed")
            f["status"].refresh()
            assert f["status"][()]["state"] == 1
        assert seen == [1, 2, 3]
    finally:
        proc.kill()
        proc.wait()
    assert read_trace(path).state == "completed"


def test_strings_from_mpi_and_the_host_are_cleaned(tmp_path):
    """Open MPI's library version ends in a NUL byte, which HDF5's strings refuse: the writer
    stores what it can read back, without it (and without other control characters)."""
    d = Dims()
    ranks = [{**r, "host": r["host"] + "\0", "device": "cpu\x01"} for r in rank_map(d)]
    m = meta(mpi_library_version="Open MPI v5.0.11, package: Open MPI\0", transport="host\0")
    with TraceWriter(tmp_path / "t.h5", m, **{**layout(d), "rank_map": ranks}) as w:
        w.append_step(**synthetic_step(d, 0))
    t = read_trace(tmp_path / "t.h5")
    assert t.meta["mpi_library_version"] == "Open MPI v5.0.11, package: Open MPI" and t.meta["transport"] == "host"
    assert "\0" not in "".join(t.rank_host) and set(t.rank_device) == {"cpu"}


def test_pandas_frames_have_named_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    write_synthetic(tmp_path / "t.h5")
    tr = read_trace(tmp_path / "t.h5")
    steps, ev, ex = tr.steps_frame(), tr.events_frame(), tr.exchanges_frame()
    assert isinstance(steps, pd.DataFrame) and list(steps.step) == tr.step.tolist()
    assert len(ev) == len(tr.events) and set(ev.phase) <= set(tr.phases)
    assert (ev.node == tr.rank_node[ev["rank"]]).all() and (ev.duration_s >= 0).all()
    assert len(ex) == len(tr.exchanges) and set(ex.kind) == {"dispatch", "combine"}
    assert ex.in_flight_s.ge(0).all() and ex.host.isin(tr.rank_host).all()


def test_frames_without_pandas_say_which_extra(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas here")
        return real(name, *args, **kwargs)

    write_synthetic(tmp_path / "t.h5")
    tr = read_trace(tmp_path / "t.h5")
    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(TraceError, match=r"hpc_moe\[analysis\]"):
        tr.events_frame()
