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

import numpy as np

from hpc_moe.trace.checks import as_checked, check_moe_layers, check_placement, rank_columns
from hpc_moe.trace.h5file import (
    Rows,
    add_segment,
    copy_to_resume,
    create_file,
    create_row_datasets,
    discard_copy,
    write_static,
)
from hpc_moe.trace.reader import (
    COMM_PHASES,
    EVENT_DTYPE,
    EXCHANGE_DTYPE,
    EXCHANGE_KINDS,
    KINDS,
    PHASES,
    STATES,
    STATUS_DTYPE,
    Trace,
    TraceError,
    _one_line,
    placement_dtype,
    read_trace,
    root_attributes,
)
from hpc_moe.trace.segments import SEGMENT_DTYPE

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
        self._setup(num_layers, moe_layers, placement, rank_map, phases, comm_phases, columns=len(rank_map))
        self._attrs = root_attributes(meta, self._ranks, phases=self.phases, comm_phases=self.comm_phases,
                                      num_layers=self.num_layers, num_moe_layers=len(self.moe_layers),
                                      num_experts=self.num_experts)

    def _setup(self, num_layers, moe_layers, placement, rank_map, phases, comm_phases, columns: int) -> None:
        """The layout this recorder checks its calls against; columns: the trace's rank columns
        (the first run's ranks; a resumed run of fewer ranks pads its rows to them)."""
        self.phases, self.comm_phases = tuple(phases), tuple(comm_phases)
        self.num_layers = int(num_layers)
        self._ranks = rank_columns(rank_map)
        self.moe_layers = check_moe_layers(moe_layers, self.num_layers)
        self.placement = check_placement(placement, len(self.moe_layers), len(rank_map))
        self.num_ranks = len(rank_map)
        self.num_experts = self.placement.shape[1]
        if set(self.comm_phases) - set(self.phases) or len(set(self.phases)) != len(self.phases):
            raise TraceError(f"phases {self.phases} must be unique and contain comm_phases {self.comm_phases}")
        if self.num_ranks > columns:
            raise TraceError(f"{self.num_ranks} ranks do not fit the trace's {columns} rank columns")
        L, M, R, E, P = self.num_layers, len(self.moe_layers), self.num_ranks, self.num_experts, len(self.phases)
        self._columns = columns
        # dtype and row shape of each /steps dataset, in append order: bulk rows first, "step" last.
        self._specs = {"phase_time_s": (np.float64, (L, R, P)), "expert_tokens": (np.int64, (M, E)),
                       "bytes_sent": (np.int64, (R, R)), "exchange_time_s": (np.float64, (L, R, len(EXCHANGE_KINDS), 2)),
                       "rank_tokens": (np.int64, (M, R)), "nodes_reached": (np.int64, (M, R, 3)),
                       "rank_time_s": (np.float64, (R,)), "kind": (np.int8, ()), "wall_time_s": (np.float64, ()),
                       **dict.fromkeys(("input_tokens", "output_tokens", "num_sequences"), (np.int64, ())),
                       **dict.fromkeys(("input_tokens_per_s", "output_tokens_per_s", "time_unix"), (np.float64, ())),
                       "step": (np.int64, ())}
        # Every placement with the step it took effect from (replicas padded with -1 to the rank columns).
        self._placement_dtype = placement_dtype(self.placement.shape[0], E, columns)
        self._last_step = -1

    def padded(self, name: str, row: np.ndarray) -> np.ndarray:
        """A /steps row of this recorder's R ranks as the trace's rank columns hold it (zeros beyond R)."""
        axes = _RANK_AXES.get(name, ())
        if not axes or self.num_ranks == self._columns:
            return row
        out = np.zeros(tuple(self._columns if a in axes else n for a, n in enumerate(row.shape)), row.dtype)
        out[tuple(slice(0, n) for n in row.shape)] = row
        return out

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
                      output_tokens_per_s=values["output_tokens"] / wall, time_unix=time.time())
        self._store_step({name: self.padded(name, np.asarray(values[name], dtype))
                          for name, (dtype, _) in self._specs.items()})
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
        self._segments = np.array([(0, self.num_ranks, time.time(), -1, 0.0)], SEGMENT_DTYPE)

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
        return Trace.from_contents(self.path, self._attrs, steps, events, exchanges, placements, layout, self._state,
                                   self._segments)

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
        self._file = create_file(self.path, overwrite)
        try:
            write_static(self._file, self)
            create_row_datasets(self._file, self)
            self._start_swmr()
        except (OSError, ValueError, TypeError, KeyError) as e:  # what h5py raises
            self._file.close()
            os.unlink(self.path)
            raise TraceError(f"cannot create trace {self.path}: {_one_line(e)}") from None

    @classmethod
    def resume(cls, path: str | os.PathLike, *, steps: int, placement: np.ndarray, rank_map: Sequence[Mapping],
               after: str, previous_end_unix: float) -> TraceWriter:
        """Continue the trace at ``path`` (``hpc-moe run --resume``): its first ``steps``
        committed steps kept, a new segment of these ranks (at most the trace's) from step
        ``steps`` on, and this run's placement recorded as in force from there. after: the
        state the trace ended in; previous_end_unix: when its last step ended (0: unknown).
        The trace is checked by the caller (hpc_moe.apps.resume); the file at ``path`` is
        replaced by its continued copy once that is complete."""
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self._t0 = time.monotonic()
        self._file, tmp = copy_to_resume(self.path, steps)
        try:
            f = self._file
            self._setup(f.attrs["num_layers"], f["layout/moe_layers"][:], placement, rank_map,
                        json.loads(f.attrs["phases"]), json.loads(f.attrs["comm_phases"]),
                        columns=int(f["steps/rank_time_s"].shape[1]))
            self._last_step = steps - 1
            add_segment(f, steps, self._ranks, after_state=STATES.index(after), previous_end_unix=previous_end_unix)
            self._start_swmr()
            os.replace(tmp, self.path)
        except (TraceError, OSError, ValueError, TypeError, KeyError) as e:  # TraceError: this layout does not fit
            discard_copy(self._file, tmp)
            raise TraceError(f"cannot resume trace {self.path}: {_one_line(e)}") from None
        self.append_placement(step=steps, placement=placement)
        return self

    def _start_swmr(self) -> None:
        self._file.swmr_mode = True  # from here on: no new objects or attributes
        # h5py name lookups cost ~0.1 ms each: resolve the appended datasets once.
        self._rows = {name: Rows(self._file[f"steps/{name}"]) for name in self._specs}
        for name in ("events", "exchanges", "placements"):
            self._rows[name] = Rows(self._file[name])

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


# The rank axes of each per-step row (without the step axis): padded to the trace's rank columns.
_RANK_AXES = {"phase_time_s": (1,), "bytes_sent": (0, 1), "exchange_time_s": (1,), "rank_tokens": (1,),
              "nodes_reached": (1,), "rank_time_s": (0,)}
