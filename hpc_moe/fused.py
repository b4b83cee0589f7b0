"""Fused row kernels for the CPU (numba, optional): the weighted sum of gathered rows in one pass.

Both reductions of an MoE layer (the receiver's weighted sum of its experts' outputs, the source's
sum of the rows that come back) gather rows by an index table, widen bfloat16 to float32, sum,
and narrow again. NumPy needs four array operations per cache block for that
(hpc_moe.rowops.weighted_rows_sum, the reference); these kernels read each row once and write
each result once. They compute exactly what the NumPy path computes, in the same order (the
first term assigned, then ``acc += w * x`` term by term, with no fused multiply-add: numba does
not contract without fastmath; round-to-nearest-even to bfloat16), so results are bitwise the
same whichever path runs (tests/test_rowops.py).

numba is the ``fast`` extra. It costs about 0.4 s to import per process, so the kernels are only
loaded for rows at least MIN_WIDTH values wide, where a reduction costs milliseconds; compiled
code is cached next to this file (``cache=True``), so only a machine's first run compiles.

Legend: R rows, D values per row, T output rows, C columns of the index table.
"""
from __future__ import annotations

import functools

import numpy as np

from hpc_moe.backend import bfloat16

MIN_WIDTH = 1024
CHUNK = 512  # values summed at a time: 2 kB of sums and 2 kB of widened values


@functools.cache
def _compiled():
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def rows_sum(words_RD, shift, index_TC, count_T, weight_TC, out_TD, narrow):
        """out[t] = sum over c < count[t] of weight[t, c] * rows[index[t, c]] (float32 in between).
        words_RD: the rows' bits, uint16 (bfloat16: shift 16) or uint32 (float32: shift 0);
        out_TD: uint16 (narrow: to bfloat16, round to nearest even) or uint32 (float32 bits).
        A chunk of CHUNK values at a time, so that the widened values and the sums stay in L1."""
        n_t, d = out_TD.shape
        bits = np.empty(CHUNK, np.uint32)
        x = bits.view(np.float32)
        acc = np.empty(CHUNK, np.float32)
        acc_bits = acc.view(np.uint32)
        for t in range(n_t):
            for j0 in range(0, d, CHUNK):
                m = min(CHUNK, d - j0)
                for c in range(count_T[t]):
                    row = words_RD[index_TC[t, c], j0:j0 + m]
                    if shift:  # a constant shift in the loop: it vectorises
                        for j in range(m):
                            bits[j] = np.uint32(row[j]) << np.uint32(16)
                    else:
                        for j in range(m):
                            bits[j] = row[j]
                    w = weight_TC[t, c]
                    if c == 0:
                        for j in range(m):
                            acc[j] = w * x[j]
                    else:
                        for j in range(m):
                            acc[j] += w * x[j]
                if count_T[t] == 0:
                    acc[:] = 0
                if narrow:
                    for j in range(m):
                        u = acc_bits[j]
                        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays a quiet NaN
                            out_TD[t, j0 + j] = (u >> np.uint32(16)) | np.uint32(0x40)
                        else:
                            out_TD[t, j0 + j] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                else:
                    for j in range(m):
                        out_TD[t, j0 + j] = acc_bits[j]

    return rows_sum


def _bits(a):
    """A bfloat16 or float32 array's bits as uint16 / uint32 and the shift that widens them."""
    return (a.view(np.uint32), 0) if a.dtype == np.float32 else (a.view(np.uint16), 16)


def rows_sum(rows_RD, index_TC: np.ndarray, count_T: np.ndarray, weight_TC: np.ndarray, dtype, out_TD=None):
    """y[t] = sum over c < count[t] of weight[t, c] * rows[index[t, c]], in float32, returned in
    ``dtype`` [T, D] (into out_TD when given: contiguous, that dtype); None when the kernel does
    not apply (numba not installed, rows narrower than MIN_WIDTH, or dtypes other than bfloat16
    and float32: the caller's NumPy path runs).

    rows_RD: NumPy [R, D] bfloat16 or float32 (contiguous rows; any rows the table names);
    index_TC int64 [T, C]; count_T int64 [T]; weight_TC float32 [T, C]."""
    dtype = np.dtype(dtype)
    if (rows_RD.shape[1] < MIN_WIDTH or rows_RD.dtype not in (bfloat16, np.float32) or dtype not in (bfloat16, np.float32)
            or not rows_RD.flags.c_contiguous):
        return None
    kernel = _compiled()
    if kernel is None:
        return None
    y = np.empty((len(index_TC), rows_RD.shape[1]), dtype) if out_TD is None else out_TD
    if y.dtype != dtype or y.shape != (len(index_TC), rows_RD.shape[1]) or not y.flags.c_contiguous:
        raise ValueError(f"out_TD {y.dtype} {y.shape} must be contiguous {dtype} [{len(index_TC)}, {rows_RD.shape[1]}]")
    words, shift = _bits(rows_RD)
    kernel(words, shift, np.ascontiguousarray(index_TC, np.int64), np.ascontiguousarray(count_T, np.int64),
           np.ascontiguousarray(weight_TC, np.float32), _bits(y)[0], dtype == bfloat16)
    return y
