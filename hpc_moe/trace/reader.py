"""The throughput trace as data: schema constants, root attributes, ``Trace``, ``read_trace``
(figures derived from it: hpc_moe.trace.metrics).

hpc_moe.trace.writer records a trace (``TraceWriter`` into an HDF5 file, ``MemoryTrace`` in memory); this
module defines what both record and reads the files back. The schema is docs/trace-format.md
(``SCHEMA_VERSION``). The constants and ``root_attributes`` (the run's meta -> root attributes,
which ``Trace.meta`` decodes again) live here so that the recorders import them from the reader
side: reading a trace never imports the writer.

Shape legend: S steps, L layers, M MoE layers, E routed experts, R ranks, P phases,
K replicas per expert (placement), N timeline events.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_moe.errors import InputError
from hpc_moe.timing import COMM_PHASES, EXCHANGE_KINDS, PHASES  # noqa: F401 (part of the format: re-exported)
from hpc_moe.trace.provenance import git_commit, software_version

SCHEMA_NAME = "hpc_moe.trace"
SCHEMA_VERSION = 2  # 2: exchange records, rank loads, nodes reached (version 1 files read with them empty)
KINDS = ("prefill", "decode", "mixed")
STATES = ("running", "completed", "failed", "stopped")  # a killed writer leaves "running"; stopped: by a signal
EVENT_DTYPE = np.dtype([("step", "<i8"), ("rank", "<i4"), ("layer", "<i4"), ("phase", "<i2"),
                        ("t_start_s", "<f8"), ("t_end_s", "<f8")])
EXCHANGE_DTYPE = np.dtype([("step", "<i8"), ("rank", "<i4"), ("layer", "<i4"), ("micro_batch", "<i2"),
                           ("kind", "i1"), ("t_start_s", "<f8"), ("t_post_s", "<f8"), ("t_done_s", "<f8"),
                           ("blocked_s", "<f8")])
def placement_dtype(maps: int, experts: int, ranks: int) -> np.dtype:
    """A re-placement record: the step it took effect from, the placement (replicas padded to R),
    the experts and bytes that moved to new owners (all ranks), the seconds from posting their
    transfers to done, of those spent posting and blocked waiting for them (the slowest rank's)."""
    return np.dtype([("step", "<i8"), ("placement", "<i4", (maps, experts, ranks)), ("experts_moved", "<i8"),
                     ("bytes_moved", "<i8"), ("fetch_time_s", "<f8"), ("post_time_s", "<f8"),
                     ("wait_time_s", "<f8")])


STATUS_DTYPE = np.dtype([("state", "i1"), ("steps_written", "<i8"), ("elapsed_s", "<f8"),
                         ("end_time_unix", "<f8")])
UNITS = {"rank_tokens": "tokens", "rank_time_s": "s", "nodes_reached": "1", "wall_time_s": "s", "input_tokens": "tokens",
         "output_tokens": "tokens",
         "num_sequences": "sequences", "input_tokens_per_s": "tokens/s",
         "output_tokens_per_s": "tokens/s", "phase_time_s": "s", "expert_tokens": "tokens",
         "bytes_sent": "B", "events": "s", "exchange_time_s": "s", "exchanges": "s", "elapsed_s": "s",
         "end_time_unix": "s"}
RANK_COLUMNS = ("host", "node", "local_rank", "gpu", "device", "machine")  # /layout/rank_<name>


class TraceError(InputError):
    """A trace cannot be written or read; the message is one line naming the file."""


# ------------------------------------------------------------------------------------- root attributes
# Built here for both recorders (hpc_moe.trace.writer) and decoded here into Trace.meta: the attribute
# table of docs/trace-format.md in one place. Keys the run must put in ``meta``; root_attributes
# adds the provenance it can find itself (version, commit, date, command line, Slurm job id).
REQUIRED_META = ("model_config", "run_config", "parallel_config", "mpi_library_version", "transport",
                 "cuda_aware", "array_backend", "truncated")
_OPTIONAL_META = ("command_line", "extra", "links")
_JSON_ATTRS = ("model_config", "run_config", "parallel_config", "hostnames", "device_names", "units",
               "phases", "comm_phases", "extra", "links")


def root_attributes(meta: Mapping[str, Any], ranks: Mapping[str, np.ndarray], *, phases: Sequence[str],
                    comm_phases: Sequence[str], num_layers: int, num_moe_layers: int, num_experts: int) -> dict:
    """The root attributes of a trace, JSON ones as strings (``Trace.meta`` decodes them).

    meta: the REQUIRED_META keys plus optional command_line and extra (hpc_moe.trace.writer documents
    their types); ranks: the /layout/rank_<name> columns [R] (host, node and device are used).
    """
    missing = [k for k in REQUIRED_META if k not in meta]
    unknown = [k for k in meta if k not in REQUIRED_META + _OPTIONAL_META]
    if missing or unknown:
        raise TraceError(f"trace meta: missing keys {missing}, unknown keys {unknown} (put extras in meta['extra'])")
    if not isinstance(meta["cuda_aware"], (bool, np.bool_)) or not isinstance(meta["truncated"], (bool, np.bool_)):
        raise TraceError("trace meta: cuda_aware and truncated must be bools")
    return {
        "schema_name": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
        "software_version": software_version(), "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "command_line": clean_text(meta.get("command_line") or shlex.join(sys.argv)),
        **{k: _jsonable(meta[k], k) for k in ("model_config", "run_config", "parallel_config")},
        "mpi_library_version": clean_text(meta["mpi_library_version"]),
        "transport": clean_text(meta["transport"]), "cuda_aware": bool(meta["cuda_aware"]),
        "array_backend": clean_text(meta["array_backend"]), "truncated": bool(meta["truncated"]),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "hostnames": json.dumps(list(dict.fromkeys(ranks["host"].tolist()))),
        "device_names": json.dumps(sorted(set(ranks["device"].tolist()))),
        "units": json.dumps(UNITS, sort_keys=True),
        "phases": json.dumps(list(phases)), "comm_phases": json.dumps(list(comm_phases)),
        "num_layers": int(num_layers), "num_moe_layers": int(num_moe_layers), "num_ranks": len(ranks["node"]),
        "num_nodes": int(ranks["node"].max()) + 1, "num_experts": int(num_experts),
        "extra": _jsonable(meta.get("extra") or {}, "extra"),
        "links": _jsonable(meta.get("links") or {}, "links"),
    }


def clean_text(value: Any) -> str:
    """A string from MPI or the host as the trace stores it: without NUL bytes and other control
    characters but newline and tab (Open MPI's library version ends in a NUL, which HDF5's
    variable-length strings refuse), without surrounding blanks."""
    return "".join(c for c in str(value) if c.isprintable() or c in "\n\t").strip()


def _jsonable(value: Any, key: str) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise TraceError(f"meta[{key!r}] must be a dict, a dataclass or a JSON object string")
    return json.dumps(value, sort_keys=True, default=str)


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
    rank_gpu int32 [R]. state: "running" (still written, or killed), "completed" or "failed".
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

    @classmethod
    def from_contents(cls, path: str, attrs: Mapping, steps: Mapping[str, np.ndarray], events: np.ndarray,
                      exchanges: np.ndarray, placements: np.ndarray, layout: Mapping[str, np.ndarray],
                      state: str) -> Trace:
        """The Trace of a trace file's contents, whether read from HDF5 or held in memory.

        attrs: root attributes as stored (JSON ones as strings); steps: the committed rows of the
        ``/steps/*`` datasets, kind as int enum codes; events, exchanges: all of ``/events`` and
        ``/exchanges``; layout: the
        ``/layout/*`` datasets by name (rank_host / rank_device as any string array).
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
        return cls(path=path, meta=meta, phases=tuple(meta["phases"]), comm_phases=tuple(meta["comm_phases"]),
                   state=state, **{k: _frozen(v) for k, v in arrays.items()})

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
             "rank_time_s")


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
    if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3):
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
    layout = {name: ds[:] for name, ds in f["layout"].items()}
    layout.setdefault("rank_machine", layout["rank_host"])  # files before the machine column
    rows = {name: steps[name][:n] for name in _PER_STEP if name in steps}
    L, R = steps["phase_time_s"].shape[1:3]
    M = len(f["layout/moe_layers"])
    for name, shape, dtype in (("exchange_time_s", (L, R, len(EXCHANGE_KINDS), 2), np.float64),
                               ("rank_tokens", (M, R), np.int64), ("nodes_reached", (M, R, 3), np.int64),
                               ("rank_time_s", (R,), np.float64)):
        if name not in rows:  # an older file (docs/trace-format.md, Versioning)
            rows[name] = np.zeros((n, *shape), dtype)
    exchanges = f["exchanges"][:] if "exchanges" in f else np.empty(0, EXCHANGE_DTYPE)
    placements = np.zeros(len(f["placements"]) if "placements" in f else 0, placement_dtype(*layout["placement"].shape[:2], R))
    for name in placements.dtype.names if len(placements) else ():  # older files lack the moved bytes: zeros
        if name in f["placements"].dtype.names:
            placements[name] = f["placements"][name]
    return Trace.from_contents(path, dict(f.attrs), rows, f["events"][:], exchanges, placements, layout,
                               STATES[int(f["status"][()]["state"])])


def _pandas():
    try:
        import pandas
    except ImportError:
        raise TraceError("trace frames need pandas: pip install 'hpc_moe[analysis]' (or pip install pandas)") from None
    return pandas


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
