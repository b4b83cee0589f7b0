"""The row kernels of hpc_moe.rowops and the row-blocked linear against plain NumPy."""
import numpy as np
import pytest

from hpc_moe import fused
from hpc_moe.backend import bfloat16
from hpc_moe.model.layers import linear
from hpc_moe.model.moe import weigh_pairs
from hpc_moe.rowops import group_rows_sum, segment_index, take_rows, to_float32, weighted_rows_sum

RNG = np.random.default_rng(0)


def test_take_rows_and_bf16_widening():
    src = RNG.standard_normal((50, 33)).astype(np.float32)
    idx = RNG.integers(0, 50, 70)
    np.testing.assert_array_equal(take_rows(np, src, idx), src[idx])
    b = src.astype(bfloat16)
    np.testing.assert_array_equal(to_float32(np, b), b.astype(np.float32))  # exact: a 16-bit shift


@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
def test_weighted_rows_sum_is_the_plain_sum_and_order_independent_of_blocks(dtype):
    rows = RNG.standard_normal((301, 257)).astype(dtype)
    rows[-1] = 0  # the zero row padded entries point at
    index = RNG.integers(0, 301, (900, 5))
    index[::7, 3:] = 300
    w = RNG.random((900, 5)).astype(np.float32)
    want = (w[..., None] * rows[index].astype(np.float32)).sum(1)
    got = weighted_rows_sum(np, rows, index, w, dtype)
    assert got.dtype == dtype
    tol = 1e-2 if dtype == bfloat16 else 1e-5  # bf16: the result is rounded to 8 bits of mantissa
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=tol, atol=tol)
    # A token's result depends on its own row of the table only, not on the block it falls in.
    np.testing.assert_array_equal(weighted_rows_sum(np, rows, index[5:6], w[5:6], dtype), got[5:6])


def test_group_rows_sum_sums_each_group_and_leaves_empty_groups_zero():
    group = np.array([3, 0, 3, 1, 3, 0, 5], np.int64)
    rows = RNG.standard_normal((len(group) + 1, 19)).astype(np.float32)
    got = group_rows_sum(np, rows, group, 7, np.float32)
    want = np.zeros((7, 19), np.float32)
    for r, g in enumerate(group):
        want[g] += rows[r]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not got[[2, 4, 6]].any()
    table = segment_index(group, 7)
    assert table.shape == (7, 3) and table[3].tolist() == [0, 2, 4] and table[2].tolist() == [7, 7, 7]


@pytest.mark.parametrize("n_out,n_in", [(16, 32), (64, 64), (160, 96), (1000, 64), (256, 512)])
def test_row_blocked_linear_does_not_depend_on_the_batch(n_out, n_in):
    """Whatever rows come with it and wherever it sits in a GEMM call, a row gives the same bits
    (16 x 32: OpenBLAS's small-matrix path; 64 x 64: a shape where its Haswell kernel treats the
    rows of a 64-row call three ways)."""
    w = RNG.standard_normal((n_out, n_in)).astype(np.float32)
    x = RNG.standard_normal((200, n_in)).astype(np.float32)
    full = linear(x, w, row_blocked=True)
    np.testing.assert_allclose(full, x @ w.T, rtol=1e-4, atol=1e-4)
    for start, n in [(0, 1), (3, 2), (5, 3), (17, 40), (61, 9), (64, 64), (100, 100)]:
        np.testing.assert_array_equal(linear(x[start:start + n], w, row_blocked=True), full[start:start + n])
    assert linear(x[:0], w, row_blocked=True).shape == (0, n_out)


def _numpy_only(monkeypatch):
    """Run hpc_moe.fused as if numba were not installed (the NumPy path)."""
    monkeypatch.setattr(fused, "_compiled", lambda: None)


@pytest.mark.parametrize("dtype", [np.float32, bfloat16])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_fused_kernels_give_the_numpy_paths_bits(dtype, monkeypatch):
    """hpc_moe.fused is an accelerator only: the weighted sum, the group sum (rows found through a
    remap, as the shared-memory exchange reads them) and the receiver's per-row weighting are
    bitwise the NumPy path's, for values rounding either way, infinities and NaN included."""
    pytest.importorskip("numba")
    d = fused.MIN_WIDTH + 24
    rows = (RNG.standard_normal((301, d)) * 3).astype(dtype)
    rows[0, :4] = [np.inf, -np.inf, np.nan, 3.0e38]  # 3e38 * a weight near 1 rounds to inf in bf16
    rows[-1] = 0
    index = RNG.integers(0, 301, (200, 5))
    index[::7, 3:] = 300
    w = (RNG.random((200, 5)) * 1.5).astype(np.float32)
    group = RNG.integers(0, 90, 300)
    at = RNG.permutation(300)
    n = 120
    out_QD, w_Q = rows[:n], w[:n, 0]
    fast = (weighted_rows_sum(np, rows, index, w, dtype), group_rows_sum(np, rows, group, 90, dtype, at),
            weigh_pairs(out_QD.copy(), np.arange(n), w_Q, n, dtype))
    assert fused.rows_sum(rows, index, np.full(200, 5), w, dtype) is not None  # the kernel ran
    _numpy_only(monkeypatch)
    slow = (weighted_rows_sum(np, rows, index, w, dtype), group_rows_sum(np, rows, group, 90, dtype, at),
            weigh_pairs(out_QD.copy(), np.arange(n), w_Q, n, dtype))
    bits = np.uint16 if dtype == bfloat16 else np.uint32
    for f, s in zip(fast, slow):
        assert f.dtype == dtype
        np.testing.assert_array_equal(f.view(bits), s.view(bits))


def test_fused_kernels_stay_out_of_narrow_rows():
    """Rows under MIN_WIDTH values take the NumPy path (numba's import costs more than it saves)."""
    rows = np.ones((4, fused.MIN_WIDTH - 1), np.float32)
    assert fused.rows_sum(rows, np.zeros((2, 1), np.int64), np.ones(2, np.int64), np.ones((2, 1), np.float32),
                          np.float32) is None


def test_row_blocked_linear_does_not_depend_on_the_row_position():
    """OpenBLAS's Haswell sgemm kernel rounds a row by its place in a micro-tile: shifting the
    rows of one 64-row call changed rows 5, 11, 17, ... on an AMD EPYC it does not know."""
    w = RNG.standard_normal((256, 96)).astype(np.float32)
    x = RNG.standard_normal((64, 96)).astype(np.float32)
    full = linear(x, w, row_blocked=True)
    for shift in range(1, 64):
        np.testing.assert_array_equal(np.roll(linear(np.roll(x, shift, 0), w, row_blocked=True), -shift, 0), full)
