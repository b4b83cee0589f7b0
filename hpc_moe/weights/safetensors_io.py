"""The safetensors file format: an 8-byte little-endian header length, a JSON header, raw bytes.

Written here rather than taken from the ``safetensors`` package because its NumPy API cannot return
or store F8_E4M3 tensors, and because the reader must memory-map: a rank that owns a few experts of
a 671B checkpoint reads those experts' bytes and nothing else.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import ml_dtypes
import numpy as np

from hpc_moe.backend import bfloat16, float8_e4m3
from hpc_moe.errors import InputError

# safetensors dtype names <-> NumPy dtypes (a read-only table, not state).
ST_DTYPES: Mapping[str, np.dtype] = MappingProxyType({
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": bfloat16, "F8_E4M3": float8_e4m3, "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
})
_ST_NAMES = MappingProxyType({dt: name for name, dt in ST_DTYPES.items()})

class CheckpointError(InputError):
    """A checkpoint is unreadable or does not match its config; the message names tensor and file."""



@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype name, shape, absolute byte range [start, end)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse one .safetensors header (8-byte LE length, JSON) and check every entry against the file
    size; reads no tensor data. Raises CheckpointError naming the file (and tensor)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 0 or n > size - 8:
                raise CheckpointError(f"{path}: header length {n} does not fit in the file "
                                      f"({size} bytes): truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: bad header JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: bad header JSON (expected an object)")
    header.pop("__metadata__", None)
    base, out = 8 + n, {}
    for name, info in header.items():
        try:
            dtype, (b, e) = info["dtype"], info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            b, e = int(b), int(e)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"tensor {name!r} in {path}: malformed header entry {info!r}") from None
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path}: unknown dtype {dtype!r}")
        need = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if b < 0 or e - b != need:
            raise CheckpointError(f"tensor {name!r} in {path}: data_offsets [{b}, {e}] hold {e - b} "
                                  f"bytes but {dtype} {list(shape)} needs {need}")
        if base + e > size:
            raise CheckpointError(f"tensor {name!r} in {path}: data ends at byte {base + e} but the "
                                  f"file has {size} bytes (truncated)")
        out[name] = TensorInfo(path, dtype, shape, base + b, base + e)
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Write NumPy arrays (any dtype in :data:`ST_DTYPES`) as one .safetensors file, atomically."""
    arrays = {n: np.asarray(a) for n, a in tensors.items()}
    write_tensors_file(path, {n: (_ST_NAMES[a.dtype], a.shape) for n, a in arrays.items()}, arrays.items())


def write_tensors_file(path: str, specs: Mapping[str, tuple[str, tuple[int, ...]]],
                chunks: Iterable[tuple[str, np.ndarray]]) -> int:
    """Header from ``specs`` (name -> (dtype name, shape)), then the arrays ``chunks`` yields, each
    written at its own offset, so they may come in any order. Returns the data size in bytes.

    Data is laid out by descending item size, then name (as safetensors does): every tensor starts
    aligned to its item size with no gaps, which the reference reader requires.
    """
    order = sorted(specs, key=lambda n: (-ST_DTYPES[specs[n][0]].itemsize, n))
    offsets, pos = {}, 0
    for n in order:
        nbytes = math.prod(specs[n][1]) * ST_DTYPES[specs[n][0]].itemsize
        offsets[n], pos = (pos, pos + nbytes), pos + nbytes
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for n in sorted(specs):
        header[n] = {"dtype": specs[n][0], "shape": list(specs[n][1]), "data_offsets": list(offsets[n])}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    base, written = 8 + len(raw), set()
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(base + pos)
        for n, a in chunks:
            a = np.ascontiguousarray(a)
            if n not in specs or n in written or a.dtype != ST_DTYPES[specs[n][0]] or a.shape != tuple(specs[n][1]):
                raise CheckpointError(f"tensor {n!r} for {path}: {a.dtype} {list(a.shape)} does not "
                                      f"match the planned header entry {specs.get(n)} (or came twice)")
            f.seek(base + offsets[n][0])
            f.write(a.reshape(-1).view(np.uint8).data)
            written.add(n)
        if written != set(specs):
            raise CheckpointError(f"{path}: no data for {sorted(set(specs) - written)[:3]}")
    return pos


@contextlib.contextmanager
def atomic_file(path: str, mode: str) -> Iterator[Any]:
    """A file that appears at ``path`` complete (written, fsynced, renamed) or not at all."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
