"""FP8 e4m3 codecs: the dispatch payload (one scale per 128 values of a row, as DeepEP) here; the
checkpoint's 128x128 weight blocks in checkpoint.py share the format's limits.

Legend: T / N rows, D values per row, B 128-value blocks of a row.
"""
from __future__ import annotations

import numpy as np

from hpc_moe.backend import float8_e4m3

FP8_BLOCK = 128   # values per FP8 scale, as DeepSeek-V3's activation quantisation
FP8_MAX = 448.0   # largest finite float8_e4m3fn


def fp8_quantize(xp, x_TD):
    """x [T, D] -> (q_TD uint8 e4m3fn bits, scale_TB float32): one scale = amax / 448 per 128
    values of a row. Integer arithmetic on float32 bits, so NumPy and CuPy (no fp8 dtype) agree."""
    t, d = x_TD.shape
    b = -(-d // FP8_BLOCK)
    x = x_TD.astype(np.float32)
    if b * FP8_BLOCK != d:
        x = xp.concatenate([x, xp.zeros((t, b * FP8_BLOCK - d), dtype=np.float32)], axis=1)
    x_TBV = x.reshape(t, b, FP8_BLOCK)
    amax = xp.abs(x_TBV).max(axis=2) if t else xp.zeros((0, b), dtype=np.float32)
    scale_TB = xp.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1)).astype(np.float32)
    v = xp.clip(x_TBV / scale_TB[:, :, None], -FP8_MAX, FP8_MAX).reshape(t, b * FP8_BLOCK)[:, :d]
    return _e4m3_bits(xp, xp.ascontiguousarray(v)), scale_TB


def fp8_dequantize(xp, q_ND, scale_NB, dtype):
    """Inverse of fp8_quantize: uint8 [N, D] bits and float32 [N, B] scales -> dtype [N, D]."""
    n, d = q_ND.shape
    b = scale_NB.shape[1]
    table = xp.asarray(np.arange(256, dtype=np.uint8).view(float8_e4m3).astype(np.float32))
    v = table[q_ND]  # uint8 codes index the 256-entry table directly
    pad = b * FP8_BLOCK - d
    if pad:
        v = xp.concatenate([v, xp.zeros((n, pad), dtype=np.float32)], axis=1)
    v = v.reshape(n, b, FP8_BLOCK) * scale_NB[:, :, None]
    return v.reshape(n, b * FP8_BLOCK)[:, :d].astype(dtype)


def _e4m3_bits(xp, v):
    """float32 with |v| <= 448 -> float8_e4m3fn bits (round to nearest even), uint8."""
    a = xp.abs(v)
    u = a.view(np.uint32)
    u = u + (np.uint32(0x7FFFF) + ((u >> np.uint32(20)) & np.uint32(1)))  # round at 3 mantissa bits
    normal = ((((u >> np.uint32(23)) - np.uint32(120)) << np.uint32(3))
              | ((u >> np.uint32(20)) & np.uint32(7)))
    sub = xp.rint(a * np.float32(512.0)).astype(np.uint32)  # below 2^-6: multiples of 2^-9
    bits = xp.where(a < np.float32(2.0 ** -6), sub, normal)
    sign = xp.signbit(v).astype(np.uint32) << np.uint32(7)
    return (bits | sign).astype(np.uint8)
