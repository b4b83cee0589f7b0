"""Row kernels shared by the model and the dispatch: gather rows, widen bfloat16, and the blocked
weighted sum of rows that both reductions of an MoE layer are (the receiver's weighted sum of its
local experts' outputs, and the source's sum of the rows that come back).

Each takes arrays of one backend (numpy or cupy); cupy is never imported here.

Legend: T tokens, C columns of an index table, R rows, D hidden, N gathered rows.
"""
from __future__ import annotations

import numpy as np

from hpc_moe import fused
from hpc_moe.backend import bfloat16

_BLOCK_BYTES = 512 << 10  # float32 rows gathered per block of the row sums: a quarter of a core's L2


def take_rows(xp, src_RD, idx_N, out_ND=None):
    """out[i] = src[idx[i]] for a 2-D array, into ``out`` (contiguous) without a temporary."""
    if out_ND is None:
        out_ND = xp.empty((len(idx_N), src_RD.shape[1]), dtype=src_RD.dtype)
    if xp is np:
        np.take(src_RD, idx_N, axis=0, out=out_ND, mode="clip")  # clip: no bounds pass, no buffering
    else:
        xp.take(src_RD, xp.asarray(idx_N), axis=0, out=out_ND)
    return out_ND


def to_float32(xp, a, out=None):
    """Any float array -> float32; bfloat16 by a 16-bit shift (exact, and one pass: NumPy's cast
    of ml_dtypes' bfloat16 goes element by element)."""
    if a.dtype == np.float32:
        return a
    if a.dtype == bfloat16 and xp is np:
        if out is None:
            out = np.empty(a.shape, np.float32)
        np.left_shift(a.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    if out is None:
        return a.astype(xp.float32, copy=False)
    out[...] = a
    return out


def weighted_rows_sum(xp, rows_RD, index_TC, weight_TC, dtype):
    """y[t] = sum_c weight[t, c] * rows[index[t, c]] in float32, returned in ``dtype``: [T, D].

    rows_RD: [R + 1, D] any float dtype whose last row is zero (the target of padded entries), or
    any rows with a zero row that the padded entries name; index_TC: int64 [T, C] host;
    weight_TC: float32 [T, C] (host or device, like rows). The sum runs in column order, the
    first term assigned and each next one added (no fused multiply-add), so the same table gives
    bitwise the same y, and hpc_moe.fused's one-pass kernel (used where it applies) gives the same
    bits as the NumPy path: rows gathered a block of tokens at a time into a buffer that stays in
    cache, so every row is read from memory once.
    """
    T, C = index_TC.shape
    D = rows_RD.shape[1]
    if xp is not np:
        g = to_float32(xp, rows_RD[xp.asarray(index_TC)])
        return xp.einsum("tc,tcd->td", xp.asarray(weight_TC), g).astype(dtype, copy=False)
    w = np.asarray(weight_TC, dtype=np.float32)
    y = fused.rows_sum(rows_RD, index_TC, np.full(T, C, np.int64), w, dtype)
    if y is not None:
        return y
    y = np.empty((T, D), dtype)
    b = max(1, min(T, _BLOCK_BYTES // max(1, C * D * 4)))
    raw, f32 = np.empty((b * C, D), rows_RD.dtype), np.empty((b * C, D), np.float32)
    acc, term = np.empty((b, D), np.float32), np.empty((b, D), np.float32)
    for s in range(0, T, b):
        e = min(s + b, T)
        n = e - s
        take_rows(np, rows_RD, index_TC[s:e].reshape(-1), raw[:n * C])
        g = to_float32(np, raw[:n * C], f32[:n * C]).reshape(n, C, D)
        np.multiply(w[s:e, 0, None], g[:, 0], out=acc[:n])
        for c in range(1, C):
            np.multiply(w[s:e, c, None], g[:, c], out=term[:n])
            acc[:n] += term[:n]
        y[s:e] = acc[:n]
    return y


def group_rows_sum(xp, rows_RD, group_R: np.ndarray, n_groups: int, dtype, at_R: np.ndarray | None = None):
    """y[g] = sum of the rows labelled g, in row order, in float32, returned in ``dtype``: [G, D].

    rows_RD: [R + 1, D] any float dtype (row R, never labelled, is not read); group_R: int64 [R]
    host; at_R: int64 [R] where each labelled row is in rows_RD (default: row i is rows_RD[i]; the
    shared-memory exchange sums rows where they lie in its peers' memory). The source's combine:
    the rows of a token, one from each rank that ran its experts. The same rows give bitwise the
    same y on either path (hpc_moe.fused's kernel, or weighted_rows_sum in classes of equal row
    count, so that no padded entry is gathered). Groups without rows are zero.
    """
    table = segment_index(group_R, n_groups)
    counts = np.bincount(group_R, minlength=n_groups)
    if at_R is not None:
        table = np.append(at_R, 0)[table]  # a padded entry (R) is never read
    if xp is np:
        y = fused.rows_sum(rows_RD, table, counts, np.ones(table.shape, np.float32), dtype)
        if y is not None:
            return y
    y = xp.zeros((n_groups, rows_RD.shape[1]), dtype)
    for c in np.unique(counts[counts > 0]):
        g = np.nonzero(counts == c)[0]
        y[g if xp is np else xp.asarray(g)] = weighted_rows_sum(xp, rows_RD, table[g, :c], np.ones((len(g), c), np.float32),
                                                                dtype)
    return y


def segment_index(group_R: np.ndarray, n_groups: int) -> np.ndarray:
    """For rows labelled by group (int [R]), the table of each group's rows in row order:
    int64 [n_groups, C] with C the largest group, padded with R (the zero row of
    weighted_rows_sum)."""
    R = len(group_R)
    order = np.argsort(group_R, kind="stable")
    counts = np.bincount(group_R, minlength=n_groups)
    C = int(counts.max(initial=0))
    table = np.full((n_groups, max(C, 1)), R, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    col = np.arange(R) - np.repeat(starts, counts)
    table[group_R[order], col] = order
    return table
