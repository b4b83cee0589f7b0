"""The throughput trace as data: ``Trace`` and ``read_trace`` (figures derived from it:
hpc_moe.trace.metrics).

hpc_moe.trace.writer records a trace (``TraceWriter`` into an HDF5 file, ``MemoryTrace`` in memory);
this module reads the files back. The schema is docs/trace-format.md (``SCHEMA_VERSION``); its
constants and root attributes are defined in hpc_moe.trace.schema and re-exported here, so that
reading a trace never imports the writer.

Shape legend: S steps, L layers, M MoE layers, E routed experts, R ranks, P phases,
K replicas per expert (placement), N timeline events.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from hpc_moe.timing import COMM_PHASES, EXCHANGE_KINDS, PHASES  # noqa: F401 (part of the format: re-exported)
from hpc_moe.trace.schema import (  # noqa: F401 (the format's names, re-exported)
    _JSON_ATTRS,
    EVENT_DTYPE,
    EXCHANGE_DTYPE,
    KINDS,
    RANK_COLUMNS,
    REQUIRED_META,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    STATES,
    STATUS_DTYPE,
    UNITS,
    TraceError,
    _one_line,
    clean_text,
    placement_dtype,
    root_attributes,
)
from hpc_moe.trace.segments import SEGMENT_DTYPE, Segment, segment_group, segments_of

# --------------------------------------------------------------------------------------------- reading

@dataclasses.dataclass(frozen=True)
class Trace:
    """One trace as read-only NumPy arrays (shape legend in the module docstring).

    meta: root attributes, JSON ones decoded. Per step: step int64 [S], kind str [S],
    wall_time_s float64 [S], input_tokens / output_tokens / num_sequences int64 [S],
    phase_time_s float64 [S, L, R, P], expert_tokens int64 [S, M, E], bytes_sent int64 [S, R, R],
    exchange_time_s float64 [S, L, R, 2, 2]: per exchange kind (dispatch, combine) the seconds in
    flight (started to seen complete) and blocked, summed over micro-batches; rank_tokens int64
    [S, M, R]: token rows each rank received; nodes_reached int64 [S, M, R, 3]: per rank its tokens,
    the nodes they reached in all, the most nodes one token reached; rank_time_s float64 [S, R]:
    each rank's own time in the step (from the barrier before it to the end of its work, on its
    clock; wall_time_s is rank 0's, to the barrier after the step: the slowest rank's).
    events: EVENT_DTYPE [N] and exchanges: EXCHANGE_DTYPE [X] (only those of the steps above);
    placements: every re-placement (placement_dtype [H]: the step it took effect from, the
    placement padded to R); ``placement`` is the one the run started with. moe_layers int64 [M];
    placement int32 [M or 1, E, K]; rank_host / rank_device / rank_machine str [R] (machine: the
    physical machine, its boot id, or the host in older files); rank_node / rank_local_rank /
    rank_gpu int32 [R]. state: "running" (still written, or killed), "completed", "failed" or
    "stopped". time_unix float64 [S]: when each step ended (rank 0's clock; 0 in older files).
    segments: the first run and each ``run --resume`` that continued it (hpc_moe.trace.segments;
    one for a run never resumed); the rank columns above are the first segment's, and a later
    segment of fewer ranks fills the first R_k columns of the per-step rank axes: ``segment(k)``
    is the trace of segment k alone, with its own ranks.
    path: the file, or "<memory>" for a hpc_moe.trace.MemoryTrace.
    """

    path: str
    meta: dict
    phases: tuple
    comm_phases: tuple
    step: np.ndarray
    kind: np.ndarray
    wall_time_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    num_sequences: np.ndarray
    phase_time_s: np.ndarray
    expert_tokens: np.ndarray
    bytes_sent: np.ndarray
    exchange_time_s: np.ndarray
    rank_tokens: np.ndarray
    rank_time_s: np.ndarray
    nodes_reached: np.ndarray
    events: np.ndarray
    exchanges: np.ndarray
    placements: np.ndarray
    moe_layers: np.ndarray
    placement: np.ndarray
    rank_host: np.ndarray
    rank_node: np.ndarray
    rank_local_rank: np.ndarray
    rank_gpu: np.ndarray
    rank_device: np.ndarray
    rank_machine: np.ndarray
    state: str
    time_unix: np.ndarray
    segments: tuple[Segment, ...]

    @classmethod
    def from_contents(cls, path: str, attrs: Mapping, steps: Mapping[str, np.ndarray], events: np.ndarray,
                      exchanges: np.ndarray, placements: np.ndarray, layout: Mapping[str, np.ndarray],
                      state: str, segments: np.ndarray | None = None,
                      segment_ranks: Sequence[Mapping[str, np.ndarray]] = ()) -> Trace:
        """The Trace of a trace file's contents, whether read from HDF5 or held in memory.

        attrs: root attributes as stored (JSON ones as strings); steps: the committed rows of the
        ``/steps/*`` datasets, kind as int enum codes; events, exchanges: all of ``/events`` and
        ``/exchanges``; layout: the
        ``/layout/*`` datasets by name (rank_host / rank_device as any string array); segments:
        the /segments rows (SEGMENT_DTYPE; None: one segment of the layout's ranks) and
        segment_ranks the rank columns of segments 1, 2, ... by name.
        """
        meta = {k: (json.loads(v) if k in _JSON_ATTRS else _scalar(v)) for k, v in attrs.items()}
        rows = {name: steps[name] for name in _PER_STEP}
        rows["kind"] = np.array(KINDS)[rows["kind"].astype(np.int64)] if len(rows["step"]) else np.array([], "<U7")
        arrays = {**rows, "events": events[np.isin(events["step"], rows["step"])],
                  "exchanges": exchanges[np.isin(exchanges["step"], rows["step"])], "placements": placements,
                  **{k: layout[k] for k in ("moe_layers", "placement")},
                  **{f"rank_{k}": layout[f"rank_{k}"] for k in RANK_COLUMNS}}
        for k in ("rank_host", "rank_device", "rank_machine"):
            arrays[k] = arrays[k].astype(str)
        if segments is None:
            segments = np.array([(0, len(arrays["rank_node"]), 0.0, -1, 0.0)], SEGMENT_DTYPE)
        ranks = [{k: arrays[f"rank_{k}"] for k in RANK_COLUMNS},
                 *({k: np.asarray(cols[f"rank_{k}"]).astype(str) if k in ("host", "device", "machine")
                    else np.asarray(cols[f"rank_{k}"]) for k in RANK_COLUMNS} for cols in segment_ranks)]
        return cls(path=path, meta=meta, phases=tuple(meta["phases"]), comm_phases=tuple(meta["comm_phases"]),
                   state=state, segments=segments_of(segments, ranks, STATES),
                   **{k: _frozen(v) for k, v in arrays.items()})

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def num_steps(self) -> int:
        return len(self.step)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_ranks(self) -> int:
        return len(self.rank_node)

    @property
    def num_nodes(self) -> int:
        return int(self.rank_node.max()) + 1

    @property
    def num_gpus(self) -> int:
        return int(np.sum(self.rank_gpu >= 0))

    @property
    def num_experts(self) -> int:
        return self.expert_tokens.shape[2]

    @property
    def bytes_recv(self) -> np.ndarray:
        """int64 [S, R, R]: bytes_recv[s, dst, src] = bytes_sent[s, src, dst]."""
        return self.bytes_sent.transpose(0, 2, 1)

    def phase_ids(self, names: Sequence[str]) -> list[int]:
        return [self.phases.index(n) for n in names]

    def subset(self, keep: np.ndarray | slice) -> Trace:
        """The same trace restricted to some steps (bool mask [S] or slice), e.g. to drop warm-up."""
        idx = np.arange(self.num_steps)[keep]
        fields = {f: _frozen(getattr(self, f)[idx]) for f in _PER_STEP}
        kept = {name: _frozen(getattr(self, name)[np.isin(getattr(self, name)["step"], self.step[idx])])
                for name in ("events", "exchanges")}
        return dataclasses.replace(self, **kept, **fields)

    @property
    def resumed(self) -> bool:
        """Whether ``run --resume`` continued this trace (more than one segment)."""
        return len(self.segments) > 1

    def segment(self, k: int) -> Trace:
        """Segment k alone: its steps, its ranks (the per-step rank axes cut to its R_k), the
        placement it started with and its re-placements; its own single segment."""
        seg = self.segments[k]
        t = self.subset(seg.holds(self.step))
        R = seg.num_ranks
        cut = {"phase_time_s": t.phase_time_s[:, :, :R], "bytes_sent": t.bytes_sent[:, :R, :R],
               "exchange_time_s": t.exchange_time_s[:, :, :R], "rank_tokens": t.rank_tokens[:, :, :R],
               "nodes_reached": t.nodes_reached[:, :, :R], "rank_time_s": t.rank_time_s[:, :R]}
        placements = self.placements[seg.holds(self.placements["step"])]
        placement = self.placement
        if k and len(placements) and placements[0]["step"] == seg.first_step:  # the layout it resumed with
            placement, placements = placements[0]["placement"], placements[1:]
        hosts = list(dict.fromkeys(seg.ranks["host"].tolist()))
        meta = {**self.meta, "num_ranks": R, "num_nodes": seg.num_nodes, "hostnames": hosts}
        return dataclasses.replace(t, meta=meta, placement=_frozen(placement), placements=_frozen(placements),
                                   segments=(dataclasses.replace(seg, index=0),),
                                   **{k: _frozen(v) for k, v in cut.items()},
                                   **{f"rank_{name}": _frozen(col) for name, col in seg.ranks.items()})

    def steps_frame(self):
        """pandas.DataFrame, one row per step (hpc_moe.trace.frames; needs pandas)."""
        from hpc_moe.trace import frames
        return frames.steps_frame(self, _pandas())

    def events_frame(self):
        """pandas.DataFrame, one row per timeline event, phases by name (hpc_moe.trace.frames)."""
        from hpc_moe.trace import frames
        return frames.events_frame(self, _pandas())

    def exchanges_frame(self):
        """pandas.DataFrame, one row per exchange, kinds by name (hpc_moe.trace.frames)."""
        from hpc_moe.trace import frames
        return frames.exchanges_frame(self, _pandas())

    def steps_table(self) -> dict[str, np.ndarray]:
        """Per-step columns [S] (pandas.DataFrame(trace.steps_table()) gives one row per step)."""
        tin, tout = throughput_per_step(self)
        return {"step": self.step, "kind": self.kind, "wall_time_s": self.wall_time_s,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "num_sequences": self.num_sequences, "input_tokens_per_s": tin,
                "output_tokens_per_s": tout}


_PER_STEP = ("step", "kind", "wall_time_s", "input_tokens", "output_tokens", "num_sequences",
             "phase_time_s", "expert_tokens", "bytes_sent", "exchange_time_s", "rank_tokens", "nodes_reached",
             "rank_time_s", "time_unix")


def read_trace(path: str | os.PathLike) -> Trace:
    """Read a trace: finished, still being written (SWMR) or left by a killed writer.

    Rows are read up to the committed length of /steps/step; raises TraceError (one line) for a
    missing, unreadable or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TraceError(f"trace {path}: " + ("not a regular file" if os.path.exists(path) else "no such file"))
    _check_not_truncated(path)
    try:
        # swmr=True also opens files whose SWMR writer died (a plain open refuses those).
        with h5py.File(path, "r", swmr=True) as f:
            return _read(f, path)
    except TraceError:
        raise
    except (OSError, KeyError, IndexError, ValueError, TypeError) as e:
        raise TraceError(f"cannot read trace {path}: {_one_line(e)}") from None


def _check_not_truncated(path: str) -> None:
    """A file shorter than the end its superblock records is refused here: an SWMR open skips
    HDF5's own end-of-file check and then retries its metadata reads for minutes. The superblock
    (versions 2 and 3, which libver="latest" writes) holds, after the 8-byte signature, version,
    offset and length sizes and flags, the base, extension and end-of-file addresses (HDF5 file
    format specification, "Superblock Version 2 and 3"). Older superblocks are left to HDF5."""
    with open(path, "rb") as f:
        head = f.read(48)
    if head[:8] != b"\x89HDF\r\n\x1a\n":  # HDF5 also finds a signature at 512, 1024, ...: leave those to it
        if len(head) < 8 or not os.path.getsize(path) > 512:
            raise TraceError(f"cannot read trace {path}: not an HDF5 file")
        return
    if len(head) < 12 or head[8] not in (2, 3):
        return
    width = head[9]
    if len(head) < 12 + 3 * width:
        raise TraceError(f"cannot read trace {path}: truncated file ({len(head)} bytes)")
    base, eof = (int.from_bytes(head[12 + i * width:12 + (i + 1) * width], "little") for i in (0, 2))
    size = os.path.getsize(path)
    if size < base + eof:
        raise TraceError(f"cannot read trace {path}: truncated file ({size} bytes of {base + eof}; "
                         "the copy or the disk lost its end)")


def _read(f: h5py.File, path: str) -> Trace:
    if f.attrs.get("schema_name") != SCHEMA_NAME:
        raise TraceError(f"{path} is not an hpc_moe trace (schema_name {f.attrs.get('schema_name')!r})")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        raise TraceError(f"{path} has schema version {f.attrs['schema_version']}; this hpc_moe reads <= {SCHEMA_VERSION}")
    steps = f["steps"]
    n = min(steps[name].shape[0] for name in steps)  # /steps/step is the shortest unless corrupted
    layout = {name: ds[:] for name, ds in f["layout"].items() if isinstance(ds, h5py.Dataset)}
    layout.setdefault("rank_machine", layout["rank_host"])  # files before the machine column
    rows = {name: steps[name][:n] for name in _PER_STEP if name in steps}
    L, R = steps["phase_time_s"].shape[1:3]
    M = len(f["layout/moe_layers"])
    for name, shape, dtype in (("exchange_time_s", (L, R, len(EXCHANGE_KINDS), 2), np.float64),
                               ("rank_tokens", (M, R), np.int64), ("nodes_reached", (M, R, 3), np.int64),
                               ("rank_time_s", (R,), np.float64), ("time_unix", (), np.float64)):
        if name not in rows:  # an older file (docs/trace-format.md, Versioning)
            rows[name] = np.zeros((n, *shape), dtype)
    exchanges = f["exchanges"][:] if "exchanges" in f else np.empty(0, EXCHANGE_DTYPE)
    placements = np.zeros(len(f["placements"]) if "placements" in f else 0, placement_dtype(*layout["placement"].shape[:2], R))
    for name in placements.dtype.names if len(placements) else ():  # older files lack the moved bytes: zeros
        if name in f["placements"].dtype.names:
            placements[name] = f["placements"][name]
    segments = f["segments"][:] if "segments" in f else None  # files before version 3: one segment
    segment_ranks = [{name: ds[:] for name, ds in f[segment_group(k)].items()}
                     for k in range(1, 0 if segments is None else len(segments))]
    return Trace.from_contents(path, dict(f.attrs), rows, f["events"][:], exchanges, placements, layout,
                               STATES[int(f["status"][()]["state"])], segments, segment_ranks)


def _pandas():
    try:
        import pandas
    except ImportError:
        raise TraceError("trace frames need pandas: pip install 'hpc_moe[analysis]' (or pip install pandas)") from None
    return pandas


def _scalar(v):
    return v.item() if isinstance(v, np.generic) else v


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.flags.writeable = False
    return a


# -------------------------------------------------------------------------------------------- analysis

def throughput_per_step(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens/s, output tokens/s), each float64 [S], over the whole job (all ranks)."""
    return trace.input_tokens / trace.wall_time_s, trace.output_tokens / trace.wall_time_s
