"""Recording the throughput trace of ``hpc-moe run`` on rank 0: ``TraceWriter`` and ``MemoryTrace``.

Both recorders take the same arguments and calls, check them with the same code (``_Recorder``)
and return the same ``trace()``: the hpc_moe.trace.reader.Trace that ``read_trace`` gives for the file.
TraceWriter writes the HDF5 file of docs/trace-format.md (``SCHEMA_VERSION``) with SWMR (single
writer, multiple readers): every dataset exists before SWMR starts and each step is appended with
resize + write + flush, so a reader can follow a running job and a job killed with SIGKILL leaves a
file that is valid up to its last flushed step. ``/steps/step`` is appended last: its length is
the number of committed steps. MemoryTrace keeps the rows in lists of NumPy arrays and makes no
HDF5 call (``hpc-moe run --trace none``): the baseline the writer's overhead is measured against.

Shape legend: S steps, L layers, M MoE layers, E experts, R ranks, P phases, K replicas, N events.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from hpc_moe.trace.checks import as_checked, check_moe_layers, check_placement, rank_columns
from hpc_moe.trace.reader import (
    COMM_PHASES,
    EVENT_DTYPE,
    EXCHANGE_DTYPE,
    EXCHANGE_KINDS,
    KINDS,
    PHASES,
    STATES,
    STATUS_DTYPE,
    UNITS,
    Trace,
    TraceError,
    _one_line,
    placement_dtype,
    read_trace,
    root_attributes,
)

if TYPE_CHECKING:
    from typing import Self  # Python >= 3.11; annotations are not evaluated at run time


class _Recorder:
    """What TraceWriter and MemoryTrace share: the layout, the meta attributes, the checks of every
    call. A subclass defines ``closed``, ``close(*, failed)``, ``trace()`` and keeps what the checks
    return: ``_store_step`` gets the row of each /steps dataset (dict in ``_specs`` order, "step"
    last), ``_store_records`` a name ("events" or "exchanges") and an array of its dtype.

    meta: the ``traceread.REQUIRED_META`` keys (configs as dicts or dataclasses, mpi_library_version: str,
      transport: str, cuda_aware: bool, array_backend: str, truncated: bool) plus optional
      command_line (str, default: this process's argv) and extra (a JSON-able dict).
    num_layers: L, model layers run (after --layers truncation).
    moe_layers: the model layer index of each MoE layer, ascending; M = len(moe_layers).
    placement: int [M or 1, E, K], expert -> ranks holding a replica, -1 padded; E comes from here.
    rank_map: one mapping per rank (R = len) with "host" (str), "gpu" (int CUDA ordinal, -1 on CPU)
      and "device" (str name), optionally "node" (int, e.g. simulated; default: from the hosts).
    phases: names of the P phase columns; comm_phases: the subset that is communication.
    """

    path: str

    def __init__(self, meta: Mapping[str, Any], *, num_layers: int, moe_layers: Sequence[int],
                 placement: np.ndarray, rank_map: Sequence[Mapping], phases: Sequence[str],
                 comm_phases: Sequence[str]) -> None:
        self.phases, self.comm_phases = tuple(phases), tuple(comm_phases)
        self.num_layers = int(num_layers)
        self._ranks = rank_columns(rank_map)
        self.moe_layers = check_moe_layers(moe_layers, self.num_layers)
        self.placement = check_placement(placement, len(self.moe_layers), len(rank_map))
        self.num_ranks = len(rank_map)
        self.num_experts = self.placement.shape[1]
        if set(self.comm_phases) - set(self.phases) or len(set(self.phases)) != len(self.phases):
            raise TraceError(f"phases {self.phases} must be unique and contain comm_phases {self.comm_phases}")
        self._attrs = root_attributes(meta, self._ranks, phases=self.phases, comm_phases=self.comm_phases,
                                      num_layers=self.num_layers, num_moe_layers=len(self.moe_layers),
                                      num_experts=self.num_experts)
        L, M, R, E, P = self.num_layers, len(self.moe_layers), self.num_ranks, self.num_experts, len(self.phases)
        # dtype and row shape of each /steps dataset, in append order: bulk rows first, "step" last.
        self._specs = {"phase_time_s": (np.float64, (L, R, P)), "expert_tokens": (np.int64, (M, E)),
                       "bytes_sent": (np.int64, (R, R)), "exchange_time_s": (np.float64, (L, R, len(EXCHANGE_KINDS), 2)),
                       "rank_tokens": (np.int64, (M, R)), "nodes_reached": (np.int64, (M, R, 3)),
                       "rank_time_s": (np.float64, (R,)), "kind": (np.int8, ()), "wall_time_s": (np.float64, ()),
                       **dict.fromkeys(("input_tokens", "output_tokens", "num_sequences"), (np.int64, ())),
                       **dict.fromkeys(("input_tokens_per_s", "output_tokens_per_s"), (np.float64, ())),
                       "step": (np.int64, ())}
        # Every placement with the step it took effect from (replicas padded with -1 to R ranks).
        self._placement_dtype = placement_dtype(self.placement.shape[0], E, R)
        self._last_step = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def append_step(self, *, step: int, kind: str, wall_time_s: float, input_tokens: int,
                    output_tokens: int, num_sequences: int, phase_time_s: np.ndarray,
                    expert_tokens: np.ndarray, bytes_sent: np.ndarray, exchange_time_s: np.ndarray | None = None,
                    rank_tokens: np.ndarray | None = None, nodes_reached: np.ndarray | None = None,
                    rank_time_s: np.ndarray | None = None) -> None:
        """Append one step (TraceWriter: and flush it, readable from then on, also after a crash).

        step: increasing step index; kind: "prefill" | "decode" | "mixed"; wall_time_s: > 0;
        phase_time_s: float [L, R, P] seconds; expert_tokens: int [M, E] routed tokens per expert
        (all ranks); bytes_sent: int [R, R] EP bytes sent[src, dst] over the step;
        exchange_time_s: float [L, R, 2, 2] seconds in flight and blocked per exchange kind;
        rank_tokens: int [M, R] token rows each rank received; nodes_reached: int [M, R, 3] per
        rank its tokens, the nodes they reached in all, the most one reached; rank_time_s: float [R]
        each rank's own time in the step, its clock from the barrier before the step to the end of
        its work (None: not recorded, zeros).
        """
        self._check_open()
        if int(step) <= self._last_step:
            raise TraceError(f"step {step} is not after the last appended step {self._last_step}")
        if kind not in KINDS:
            raise TraceError(f"kind {kind!r} is not one of {KINDS}")
        if not (np.isfinite(wall_time_s) and wall_time_s > 0):
            raise TraceError(f"wall_time_s must be a positive number, got {wall_time_s!r}")
        values = {name: as_checked(value, name, self._specs[name]) for name, value in
                  (("phase_time_s", phase_time_s), ("expert_tokens", expert_tokens), ("bytes_sent", bytes_sent),
                   *((name, np.zeros(self._specs[name][1], self._specs[name][0]) if value is None else value) for name, value in
                     (("exchange_time_s", exchange_time_s), ("rank_tokens", rank_tokens),
                      ("nodes_reached", nodes_reached), ("rank_time_s", rank_time_s))),
                   ("input_tokens", input_tokens), ("output_tokens", output_tokens),
                   ("num_sequences", num_sequences))}
        wall = float(wall_time_s)
        values.update(step=int(step), kind=KINDS.index(kind), wall_time_s=wall,
                      input_tokens_per_s=values["input_tokens"] / wall,
                      output_tokens_per_s=values["output_tokens"] / wall)
        self._store_step({name: np.asarray(values[name], dtype) for name, (dtype, _) in self._specs.items()})
        self._last_step = int(step)

    def append_events(self, *, step: int, rank, layer, phase, t_start_s, t_end_s) -> None:
        """Append timeline events of one step (TraceWriter: and flush); arguments broadcast to a
        common length N.

        rank, layer, phase (index into ``phases``): int [N] or scalars; t_start_s, t_end_s:
        float [N] seconds since the rank's own start of the step.
        """
        rows = self._checked_rows("event", EVENT_DTYPE, step, {"rank": self.num_ranks, "layer": self.num_layers,
                                                          "phase": len(self.phases)},
                             rank=rank, layer=layer, phase=phase, t_start_s=t_start_s, t_end_s=t_end_s)
        if np.any(rows["t_end_s"] < rows["t_start_s"]):
            raise TraceError("events need t_end_s >= t_start_s")
        self._store_records("events", rows)

    def append_exchanges(self, *, step: int, rank, layer, micro_batch, kind, t_start_s, t_post_s, t_done_s,
                         blocked_s) -> None:
        """Append the exchange records of one step (TraceWriter: and flush); arguments broadcast to
        a common length X. kind: index into EXCHANGE_KINDS; t_start_s, t_post_s, t_done_s: when the
        exchange started (the dispatch: its count exchange), its payload was posted and it was seen
        complete, seconds since the rank's own start of the step; blocked_s: seconds the rank
        waited for it."""
        rows = self._checked_rows("exchange", EXCHANGE_DTYPE, step, {"rank": self.num_ranks, "layer": self.num_layers,
                                                                "kind": len(EXCHANGE_KINDS)},
                             rank=rank, layer=layer, micro_batch=micro_batch, kind=kind, t_start_s=t_start_s,
                             t_post_s=t_post_s, t_done_s=t_done_s, blocked_s=blocked_s)
        if np.any(rows["blocked_s"] < 0):
            raise TraceError("exchanges need blocked_s >= 0")
        self._store_records("exchanges", rows)

    def append_placement(self, *, step: int, placement: np.ndarray, experts_moved: int = 0, bytes_moved: int = 0,
                         fetch_time_s: float = 0.0, post_time_s: float = 0.0, wait_time_s: float = 0.0) -> None:
        """Record a re-placement that takes effect from ``step`` (int [M or 1, E, K] as at open),
        with what its transfers moved and took (hpc_moe.trace.reader.placement_dtype; 0 where
        the experts were not fetched)."""
        self._check_open()
        p = check_placement(placement, len(self.moe_layers), self.num_ranks)
        row = np.full(1, -1, self._placement_dtype)
        row["step"] = int(step)
        if p.shape[:2] != row["placement"].shape[1:3]:
            raise TraceError(f"placement {p.shape} does not match the trace's {self.placement.shape}")
        row["placement"][0, :, :, :p.shape[2]] = p
        row["experts_moved"], row["bytes_moved"] = experts_moved, bytes_moved
        row["fetch_time_s"], row["post_time_s"], row["wait_time_s"] = fetch_time_s, post_time_s, wait_time_s
        self._store_records("placements", row)

    def _checked_rows(self, what: str, dtype: np.dtype, step: int, id_limits: dict, **columns) -> np.ndarray:
        """Rows of ``dtype`` for one step from columns broadcast to a common length, checked: ids
        (``id_limits``: name -> upper bound) whole and in range, times finite."""
        self._check_open()
        cols = dict(zip(columns, np.broadcast_arrays(*(np.asarray(a) for a in columns.values()))))
        rows = np.empty(np.size(next(iter(cols.values()))), dtype)
        rows["step"] = int(step)
        for name, col in cols.items():
            rows[name] = col.ravel()
        for name, hi in id_limits.items():
            # Ids may come as float64 columns (timing.Profiler.events_array): they must be whole.
            if rows.size and not (0 <= rows[name].min() and rows[name].max() < hi
                                  and np.array_equal(rows[name], cols[name].ravel())):
                raise TraceError(f"{what} {name} ids must be integers in [0, {hi})")
        if not all(np.all(np.isfinite(rows[n])) for n in dtype.names if n.endswith("_s")):
            raise TraceError(f"{what}s need finite times")
        return rows

    def _check_open(self) -> None:
        if self.closed:
            raise TraceError(f"trace {self.path} is closed")


class MemoryTrace(_Recorder):
    """A trace kept in memory: TraceWriter's arguments (no path, no overwrite), calls and checks.

    For ``hpc-moe run --trace none``: rows go into lists of NumPy arrays and nothing touches HDF5.
    ``trace()`` equals ``read_trace`` of a file written with the same calls, but for ``path``
    ("<memory>") and ``meta["created"]``.
    """

    path = "<memory>"

    def __init__(self, meta: Mapping[str, Any], *, num_layers: int, moe_layers: Sequence[int],
                 placement: np.ndarray, rank_map: Sequence[Mapping], phases: Sequence[str] = PHASES,
                 comm_phases: Sequence[str] = COMM_PHASES) -> None:
        super().__init__(meta, num_layers=num_layers, moe_layers=moe_layers, placement=placement,
                         rank_map=rank_map, phases=phases, comm_phases=comm_phases)
        self._steps: dict[str, list[np.ndarray]] = {name: [] for name in self._specs}
        self._records: dict[str, list[np.ndarray]] = {"events": [], "exchanges": [], "placements": []}
        self._state = "running"  # until close()

    @property
    def closed(self) -> bool:
        return self._state != "running"

    def close(self, *, failed: bool = False, stopped: bool = False) -> None:
        """Record the end state ("completed", "failed" when ``failed``, "stopped" when ``stopped``:
        ended early by a signal); idempotent."""
        if not self.closed:
            self._state = end_state(failed, stopped)

    def trace(self) -> Trace:
        """The steps and events appended so far; state "running" until closed."""
        steps = {name: np.stack(rows) if rows else np.empty((0, *shape), dtype)
                 for (name, rows), (dtype, shape) in zip(self._steps.items(), self._specs.values())}
        events, exchanges, placements = (
            np.concatenate(self._records[name]) if self._records[name] else np.empty(0, dtype)
            for name, dtype in (("events", EVENT_DTYPE), ("exchanges", EXCHANGE_DTYPE), ("placements", self._placement_dtype)))
        layout = {"moe_layers": self.moe_layers.copy(), "placement": self.placement.copy(),
                  **{f"rank_{name}": col.copy() for name, col in self._ranks.items()}}
        return Trace.from_contents(self.path, self._attrs, steps, events, exchanges, placements, layout, self._state)

    def _store_step(self, rows: dict[str, np.ndarray]) -> None:
        for name, row in rows.items():
            self._steps[name].append(row.copy())  # a row may be the caller's array, reused next step

    def _store_records(self, name: str, rows: np.ndarray) -> None:
        self._records[name].append(rows)


class TraceWriter(_Recorder):
    """Append-only SWMR writer of one trace file; rank 0 constructs one, the other ranks none.

    path: the final file (written in place; a file cut short is valid up to its last flushed step).
    overwrite: replace an existing file instead of refusing. meta and the layout arguments
    (num_layers ... comm_phases) are documented on ``_Recorder``, shared with MemoryTrace.
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any], *, num_layers: int,
                 moe_layers: Sequence[int], placement: np.ndarray, rank_map: Sequence[Mapping],
                 phases: Sequence[str] = PHASES, comm_phases: Sequence[str] = COMM_PHASES,
                 overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        super().__init__(meta, num_layers=num_layers, moe_layers=moe_layers, placement=placement,
                         rank_map=rank_map, phases=phases, comm_phases=comm_phases)
        self._t0 = time.monotonic()
        self._file = _create_file(self.path, overwrite)
        try:
            _write_static(self._file, self)
            _create_row_datasets(self._file, self)
            self._file.swmr_mode = True  # from here on: no new objects or attributes
            # h5py name lookups cost ~0.1 ms each: resolve the appended datasets once.
            self._rows = {name: _Rows(self._file[f"steps/{name}"]) for name in self._specs}
            for name in ("events", "exchanges", "placements"):
                self._rows[name] = _Rows(self._file[name])
        except (OSError, ValueError, TypeError, KeyError) as e:  # what h5py raises
            self._file.close()
            os.unlink(self.path)
            raise TraceError(f"cannot create trace {self.path}: {_one_line(e)}") from None

    @property
    def closed(self) -> bool:
        return not self._file.id.valid

    def flush(self) -> None:
        """Flush HDF5 buffers (appends already flush; this is for callers that want to be sure)."""
        self._check_open()
        self._file.flush()

    def close(self, *, failed: bool = False, stopped: bool = False) -> None:
        """Record the end state (as MemoryTrace.close) and close the file; idempotent."""
        if self.closed:
            return
        status = np.zeros((), STATUS_DTYPE)
        status["state"] = STATES.index(end_state(failed, stopped))
        status["steps_written"] = self._file["steps/step"].shape[0]
        status["elapsed_s"] = time.monotonic() - self._t0
        status["end_time_unix"] = time.time()
        self._file["status"][()] = status
        self._file.close()

    def trace(self) -> Trace:
        """read_trace of the file: all flushed steps (while open too: it reads with swmr=True)."""
        return read_trace(self.path)

    def _store_step(self, rows: dict[str, np.ndarray]) -> None:
        try:
            # In _specs order, /steps/step last: a reader trusts rows below len(/steps/step).
            for name, row in rows.items():
                self._rows[name].append(row[None])
            self._file.flush()
        except (OSError, ValueError) as e:  # e.g. the disk is full
            raise TraceError(f"cannot append step {rows['step']} to trace {self.path}: {_one_line(e)}") from None

    def _store_records(self, name: str, rows: np.ndarray) -> None:
        try:
            self._rows[name].append(rows)
            self._file.flush()
        except (OSError, ValueError) as e:
            raise TraceError(f"cannot append {name} to trace {self.path}: {_one_line(e)}") from None


def end_state(failed: bool, stopped: bool) -> str:
    return "failed" if failed else "stopped" if stopped else "completed"


def _create_file(path: str, overwrite: bool) -> h5py.File:
    if os.path.exists(path) and not overwrite:
        raise TraceError(f"trace {path} exists; refusing to overwrite it (--overwrite replaces it)")
    try:
        return h5py.File(path, "w" if overwrite else "x", libver="latest")
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot create trace {path}: {_one_line(e)}") from None


def _write_static(f: h5py.File, w: TraceWriter) -> None:
    for key, value in w._attrs.items():
        f.attrs[key] = value
    layout = f.create_group("layout")
    layout.create_dataset("moe_layers", data=w.moe_layers)
    layout.create_dataset("placement", data=w.placement)
    for name, col in w._ranks.items():
        text = col.dtype.kind == "U"  # h5py stores str as variable-length UTF-8 from objects
        layout.create_dataset(f"rank_{name}", data=col.astype(object) if text else col,
                              dtype=h5py.string_dtype() if text else col.dtype)
    status = f.create_dataset("status", shape=(), dtype=STATUS_DTYPE)
    status.attrs["states"] = json.dumps(list(STATES))
    status[()] = np.zeros((), STATUS_DTYPE)  # state 0 = running, until close() says otherwise


def _create_row_datasets(f: h5py.File, w: TraceWriter) -> None:
    kind_dtype = h5py.enum_dtype({k: i for i, k in enumerate(KINDS)}, basetype="i1")
    labels = {"phase_time_s": ("step", "layer", "rank", "phase"),
              "expert_tokens": ("step", "moe_layer", "expert"), "bytes_sent": ("step", "src", "dst"),
              "exchange_time_s": ("step", "layer", "rank", "kind", "in_flight|blocked"),
              "rank_tokens": ("step", "moe_layer", "rank"), "nodes_reached": ("step", "moe_layer", "rank", "tokens|nodes|max"),
              "rank_time_s": ("step", "rank")}
    steps = f.create_group("steps")
    for name, (dtype, tail) in w._specs.items():
        # Bulk rows get one chunk per step (one write each); scalar columns share chunks.
        chunk = (1, *tail) if tail else (1024,)
        ds = steps.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), chunks=chunk,
                                  dtype=kind_dtype if name == "kind" else dtype)
        ds.attrs["units"] = UNITS.get(name, "1")
        for axis, label in enumerate(labels.get(name, ("step",))):
            ds.dims[axis].label = label
    for name, dtype in (("events", EVENT_DTYPE), ("exchanges", EXCHANGE_DTYPE), ("placements", w._placement_dtype)):
        ds = f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(4096 if name != "placements" else 1,))
        ds.attrs["units"] = UNITS.get(name, "1")


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
