"""The HDF5 side of the trace writer (hpc_moe.trace.writer): the file's static contents, its
appendable datasets, and the copy a resumed run continues.

The layout is docs/trace-format.md; every dataset exists before the writer switches to SWMR.
"""
from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np

from hpc_moe.trace.schema import (
    EVENT_DTYPE,
    EXCHANGE_DTYPE,
    KINDS,
    STATES,
    STATUS_DTYPE,
    UNITS,
    TraceError,
    _one_line,
)
from hpc_moe.trace.segments import SEGMENT_DTYPE, segment_group


def create_file(path: str, overwrite: bool) -> h5py.File:
    if os.path.exists(path) and not overwrite:
        raise TraceError(f"trace {path} exists; refusing to overwrite it (--overwrite replaces it)")
    try:
        return h5py.File(path, "w" if overwrite else "x", libver="latest")
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot create trace {path}: {_one_line(e)}") from None


def write_static(f: h5py.File, w) -> None:
    for key, value in w._attrs.items():
        f.attrs[key] = value
    layout = f.create_group("layout")
    layout.create_dataset("moe_layers", data=w.moe_layers)
    layout.create_dataset("placement", data=w.placement)
    write_rank_columns(layout, w._ranks)
    status = f.create_dataset("status", shape=(), dtype=STATUS_DTYPE)
    status.attrs["states"] = json.dumps(list(STATES))
    status[()] = np.zeros((), STATUS_DTYPE)  # state 0 = running, until close() says otherwise


def create_row_datasets(f: h5py.File, w) -> None:
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
    f.create_dataset("segments", shape=(0,), maxshape=(None,), dtype=SEGMENT_DTYPE, chunks=(16,))
    add_segment(f, 0, w._ranks, after_state=-1, previous_end_unix=0.0)


def write_rank_columns(group: h5py.Group, ranks: dict[str, np.ndarray]) -> None:
    """The rank_<name> datasets [R] of a layout (hpc_moe.trace.checks.rank_columns)."""
    for name, col in ranks.items():
        text = col.dtype.kind == "U"  # h5py stores str as variable-length UTF-8 from objects
        group.create_dataset(f"rank_{name}", data=col.astype(object) if text else col,
                             dtype=h5py.string_dtype() if text else col.dtype)


def add_segment(f: h5py.File, first_step: int, ranks: dict[str, np.ndarray], *, after_state: int,
                previous_end_unix: float) -> None:
    """Record a segment starting now at measured step ``first_step`` with these rank columns
    (hpc_moe.trace.segments); before SWMR starts (it may create a group)."""
    seg = f["segments"]
    k = seg.shape[0]
    if k:
        write_rank_columns(f.create_group(segment_group(k)), ranks)
    row = np.array([(first_step, len(ranks["node"]), time.time(), after_state, previous_end_unix)], SEGMENT_DTYPE)
    seg.resize((k + 1,))
    seg[k] = row[0]


def copy_to_resume(path: str, steps: int) -> tuple[h5py.File, str]:
    """A copy of the trace at ``path`` cut to its first ``steps`` committed steps (their events,
    exchanges and re-placements; no segment without steps), open for writing and not yet SWMR,
    at a path beside it that ``os.replace`` then moves over the original. A file whose SWMR
    writer was killed cannot be opened for writing again (HDF5 wants h5clear), and the
    original stays whole until the copy is complete."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.resume")
    dst = None
    try:
        with h5py.File(path, "r", swmr=True) as src:
            dst = h5py.File(tmp, "w", libver="latest")
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)
        _cut(dst, steps)
    except (OSError, ValueError, KeyError) as e:
        discard_copy(dst, tmp)
        raise TraceError(f"cannot copy trace {path} to resume it: {_one_line(e)}") from None
    return dst, tmp


def _cut(dst: h5py.File, steps: int) -> None:
    """Cut the copy to its first ``steps`` steps: the rows of an append cut short go too."""
    for ds in dst["steps"].values():
        ds.resize(steps, axis=0)
    for name in ("events", "exchanges", "placements"):
        ds = dst[name]
        keep = ds["step"][:] < steps
        rows = ds[:][keep]
        ds.resize((len(rows),))
        if len(rows):
            ds[:] = rows
    seg = dst["segments"]
    kept = int(np.sum(seg["first_step"][:] < steps)) or 1  # the first segment stays, stepless or not
    for k in range(kept, seg.shape[0]):
        del dst[segment_group(k)]
    seg.resize((kept,))
    dst["status"][()] = np.zeros((), STATUS_DTYPE)


def discard_copy(dst: h5py.File | None, tmp: str) -> None:
    """Close and remove a resume's copy (the original was never touched)."""
    if dst is not None and dst.id.valid:
        dst.close()
    if os.path.exists(tmp):
        os.unlink(tmp)


class Rows:
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
