"""Transports for dispatch/combine: how rows of bytes move between the ranks of the EP group.

A transport moves 2-D uint8 arrays of fixed-width rows (counts and offsets in rows) between the
ranks of the EP communicator:

* ``host``: MPI on host buffers. NumPy runs hand their arrays to MPI as they are; CuPy runs stage
  through page-locked host buffers (``Backend.empty_host``), copied after the stream is synchronised
  (mpi4py does not synchronise streams for us).
* ``shm`` (CPU, every rank of the channel on one node): MPI-3 shared-memory windows
  (hpc_moe.ep.shm); the flat exchange on it is hpc_moe.ep.shm_exchange's, where senders write
  their rows straight into the receivers' memory. Host MPI underneath for everything else
  (point-to-point of the pipelined algorithm, the benchmarks' raw floor).
* ``cuda-aware``: MPI on device buffers. Chosen only when the library says it is CUDA-aware AND a
  start-up Ialltoallv on device buffers returns the right bytes on every rank (Open MPI documents
  that even its CUDA-aware builds refuse device buffers in non-blocking collectives).
* ``nccl``: grouped ncclSend/ncclRecv of per-peer byte ranges through CuPy; the unique id travels
  by MPI Bcast. Completion is a CUDA event, so ``Test`` polls the event.

Every choice is collective: the ranks agree (Allreduce) before one is made, and rank 0 logs it once.
Rows travel as an MPI contiguous datatype of ``width`` bytes, so counts stay small integers.

Legend: M rows sent, N rows received, W bytes per row, P peers.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
from mpi4py import MPI

from hpc_moe import backend as _bk
from hpc_moe.backend import Backend
from hpc_moe.ep.choices import TRANSPORTS
from hpc_moe.ep.shm import NotContiguous, SharedSlots, on_one_node
from hpc_moe.errors import InputError


class TransportError(InputError):
    """A transport asked for by name cannot run here (the message says why)."""


# ---- transports ------------------------------------------------------------------------------
class MpiTransport:
    """MPI on host buffers (``host``, pinned staging on GPU runs) or device buffers (``cuda-aware``)."""

    supports_p2p = True

    def __init__(self, comm: MPI.Comm, backend: Backend, device_buffers: bool):
        self.comm, self.backend = comm, backend
        self.device_buffers = device_buffers
        self.name = "cuda-aware" if device_buffers else "host"
        self._staging = backend.is_gpu and not device_buffers
        self._pooled = not device_buffers  # host buffers: reused, so their pages are touched once
        self._types: dict[int, MPI.Datatype] = {}
        self._free: dict[int, list[np.ndarray]] = {}
        self._owner: dict[int, tuple[int, np.ndarray]] = {}

    def rowtype(self, width: int) -> MPI.Datatype:
        t = self._types.get(width)
        if t is None:
            t = self._types[width] = MPI.BYTE.Create_contiguous(width).Commit()
        return t

    def scratch(self, rows: int, width: int):
        """A backend uint8 [rows, width] array to build rows in; give it back with release()."""
        if self._pooled and not self._staging:
            return self._take(rows, width)
        return self.backend.xp.empty((max(rows, 1), width), dtype=np.uint8)[:rows]  # never a NULL pointer

    def to_wire(self, words):
        """Backend uint8 [M, W] -> a buffer MPI may read now (pinned copy, or the array itself)."""
        if self._staging:
            host = self._take(*words.shape)
            return _bk.copy_to_host(self.backend, words, host)
        if self.device_buffers:
            self.backend.synchronize()
        return words

    def empty(self, rows: int, width: int):
        """A receive buffer of at least one row (zero-size buffers upset some MPI bindings);
        give it back with release() once nothing reads it."""
        rows = max(rows, 1)
        if self._pooled:
            return self._take(rows, width)
        return self.backend.xp.empty((rows, width), dtype=np.uint8)

    def from_wire(self, wire, rows: int):
        """The first ``rows`` rows of a received buffer as a backend array."""
        if not self._staging:
            return wire[:rows]
        dev = self.backend.xp.asarray(wire[:rows])
        self.backend.synchronize()  # the host buffer goes back to the pool next
        return dev

    def release(self, *wires) -> None:
        for w in wires:
            cap_base = self._owner.pop(id(w), None)
            if cap_base is not None:
                self._free.setdefault(cap_base[0], []).append(cap_base[1])

    def ialltoallv(self, send, send_counts_P, recv, recv_counts_P):
        t = self.rowtype(send.shape[1])
        sc, rc = _ints(send_counts_P), _ints(recv_counts_P)
        return self.comm.Ialltoallv([send, (sc, _offsets(sc)), t], [recv, (rc, _offsets(rc)), t])

    @staticmethod
    def test_all(reqs) -> bool:
        """Whether every request of this transport's (ialltoallv, isend, irecv) is done."""
        return MPI.Request.Testall(reqs)

    @staticmethod
    def wait_all(reqs) -> None:
        MPI.Request.Waitall(reqs)

    def isend(self, wire, start: int, rows: int, peer: int, tag: int) -> MPI.Request:
        return self.comm.Isend([wire[start:start + rows], rows, self.rowtype(wire.shape[1])], peer, tag)

    def irecv(self, wire, start: int, rows: int, peer: int, tag: int) -> MPI.Request:
        return self.comm.Irecv([wire[start:start + rows], rows, self.rowtype(wire.shape[1])], peer, tag)

    def close(self) -> None:
        for t in self._types.values():
            t.Free()
        self._types.clear()
        self._free.clear()
        self._owner.clear()

    def _take(self, rows: int, width: int) -> np.ndarray:
        need = rows * width
        cap = 1 << max(16, (need - 1).bit_length())  # power-of-two classes keep the pool small
        pool = self._free.get(cap)
        base = pool.pop() if pool else self.backend.empty_host((cap,), np.uint8)  # numpy: plain
        view = base[:need].reshape(rows, width)
        self._owner[id(view)] = (cap, base)
        return view


class ShmTransport(MpiTransport):
    """Host MPI plus the shared-memory windows of the channel (``slots``, hpc_moe.ep.shm.SharedSlots):
    exchanges that see ``slots`` write rows into their peers' memory themselves. Collective."""

    def __init__(self, comm: MPI.Comm, backend: Backend):
        super().__init__(comm, backend, False)
        self.name = "shm"
        self.slots = SharedSlots(comm)

    def close(self) -> None:
        self.slots.close()
        super().close()


class _EventRequest:
    """MPI-request look-alike over a CUDA event on the communication stream. Wait() makes the
    compute stream wait for it (kernels that read the received rows run after them) without
    blocking the host; the request holds the buffers until then, since CuPy's pool would hand
    their memory to the compute stream while the communication stream still uses it."""

    def __init__(self, event, *buffers):
        self._event, self._buffers = event, buffers

    def Test(self) -> bool:
        return self._event is None or bool(self._event.done)

    def Wait(self) -> None:
        if self._event is not None:
            _bk.wait_event(self._event)
        self._buffers = ()


class NcclTransport:
    """NCCL grouped send/recv on device buffers, on a stream of its own; no MPI point-to-point
    (``supports_p2p`` False). Every rank enqueues its transfers in the same order (exchanges post
    their payloads in call order), which NCCL needs: different orders across ranks deadlock."""

    name = "nccl"
    supports_p2p = False
    device_buffers = True

    def __init__(self, comm: MPI.Comm, backend: Backend):
        """Collective. A failure on any rank (making the id on rank 0, the communicator anywhere)
        is a TransportError on every rank, agreed on before any rank goes on to its next collective."""
        self.comm, self.backend = comm, backend
        uid, why = bytearray(_bk.NCCL_UNIQUE_ID_BYTES), None
        if comm.Get_rank() == 0:
            try:
                uid[:] = _bk.nccl_unique_id()
            except Exception as e:  # noqa: BLE001 (whatever CuPy or NCCL raise, every rank must hear of it)
                why = f"rank 0 cannot make an NCCL unique id: {e}"
        why = comm.bcast(why, root=0)
        if why is None:
            comm.Bcast([uid, MPI.BYTE], root=0)
            try:
                self._nccl = _bk.nccl_communicator(comm.Get_size(), bytes(uid), comm.Get_rank())
                self._stream = _bk.comm_stream()
            except Exception as e:  # noqa: BLE001
                why = f"rank {comm.Get_rank()}: {e}"
        whys = [w for w in comm.allgather(why) if w is not None]
        if whys:
            raise TransportError(f"nccl transport: {whys[0]}")

    def scratch(self, rows: int, width: int):
        return self.backend.xp.empty((max(rows, 1), width), dtype=np.uint8)[:rows]

    def to_wire(self, words):
        return words  # the communication stream waits for the compute stream's kernels (nccl_alltoallv)

    def empty(self, rows: int, width: int):
        return self.backend.xp.empty((max(rows, 1), width), dtype=np.uint8)

    def from_wire(self, wire, rows: int):
        return wire[:rows]

    def release(self, *wires) -> None:
        pass

    @staticmethod
    def test_all(reqs) -> bool:
        """Whether every request (an _EventRequest, which MPI's Testall cannot take) is done."""
        return all(r.Test() for r in reqs)

    @staticmethod
    def wait_all(reqs) -> None:
        for r in reqs:
            r.Wait()

    def ialltoallv(self, send, send_counts_P, recv, recv_counts_P):
        w = send.shape[1]
        sc, rc = np.asarray(send_counts_P) * w, np.asarray(recv_counts_P) * w
        _bk.nccl_alltoallv(self._nccl, send, _offsets(sc), sc, recv, _offsets(rc), rc, self._stream)
        return _EventRequest(_bk.record_event(self.backend, self._stream), send, recv)

    def close(self) -> None:
        self._nccl = None
        self._stream = None


def make_transport(comm: MPI.Comm, backend: Backend, kind: str = "auto", need_p2p: bool = False,
                   logger: logging.Logger | None = None):
    """Pick a transport (collective on ``comm``). On the CPU, ``auto`` takes shared memory when
    every rank of comm is on one node, else host MPI. On GPUs, ``auto`` prefers cuda-aware MPI
    (if proven), then NCCL (unless ``need_p2p``: the pipelined algorithm needs MPI point-to-point),
    then pinned host staging. A transport asked for by name that cannot run raises TransportError."""
    log = logger or logging.getLogger(__name__)
    if kind not in TRANSPORTS:
        raise TransportError(f"unknown transport {kind!r} (choose {', '.join(TRANSPORTS)})")
    if not backend.is_gpu:
        if kind in ("cuda-aware", "nccl"):
            raise TransportError(f"transport {kind} needs the cupy backend (this run is on numpy)")
        if kind == "host":
            return _chosen(comm, log, MpiTransport(comm, backend, False), "CPU run: MPI on host arrays")
        why = _shm_problem(comm)
        if why is None:
            try:
                t = ShmTransport(comm, backend)
            except (MPI.Exception, NotContiguous) as e:  # e.g. a /dev/shm too small for the windows
                t, why = None, f"the shared windows could not be made: {e}"
            if _all(comm, why is None):
                return _chosen(comm, log, t, "CPU run, every rank on one node: writes into shared memory")
            why = why or "the shared windows could not be made on another rank"
        if kind == "shm":
            raise TransportError(f"transport shm cannot run here: {why}")
        return _chosen(comm, log, MpiTransport(comm, backend, False), f"CPU run: MPI on host arrays ({why})")
    if kind == "shm":
        raise TransportError("transport shm needs the numpy backend (this run is on cupy)")
    why_not = []
    if kind in ("auto", "cuda-aware"):
        err = _cuda_aware_problem(comm, backend)
        if err is None:
            return _chosen(comm, log, MpiTransport(comm, backend, True),
                           "MPI is CUDA-aware and passed the device-buffer Ialltoallv self-test")
        if kind == "cuda-aware":
            raise TransportError(f"transport cuda-aware asked for, but {err}")
        why_not.append(f"not cuda-aware: {err}")
    if kind in ("auto", "nccl"):
        if need_p2p:
            if kind == "nccl":
                raise TransportError("transport nccl cannot run the pipelined algorithm "
                                     "(it needs MPI Isend/Irecv); use host or cuda-aware")
            why_not.append("not nccl: the pipelined algorithm needs MPI point-to-point")
        elif _all(comm, _bk.nccl_available()):
            try:
                t, err = NcclTransport(comm, backend), None
            except Exception as e:  # noqa: BLE001 (e.g. two ranks on one GPU: NCCL refuses)
                t, err = None, f"NCCL init failed: {type(e).__name__}: {e}"
            if _all(comm, err is None):
                return _chosen(comm, log, t, "; ".join(why_not + ["NCCL via CuPy"]))
            if kind == "nccl":
                raise TransportError(f"transport nccl asked for, but {err or 'NCCL init failed on another rank'}")
            why_not.append(f"not nccl: {err or 'NCCL init failed on another rank'}")
        elif kind == "nccl":
            raise TransportError("transport nccl asked for, but CuPy has no NCCL on some rank")
        else:
            why_not.append("not nccl: CuPy has no NCCL on some rank")
    return _chosen(comm, log, MpiTransport(comm, backend, False),
                   "; ".join(why_not + ["MPI through pinned host buffers"]))


def _chosen(comm, log, transport, reason: str):
    if comm.Get_rank() == 0:
        log.info("dispatch transport: %s (%s)", transport.name, reason)
    return transport


def _all(comm: MPI.Comm, ok: bool) -> bool:
    flag = np.array([1 if ok else 0], dtype=np.int32)
    comm.Allreduce(MPI.IN_PLACE, [flag, MPI.INT32_T], op=MPI.MIN)
    return bool(flag[0])


def _shm_problem(comm: MPI.Comm) -> str | None:
    """None when every rank of comm shares memory with every other, else why not (collective)."""
    return None if on_one_node(comm) else "its ranks are on more than one node"


def mpi_cuda_support() -> int:
    """1 if the MPI library says it is CUDA-aware, 0 if it says not, -1 if it cannot say."""
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        return int(bool(query()))
    try:
        lib = ctypes.CDLL(MPI.__file__)  # dlsym searches libmpi, which the extension links
        return int(bool(lib.MPIX_Query_cuda_support()))
    except (OSError, AttributeError):
        return -1


def _cuda_aware_problem(comm: MPI.Comm, backend: Backend) -> str | None:
    """None when device buffers work in Ialltoallv on every rank, else the reason they do not."""
    support = mpi_cuda_support()
    if not _all(comm, support == 1):
        return ("the MPI library cannot say it is (no MPIX_Query_cuda_support)" if support < 0
                else "MPIX_Query_cuda_support() is 0 on some rank")
    t = MpiTransport(comm, backend, True)
    try:
        p, r, w = comm.Get_size(), comm.Get_rank(), 16
        sc = np.array([(r + q) % 3 + 1 for q in range(p)])
        rc = np.array([(q + r) % 3 + 1 for q in range(p)])
        send = np.repeat(np.array([(r * p + q) % 251 for q in range(p)], dtype=np.uint8), sc * w)
        want = np.repeat(np.array([(q * p + r) % 251 for q in range(p)], dtype=np.uint8), rc * w)
        xp = backend.xp
        dsend = xp.asarray(send.reshape(-1, w))
        drecv = xp.zeros((int(rc.sum()), w), dtype=np.uint8)
        backend.synchronize()
        t.ialltoallv(dsend, sc, drecv, rc).Wait()
        reason = (None if np.array_equal(backend.to_numpy(drecv).reshape(-1), want)
                  else "the device-buffer Ialltoallv self-test returned wrong bytes")
    except Exception as e:  # noqa: BLE001 (a library that refuses device pointers may raise anything)
        reason = f"the device-buffer self-test raised {type(e).__name__}: {e}"
    finally:
        t.close()
    if _all(comm, reason is None):
        return None
    return reason or "the device-buffer self-test failed on another rank"


def _ints(counts) -> list[int]:
    return [int(c) for c in counts]


def _offsets(counts) -> list[int] | np.ndarray:
    if isinstance(counts, np.ndarray):
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out, acc = [], 0
    for c in counts:
        out.append(acc)
        acc += c
    return out
