"""The throughput trace: an HDF5 file written by rank 0 during ``hpc-moe run``, read back for analysis.

The schema is docs/trace-format.md (``SCHEMA_VERSION``). The writer uses HDF5 SWMR (single writer,
multiple readers): every dataset exists before SWMR starts and each step is appended with resize +
write + flush, so a reader can follow a running job and a job killed with SIGKILL leaves a file that
is valid up to its last flushed step. ``/steps/step`` is appended last: its length is the number of
committed steps.

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
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    from typing import Self  # Python >= 3.11; annotations are not evaluated at run time

SCHEMA_NAME = "hpc_moe.trace"
SCHEMA_VERSION = 1
PHASES = ("attention", "dense_mlp", "gate", "dispatch", "expert", "combine", "shared", "wait")
# "wait" is time blocked on an outstanding all-to-all: exposed communication, drawn with it.
COMM_PHASES = ("dispatch", "combine", "wait")
KINDS = ("prefill", "decode", "mixed")
STATES = ("running", "completed", "failed")  # a killed writer leaves "running"
EVENT_DTYPE = np.dtype([("step", "<i8"), ("rank", "<i4"), ("layer", "<i4"), ("phase", "<i2"),
                        ("t_start_s", "<f8"), ("t_end_s", "<f8")])
STATUS_DTYPE = np.dtype([("state", "i1"), ("steps_written", "<i8"), ("elapsed_s", "<f8"),
                         ("end_time_unix", "<f8")])
UNITS = {"wall_time_s": "s", "input_tokens": "tokens", "output_tokens": "tokens",
         "num_sequences": "sequences", "input_tokens_per_s": "tokens/s",
         "output_tokens_per_s": "tokens/s", "phase_time_s": "s", "expert_tokens": "tokens",
         "bytes_sent": "B", "events": "s", "elapsed_s": "s", "end_time_unix": "s"}


class TraceError(Exception):
    """A trace cannot be written or read; the message is one line naming the file."""


# Keys the run must put in ``meta``; the writer adds provenance it can find itself (version, commit,
# date, Slurm job id, host and device names from rank_map).
REQUIRED_META = ("model_config", "run_config", "parallel_config", "mpi_library_version", "transport",
                 "cuda_aware", "array_backend", "truncated")
_OPTIONAL_META = ("command_line", "extra")
_BULK = ("phase_time_s", "expert_tokens", "bytes_sent")
_STEP_COLUMNS = ("kind", "wall_time_s", "input_tokens", "output_tokens", "num_sequences",
                 "input_tokens_per_s", "output_tokens_per_s")


class TraceWriter:
    """Append-only SWMR writer of one trace file; rank 0 constructs one, the other ranks none.

    path: the final file (written in place; a file cut short is valid up to its last flushed step).
    meta: the ``REQUIRED_META`` keys (configs as dicts or dataclasses, mpi_library_version: str,
      transport: str, cuda_aware: bool, array_backend: str, truncated: bool) plus optional
      command_line (str, default: this process's argv) and extra (a JSON-able dict).
    num_layers: L, model layers run (after --layers truncation).
    moe_layers: the model layer index of each MoE layer, ascending; M = len(moe_layers).
    placement: int [M or 1, E, K], expert -> ranks holding a replica, -1 padded; E comes from here.
    rank_map: one mapping per rank (R = len) with "host" (str), "gpu" (int CUDA ordinal, -1 on CPU)
      and "device" (str name); node ids and node-local ranks are derived from the host names.
    phases: names of the P phase columns; comm_phases: the subset that is communication.
    overwrite: replace an existing file instead of refusing.
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any], *, num_layers: int,
                 moe_layers: Sequence[int], placement: np.ndarray, rank_map: Sequence[Mapping],
                 phases: Sequence[str] = PHASES, comm_phases: Sequence[str] = COMM_PHASES,
                 overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        self.phases = tuple(phases)
        self.num_layers = int(num_layers)
        ranks = _rank_columns(rank_map)
        self.moe_layers = _check_moe_layers(moe_layers, self.num_layers)
        self.placement = _check_placement(placement, len(self.moe_layers), len(rank_map))
        self.num_ranks = len(rank_map)
        self.num_experts = self.placement.shape[1]
        if set(comm_phases) - set(self.phases) or len(set(self.phases)) != len(self.phases):
            raise TraceError(f"phases {self.phases} must be unique and contain comm_phases {tuple(comm_phases)}")
        attrs = _root_attrs(meta, self, ranks, tuple(comm_phases))
        self._last_step = -1
        self._t0 = time.monotonic()
        self._file = _create_file(self.path, overwrite)
        try:
            _write_static(self._file, attrs, ranks, self)
            _create_row_datasets(self._file, self)
            self._file.swmr_mode = True  # from here on: no new objects or attributes
            # h5py name lookups cost ~0.1 ms each: resolve the appended datasets once.
            self._rows = {name: _Rows(self._file[f"steps/{name}"]) for name in (*_STEP_COLUMNS, *_BULK, "step")}
            self._rows["events"] = _Rows(self._file["events"])
        except (OSError, ValueError, TypeError, KeyError) as e:  # what h5py raises
            self._file.close()
            os.unlink(self.path)
            raise TraceError(f"cannot create trace {self.path}: {_one_line(e)}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    @property
    def closed(self) -> bool:
        return not self._file.id.valid

    def append_step(self, *, step: int, kind: str, wall_time_s: float, input_tokens: int,
                    output_tokens: int, num_sequences: int, phase_time_s: np.ndarray,
                    expert_tokens: np.ndarray, bytes_sent: np.ndarray) -> None:
        """Append one step and flush it (readable from then on, also after a crash).

        step: increasing step index; kind: "prefill" | "decode" | "mixed"; wall_time_s: > 0;
        phase_time_s: float [L, R, P] seconds; expert_tokens: int [M, E] routed tokens per expert
        (all ranks); bytes_sent: int [R, R] EP bytes sent[src, dst] over the step.
        """
        self._check_open()
        if int(step) <= self._last_step:
            raise TraceError(f"step {step} is not after the last appended step {self._last_step}")
        if kind not in KINDS:
            raise TraceError(f"kind {kind!r} is not one of {KINDS}")
        if not (np.isfinite(wall_time_s) and wall_time_s > 0):
            raise TraceError(f"wall_time_s must be a positive number, got {wall_time_s!r}")
        L, M, R, E, P = self.num_layers, len(self.moe_layers), self.num_ranks, self.num_experts, len(self.phases)
        bulk = {"phase_time_s": _as_checked(phase_time_s, "phase_time_s", (L, R, P), np.float64),
                "expert_tokens": _as_checked(expert_tokens, "expert_tokens", (M, E), np.int64),
                "bytes_sent": _as_checked(bytes_sent, "bytes_sent", (R, R), np.int64)}
        counts = [_as_checked(v, n, (), np.int64) for v, n in
                  ((input_tokens, "input_tokens"), (output_tokens, "output_tokens"),
                   (num_sequences, "num_sequences"))]
        wall = float(wall_time_s)
        columns = dict(zip(_STEP_COLUMNS, [KINDS.index(kind), wall, *counts,
                                           counts[0] / wall, counts[1] / wall]))
        try:
            # Everything else first, /steps/step last: a reader trusts rows below len(/steps/step).
            for name, value in [*bulk.items(), *columns.items(), ("step", int(step))]:
                self._rows[name].append(np.asarray(value)[None])
            self._file.flush()
        except (OSError, ValueError) as e:  # e.g. the disk is full
            raise TraceError(f"cannot append step {step} to trace {self.path}: {_one_line(e)}") from None
        self._last_step = int(step)

    def append_events(self, *, step: int, rank, layer, phase, t_start_s, t_end_s) -> None:
        """Append timeline events of one step and flush; arguments broadcast to a common length N.

        rank, layer, phase (index into ``phases``): int [N] or scalars; t_start_s, t_end_s:
        float [N] seconds since the rank's own start of the step.
        """
        self._check_open()
        cols = np.broadcast_arrays(*(np.asarray(a) for a in (rank, layer, phase, t_start_s, t_end_s)))
        rows = np.empty(np.size(cols[0]), EVENT_DTYPE)
        rows["step"] = int(step)
        for name, col in zip(EVENT_DTYPE.names[1:], cols):
            rows[name] = col.ravel()
        for name, hi, col in zip(("rank", "layer", "phase"), (self.num_ranks, self.num_layers, len(self.phases)), cols):
            # Ids may come as float64 columns (timing.Profiler.events_array): they must be whole.
            if rows.size and not (0 <= rows[name].min() and rows[name].max() < hi
                                  and np.array_equal(rows[name], col.ravel())):
                raise TraceError(f"event {name} ids must be integers in [0, {hi})")
        times = np.stack([rows["t_start_s"], rows["t_end_s"]])
        if not np.all(np.isfinite(times)) or np.any(times[1] < times[0]):
            raise TraceError("events need finite times with t_end_s >= t_start_s")
        try:
            self._rows["events"].append(rows)
            self._file.flush()
        except (OSError, ValueError) as e:
            raise TraceError(f"cannot append events to trace {self.path}: {_one_line(e)}") from None

    def flush(self) -> None:
        """Flush HDF5 buffers (appends already flush; this is for callers that want to be sure)."""
        self._check_open()
        self._file.flush()

    def close(self, *, failed: bool = False) -> None:
        """Record the end state ("completed", or "failed" when ``failed``) and close; idempotent."""
        if self.closed:
            return
        status = np.zeros((), STATUS_DTYPE)
        status["state"] = STATES.index("failed" if failed else "completed")
        status["steps_written"] = self._file["steps/step"].shape[0]
        status["elapsed_s"] = time.monotonic() - self._t0
        status["end_time_unix"] = time.time()
        self._file["status"][()] = status
        self._file.close()

    def _check_open(self) -> None:
        if self.closed:
            raise TraceError(f"trace {self.path} is closed")


def _create_file(path: str, overwrite: bool) -> h5py.File:
    if os.path.exists(path) and not overwrite:
        raise TraceError(f"trace {path} exists; refusing to overwrite it (pass overwrite=True)")
    try:
        return h5py.File(path, "w" if overwrite else "x", libver="latest")
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot create trace {path}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _write_static(f: h5py.File, attrs: dict, ranks: dict, w: TraceWriter) -> None:
    for key, value in attrs.items():
        f.attrs[key] = value
    layout = f.create_group("layout")
    layout.create_dataset("moe_layers", data=w.moe_layers)
    layout.create_dataset("placement", data=w.placement)
    for name, col in ranks.items():
        text = col.dtype.kind == "U"  # h5py stores str as variable-length UTF-8 from objects
        layout.create_dataset(f"rank_{name}", data=col.astype(object) if text else col,
                              dtype=h5py.string_dtype() if text else col.dtype)
    status = f.create_dataset("status", shape=(), dtype=STATUS_DTYPE)
    status.attrs["states"] = json.dumps(list(STATES))
    status[()] = np.zeros((), STATUS_DTYPE)  # state 0 = running, until close() says otherwise


def _create_row_datasets(f: h5py.File, w: TraceWriter) -> None:
    L, M, R, E, P = w.num_layers, len(w.moe_layers), w.num_ranks, w.num_experts, len(w.phases)
    kind_dtype = h5py.enum_dtype({k: i for i, k in enumerate(KINDS)}, basetype="i1")
    specs = {"step": (np.int64, ()), "kind": (kind_dtype, ()), "wall_time_s": (np.float64, ()),
             "input_tokens": (np.int64, ()), "output_tokens": (np.int64, ()),
             "num_sequences": (np.int64, ()), "input_tokens_per_s": (np.float64, ()),
             "output_tokens_per_s": (np.float64, ()), "phase_time_s": (np.float64, (L, R, P)),
             "expert_tokens": (np.int64, (M, E)), "bytes_sent": (np.int64, (R, R))}
    labels = {"phase_time_s": ("step", "layer", "rank", "phase"),
              "expert_tokens": ("step", "moe_layer", "expert"), "bytes_sent": ("step", "src", "dst")}
    steps = f.create_group("steps")
    for name, (dtype, tail) in specs.items():
        # Bulk rows get one chunk per step (one write each); scalar columns share chunks.
        chunk = (1, *tail) if tail else (1024,)
        ds = steps.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=chunk)
        ds.attrs["units"] = UNITS.get(name, "1")
        for axis, label in enumerate(labels.get(name, ("step",))):
            ds.dims[axis].label = label
    ev = f.create_dataset("events", shape=(0,), maxshape=(None,), dtype=EVENT_DTYPE, chunks=(4096,))
    ev.attrs["units"] = UNITS["events"]


class _Rows:
    """One appendable dataset, written through the low-level API: h5py's ``ds[i] = v`` costs
    ~0.1 ms a call, which over a dozen datasets per step is time rank 0 takes from every step."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self.id, self.dtype = ds.id, ds.dtype

    def append(self, rows: np.ndarray) -> None:
        """rows: [n, *row shape]; resize + write + flush."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        n0 = self.id.shape[0]
        self.id.set_extent((n0 + rows.shape[0], *rows.shape[1:]))
        if rows.shape[0]:
            space = self.id.get_space()
            space.select_hyperslab((n0,) + (0,) * (rows.ndim - 1), rows.shape)
            self.id.write(h5py.h5s.create_simple(rows.shape), space, rows)
        self.id.flush()


def _as_checked(value, name: str, shape: tuple, dtype) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != shape:
        raise TraceError(f"{name} has shape {a.shape}, expected {shape}")
    if np.dtype(dtype).kind == "i" and a.dtype.kind not in "iu":
        raise TraceError(f"{name} must be integers, got dtype {a.dtype}")
    a = a.astype(dtype, copy=False)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise TraceError(f"{name} must be finite and >= 0")
    return a


def _check_moe_layers(moe_layers: Sequence[int], num_layers: int) -> np.ndarray:
    ids = np.asarray(moe_layers, dtype=np.int64).reshape(-1)
    if num_layers < 1 or np.any(np.diff(ids) <= 0) or (ids.size and not 0 <= ids[0] <= ids[-1] < num_layers):
        raise TraceError(f"moe_layers must be ascending layer ids in [0, {num_layers}), got {ids.tolist()}")
    return ids


def _check_placement(placement: np.ndarray, num_moe: int, num_ranks: int) -> np.ndarray:
    p = np.asarray(placement)
    if p.ndim != 3 or p.shape[0] not in (1, num_moe) or p.dtype.kind not in "iu" or p.shape[1] < 1:
        raise TraceError(f"placement must be int [1 or {num_moe}, experts, replicas], got {p.dtype} {p.shape}")
    if num_ranks < 1 or p.min() < -1 or p.max() >= num_ranks or np.any(p[..., 0] < 0):
        raise TraceError(f"placement ranks must lie in [0, {num_ranks}) with -1 padding after replica 0")
    return p.astype(np.int32)


def _rank_columns(rank_map: Sequence[Mapping]) -> dict[str, np.ndarray]:
    try:
        host = [str(r["host"]) for r in rank_map]
        gpu = np.array([int(r["gpu"]) for r in rank_map], np.int32)
        device = np.array([str(r["device"]) for r in rank_map])
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError(f"rank_map entries need host (str), gpu (int), device (str): {e!r}") from None
    hosts = list(dict.fromkeys(host))  # node ids in order of first appearance
    node = np.array([hosts.index(h) for h in host], np.int32)
    local = np.array([int(np.sum(node[:r] == node[r])) for r in range(len(node))], np.int32)
    return {"host": np.array(host), "node": node, "local_rank": local, "gpu": gpu, "device": device}


def _jsonable(value: Any, key: str) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise TraceError(f"meta[{key!r}] must be a dict, a dataclass or a JSON object string")
    return json.dumps(value, sort_keys=True, default=str)


def _root_attrs(meta: Mapping[str, Any], w: TraceWriter, ranks: dict, comm_phases: tuple) -> dict:
    missing = [k for k in REQUIRED_META if k not in meta]
    unknown = [k for k in meta if k not in REQUIRED_META + _OPTIONAL_META]
    if missing or unknown:
        raise TraceError(f"trace meta: missing keys {missing}, unknown keys {unknown} (put extras in meta['extra'])")
    if not isinstance(meta["cuda_aware"], (bool, np.bool_)) or not isinstance(meta["truncated"], (bool, np.bool_)):
        raise TraceError("trace meta: cuda_aware and truncated must be bools")
    return {
        "schema_name": SCHEMA_NAME, "schema_version": SCHEMA_VERSION,
        "software_version": _software_version(), "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "command_line": str(meta.get("command_line") or shlex.join(sys.argv)),
        **{k: _jsonable(meta[k], k) for k in ("model_config", "run_config", "parallel_config")},
        "mpi_library_version": str(meta["mpi_library_version"]).strip(),
        "transport": str(meta["transport"]), "cuda_aware": bool(meta["cuda_aware"]),
        "array_backend": str(meta["array_backend"]), "truncated": bool(meta["truncated"]),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "hostnames": json.dumps(list(dict.fromkeys(ranks["host"].tolist()))),
        "device_names": json.dumps(sorted(set(ranks["device"].tolist()))),
        "units": json.dumps(UNITS, sort_keys=True),
        "phases": json.dumps(list(w.phases)), "comm_phases": json.dumps(list(comm_phases)),
        "num_layers": w.num_layers, "num_moe_layers": len(w.moe_layers), "num_ranks": w.num_ranks,
        "num_nodes": int(ranks["node"].max()) + 1, "num_experts": w.num_experts,
        "extra": _jsonable(meta.get("extra") or {}, "extra"),
    }


def _software_version() -> str:
    try:
        import hpc_moe
        return str(hpc_moe.__version__)
    except (ImportError, AttributeError):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("hpc_moe")
    except PackageNotFoundError:
        return "unknown"


def _git_commit() -> str:
    """HEAD of the checkout this package runs from, read from .git files ("unknown" outside one).

    No ``git`` subprocess: forking inside an MPI process upsets some interconnect stacks.
    """
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        if git.is_file():  # a worktree: ".git" names the real git dir
            git = (git.parent / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        ref = head.removeprefix("ref:").strip()
        if ref == head:  # detached HEAD
            return head
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        for root in (git, common):
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
        packed = (common / "packed-refs").read_text().splitlines() if (common / "packed-refs").is_file() else []
        return next((line.split()[0] for line in packed if line.endswith(" " + ref)), "unknown")
    except (OSError, IndexError):
        return "unknown"


# ---------------------------------------------------------------------------------------------- reader

@dataclasses.dataclass(frozen=True)
class Trace:
    """One trace as read-only NumPy arrays (shape legend in the module docstring).

    meta: root attributes, JSON ones decoded. Per step: step int64 [S], kind str [S],
    wall_time_s float64 [S], input_tokens / output_tokens / num_sequences int64 [S],
    phase_time_s float64 [S, L, R, P], expert_tokens int64 [S, M, E], bytes_sent int64 [S, R, R].
    events: EVENT_DTYPE [N] (only events of the steps above). moe_layers int64 [M];
    placement int32 [M or 1, E, K]; rank_host / rank_device str [R]; rank_node / rank_local_rank /
    rank_gpu int32 [R]. state: "running" (still written, or killed), "completed" or "failed".
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
    events: np.ndarray
    moe_layers: np.ndarray
    placement: np.ndarray
    rank_host: np.ndarray
    rank_node: np.ndarray
    rank_local_rank: np.ndarray
    rank_gpu: np.ndarray
    rank_device: np.ndarray
    state: str

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
        events = _frozen(self.events[np.isin(self.events["step"], self.step[idx])])
        return dataclasses.replace(self, events=events, **fields)

    def steps_table(self) -> dict[str, np.ndarray]:
        """Per-step columns [S] (pandas.DataFrame(trace.steps_table()) gives one row per step)."""
        tin, tout = throughput_per_step(self)
        return {"step": self.step, "kind": self.kind, "wall_time_s": self.wall_time_s,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "num_sequences": self.num_sequences, "input_tokens_per_s": tin,
                "output_tokens_per_s": tout}


_PER_STEP = ("step", "kind", "wall_time_s", "input_tokens", "output_tokens", "num_sequences",
             "phase_time_s", "expert_tokens", "bytes_sent")
_JSON_ATTRS = ("model_config", "run_config", "parallel_config", "hostnames", "device_names", "units",
               "phases", "comm_phases", "extra")


def read_trace(path: str | os.PathLike) -> Trace:
    """Read a trace: finished, still being written (SWMR) or left by a killed writer.

    Rows are read up to the committed length of /steps/step; raises TraceError (one line) for a
    missing, unreadable or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TraceError(f"trace {path}: no such file")
    try:
        # swmr=True also opens files whose SWMR writer died (a plain open refuses those).
        with h5py.File(path, "r", swmr=True) as f:
            return _read(f, path)
    except TraceError:
        raise
    except (OSError, KeyError, IndexError, ValueError, TypeError) as e:
        raise TraceError(f"cannot read trace {path}: {_one_line(e)}") from None


def _read(f: h5py.File, path: str) -> Trace:
    if f.attrs.get("schema_name") != SCHEMA_NAME:
        raise TraceError(f"{path} is not an hpc_moe trace (schema_name {f.attrs.get('schema_name')!r})")
    if int(f.attrs["schema_version"]) > SCHEMA_VERSION:
        raise TraceError(f"{path} has schema version {f.attrs['schema_version']}; this hpc_moe reads <= {SCHEMA_VERSION}")
    meta = {k: (json.loads(v) if k in _JSON_ATTRS else _scalar(v)) for k, v in f.attrs.items()}
    steps = f["steps"]
    n = min(steps[name].shape[0] for name in steps)  # /steps/step is the shortest unless corrupted
    rows = {name: steps[name][:n] for name in _PER_STEP}
    rows["kind"] = np.array(KINDS)[rows["kind"].astype(np.int64)] if n else np.array([], "<U7")
    events = f["events"][:]
    layout = f["layout"]
    ranks = {k: layout[f"rank_{k}"][:] for k in ("host", "node", "local_rank", "gpu", "device")}
    for k in ("host", "device"):
        ranks[k] = ranks[k].astype(str)
    arrays = {**rows, "events": events[np.isin(events["step"], rows["step"])],
              "moe_layers": layout["moe_layers"][:], "placement": layout["placement"][:],
              **{f"rank_{k}": v for k, v in ranks.items()}}
    return Trace(path=path, meta=meta, phases=tuple(meta["phases"]), comm_phases=tuple(meta["comm_phases"]),
                 state=STATES[int(f["status"][()]["state"])], **{k: _frozen(v) for k, v in arrays.items()})


def _scalar(v):
    return v.item() if isinstance(v, np.generic) else v


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.flags.writeable = False
    return a


# -------------------------------------------------------------------------------------------- analysis

def phase_totals_per_layer(trace: Trace) -> np.ndarray:
    """float64 [L, P]: seconds per layer and phase, summed over steps, mean over ranks."""
    return trace.phase_time_s.sum(axis=0).mean(axis=1)


def throughput_per_step(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(input tokens/s, output tokens/s), each float64 [S], over the whole job (all ranks)."""
    return trace.input_tokens / trace.wall_time_s, trace.output_tokens / trace.wall_time_s


def expert_load_imbalance(trace: Trace, *, per_step: bool = True) -> np.ndarray:
    """max/mean of routed tokens over experts: float64 [S, M] per step, or [M] for all steps summed.

    1.0 is perfect balance; the slowest expert bounds a layer, so per-step values are what costs time.
    NaN where a layer routed no tokens.
    """
    counts = trace.expert_tokens if per_step else trace.expert_tokens.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts.max(axis=-1) / counts.mean(axis=-1)


def achieved_bandwidth(trace: Trace, *, per_step: bool = False) -> np.ndarray:
    """Bytes/s each rank sent to other ranks per second of dispatch + combine time.

    float64 [R] over all steps, or [S, R] per step; self-sends (the diagonal) are local copies and
    do not count. NaN where a rank spent no time in dispatch or combine.
    """
    sent = trace.bytes_sent.sum(axis=2) - np.diagonal(trace.bytes_sent, axis1=1, axis2=2)  # [S, R]
    secs = trace.phase_time_s[..., trace.phase_ids(["dispatch", "combine"])].sum(axis=(1, 3))  # [S, R]
    if not per_step:
        sent, secs = sent.sum(axis=0), secs.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(secs > 0, sent / np.where(secs > 0, secs, 1), np.nan)
