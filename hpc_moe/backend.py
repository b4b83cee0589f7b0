"""The array backend: NumPy on CPU machines, CuPy on GPUs. The only module that imports cupy.

Everything else receives a :class:`Backend` and uses ``backend.xp`` for array math, so one code path
serves both. Compute dtype is float32 on CPU (exact comparisons) and bfloat16 on GPU (tensor cores),
where reductions (norms, softmax, router scores) are done in float32 by the callers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from hpc_moe.errors import InputError
from hpc_moe.timing import HOST_CLOCK

try:  # CuPy is an optional extra; a machine without a usable GPU falls back to NumPy.
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA library that fails to load
    _cupy = None

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3fn)

BACKENDS = ("auto", "numpy", "cupy")
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": bfloat16, "float64": np.dtype(np.float64)}


class BackendError(InputError):
    pass


def gpu_count() -> int:
    """Number of CUDA devices CuPy can use (0 when CuPy or a GPU is missing)."""
    if _cupy is None:
        return 0
    try:
        return int(_cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@dataclass(frozen=True)
class Backend:
    """An array module plus the compute dtype and the device it is bound to.

    name: "numpy" or "cupy"; xp: the module; dtype: compute dtype of activations and weights;
    device: human-readable device name (CPU model or GPU name), device_id: CUDA ordinal or -1.
    """

    name: str
    xp: Any
    dtype: np.dtype
    device: str
    device_id: int = -1

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asarray(self, a, dtype=None):
        """Host or device array -> this backend's array in ``dtype`` (default: compute dtype)."""
        return self.xp.asarray(a, dtype=self.dtype if dtype is None else dtype)

    def to_numpy(self, a) -> np.ndarray:
        """Any array -> a NumPy array on the host (a copy for device arrays)."""
        if self.is_gpu and isinstance(a, _cupy.ndarray):
            return _cupy.asnumpy(a)
        return np.asarray(a)

    def phase_clock(self):
        """What times compute phases (hpc_moe.timing.Profiler): the host's clock on a CPU, CUDA
        events on the current stream on a GPU (no device synchronisation per phase)."""
        return DeviceClock() if self.is_gpu else HOST_CLOCK

    def phase_ranges(self):
        """What names the profiler's phases for an outside profiler (hpc_moe.timing.Profiler's
        ``ranges``): NVTX ranges on a GPU, which ``nsys profile`` draws over the kernels; None on a
        CPU, or where this CuPy has no NVTX."""
        if not self.is_gpu or not getattr(getattr(_cupy.cuda, "nvtx", None), "available", True):
            return None
        return NvtxRanges()

    def synchronize(self) -> None:
        """Wait for queued device work; MPI does not synchronise CUDA streams for us."""
        if self.is_gpu:
            _cupy.cuda.get_current_stream().synchronize()

    def empty_host(self, shape, dtype) -> np.ndarray:
        """A host buffer for MPI; page-locked on GPU runs so that copies to/from it are DMA."""
        dtype = np.dtype(dtype)
        if not self.is_gpu:
            return np.empty(shape, dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        mem = _cupy.cuda.alloc_pinned_memory(max(n, 1))
        return np.frombuffer(mem, dtype, int(np.prod(shape))).reshape(shape)

    def pointer_is_device(self, a) -> bool:
        return self.is_gpu and isinstance(a, _cupy.ndarray)

    def free_bytes(self) -> int:
        """Memory this process could still allocate: the GPU's free memory, or the host's
        MemAvailable (shared by the ranks of the node)."""
        if self.is_gpu:
            return int(_cupy.cuda.runtime.memGetInfo()[0])
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def describe(self) -> dict:
        return {"backend": self.name, "dtype": str(self.dtype), "device": self.device,
                "device_id": self.device_id}


def get_backend(kind: str = "auto", dtype: str | None = None, local_rank: int = 0) -> Backend:
    """Pick the array module and bind this process to a GPU.

    kind: "numpy", "cupy" or "auto" (cupy when a GPU is visible); dtype: "float32", "bfloat16" or
    None (float32 on CPU, bfloat16 on GPU); local_rank: this process's index among the ranks of its
    node, so that rank i of a node drives GPU i mod (GPUs on the node).
    """
    if kind not in BACKENDS:
        raise BackendError(f"unknown backend {kind!r} (choose {', '.join(BACKENDS)})")
    if dtype is not None and dtype not in _DTYPES:
        raise BackendError(f"unknown dtype {dtype!r} (choose {', '.join(_DTYPES)})")
    ngpu = gpu_count()
    if kind == "cupy" and ngpu == 0:
        raise BackendError("backend cupy asked for, but CuPy cannot see a GPU on this machine")
    if kind == "numpy" or (kind == "auto" and ngpu == 0):
        return Backend("numpy", np, _DTYPES[dtype or "float32"], _cpu_name())
    if (dtype or "bfloat16") == "bfloat16" and int(_cupy.__version__.split(".")[0]) < 14:
        raise BackendError(f"bfloat16 on the GPU needs CuPy >= 14 (this is {_cupy.__version__}): install "
                           "cupy-cuda12x>=14 or cupy-cuda13x>=14 (pip install .[gpu]), or pass --dtype float32")
    dev = local_rank % ngpu
    _cupy.cuda.Device(dev).use()
    props = _cupy.cuda.runtime.getDeviceProperties(dev)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return Backend("cupy", _cupy, _DTYPES[dtype or "bfloat16"], name, dev)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


# ---- device <-> host copies and NCCL, for the dispatch transports (hpc_moe/transport.py) ----------
def copy_to_host(backend: Backend, src, out: np.ndarray) -> np.ndarray:
    """Copy ``src`` (host or device array) into the host array ``out`` (same shape and dtype, e.g.
    pinned from empty_host); returns when the bytes are there, so MPI may read ``out`` at once."""
    if backend.pointer_is_device(src):
        _cupy.cuda.get_current_stream().synchronize()  # src may still be being written
        src.get(out=out)  # blocking device -> host copy
    else:
        np.copyto(out, src)
    return out


class DeviceClock:
    """Marks are CUDA events recorded on the current stream; seconds between two are read once
    the device has reached them (settle: one synchronisation, at the step's end)."""

    def mark(self):
        ev = _cupy.cuda.Event()
        ev.record(_cupy.cuda.get_current_stream())
        return ev

    def seconds(self, start, end) -> float:
        return _cupy.cuda.get_elapsed_time(start, end) / 1e3

    def settle(self) -> None:
        _cupy.cuda.get_current_stream().synchronize()


class NvtxRanges:
    """NVTX ranges (cupy.cuda.nvtx): push opens one on this thread, pop closes the innermost."""

    def push(self, label: str) -> None:
        _cupy.cuda.nvtx.RangePush(label)

    def pop(self) -> None:
        _cupy.cuda.nvtx.RangePop()


def record_event(backend: Backend, stream=None):
    """A CUDA event recorded on ``stream`` (default: the current one; ``.done``, ``.synchronize()``),
    None on CPU."""
    if not backend.is_gpu:
        return None
    ev = _cupy.cuda.Event(disable_timing=True)
    ev.record(stream or _cupy.cuda.get_current_stream())
    return ev


def nccl_available() -> bool:
    if _cupy is None:
        return False
    try:
        from cupy.cuda import nccl
        return bool(nccl.available)
    except Exception:  # noqa: BLE001 (a CuPy build without NCCL fails to import in several ways)
        return False


NCCL_UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id, 128 bytes (MPI broadcasts it as MPI.BYTE). CuPy 14 returns bytes;
    older CuPy a tuple of signed chars."""
    from cupy.cuda import nccl
    uid = nccl.get_unique_id()
    return bytes(uid) if isinstance(uid, (bytes, bytearray)) else bytes(b & 0xFF for b in uid)


def nccl_communicator(nranks: int, uid: bytes, rank: int):
    """NCCL communicator of ``nranks`` from a unique id made by nccl_unique_id on one rank."""
    from cupy.cuda import nccl
    return nccl.NcclCommunicator(int(nranks), uid, int(rank))


def comm_stream():
    """A CUDA stream of its own for communication (non-blocking: it does not wait for the legacy
    default stream), so NCCL transfers run beside the compute stream's kernels."""
    return _cupy.cuda.Stream(non_blocking=True)


def wait_event(event) -> None:
    """Make the current (compute) stream wait for ``event`` without blocking the host."""
    _cupy.cuda.get_current_stream().wait_event(event)


def nccl_alltoallv(comm, send, send_offsets, send_nbytes, recv, recv_offsets, recv_nbytes, stream=None) -> None:
    """Grouped NCCL send/recv of byte ranges of contiguous device arrays: peer p gets
    send[send_offsets[p] : +send_nbytes[p]] (offsets and sizes in bytes). Enqueued on ``stream``
    (default: the current one) once the current stream's work so far (what wrote ``send``) is done."""
    from cupy.cuda import nccl
    current = _cupy.cuda.get_current_stream()
    if stream is not None and stream is not current:
        ready = _cupy.cuda.Event(disable_timing=True)
        ready.record(current)
        stream.wait_event(ready)
    target = (stream or current).ptr
    sptr, rptr = send.data.ptr, recv.data.ptr
    nccl.groupStart()
    try:
        for p in range(len(send_nbytes)):
            if send_nbytes[p]:
                comm.send(sptr + int(send_offsets[p]), int(send_nbytes[p]), nccl.NCCL_UINT8, p, target)
            if recv_nbytes[p]:
                comm.recv(rptr + int(recv_offsets[p]), int(recv_nbytes[p]), nccl.NCCL_UINT8, p, target)
    finally:
        nccl.groupEnd()
