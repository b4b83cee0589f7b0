"""The dense building blocks: RMSNorm, SwiGLU, rotary embeddings with YaRN, and MLA attention.

Each function takes arrays of one backend (numpy or cupy) and returns arrays of the same backend;
``xp`` is found from the arguments, so this module never imports cupy.

Shape legend: T tokens of a packed (ragged) batch, S tokens of one sequence, B sequences, L cached
positions, D hidden size, H attention heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim, C kv_lora_rank, I intermediate size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpc_moe.config import ModelConfig, yarn_get_mscale


def array_module(a):
    """numpy for numpy arrays, cupy for cupy arrays (without importing cupy here)."""
    mod = type(a).__module__.split(".")[0]
    if mod == "cupy":
        import sys
        return sys.modules["cupy"]
    return np


def rms_norm(x, weight, eps: float):
    """x [..., D] any float dtype, weight [D] -> [..., D] in x's dtype; statistics in float32."""
    xp = array_module(x)
    x32 = x.astype(xp.float32, copy=False)
    inv = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + xp.float32(eps))
    return weight * (x32 * inv).astype(x.dtype, copy=False)


def silu(x):
    xp = array_module(x)
    x32 = x.astype(xp.float32, copy=False)
    return (x32 / (1.0 + xp.exp(-x32))).astype(x.dtype, copy=False)


def linear(x, w, row_blocked: bool = False):
    """x [..., in] @ w[out, in].T -> [..., out] (HF weight layout: rows are outputs).

    row_blocked: every output row is computed by the same loop whatever rows came with it, so a
    row's result does not depend on how many rows came with it nor where it sits among them. BLAS
    cannot promise that: it picks its kernel (small-matrix, gemv, blocked) by shape, and OpenBLAS's
    Haswell sgemm kernel (the one it picks on CPUs it does not know, e.g. recent AMD EPYC) rounds a
    row differently by its position inside a micro-tile, even in calls of one shape. NumPy's einsum
    (no BLAS without ``optimize``) sums each dot product in one fixed order, about 4x slower than
    BLAS. This is what makes ``--deterministic`` logits independent of how sequences are spread
    over ranks. NumPy only (the CPU path is the reference).
    """
    if not row_blocked or array_module(x) is not np:
        return x @ w.T
    x2 = x.reshape(-1, x.shape[-1])
    out = np.einsum("tk,nk->tn", x2, w, optimize=False)
    return out.reshape(x.shape[:-1] + (w.shape[0],))


def softmax(scores, axis: int = -1):
    """Softmax in float32 whatever the input dtype (as the reference does); returns float32."""
    xp = array_module(scores)
    s = scores.astype(xp.float32, copy=False)
    s = s - s.max(axis=axis, keepdims=True)
    e = xp.exp(s)
    return e / e.sum(axis=axis, keepdims=True)


# ---- rotary embeddings ------------------------------------------------------------------------
@dataclass(frozen=True)
class Rope:
    """Inverse frequencies (float32 [Dr/2]) and the YaRN attention factor that scales cos/sin."""

    inv_freq: np.ndarray
    attention_factor: float
    interleave: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "Rope":
        dim = cfg.qk_rope_head_dim
        pos_freqs = cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
        rs = cfg.rope_scaling
        if rs is None:
            return cls((1.0 / pos_freqs).astype(np.float32), 1.0, cfg.rope_interleave)
        factor = float(rs["factor"])
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = rs.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all:
                attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
            else:
                attention_factor = yarn_get_mscale(factor)
        beta_fast = rs.get("beta_fast") or 32
        beta_slow = rs.get("beta_slow") or 1
        orig = rs["original_max_position_embeddings"]

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if rs.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # the reference's guard against a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return cls(inv_freq.astype(np.float32), float(attention_factor), cfg.rope_interleave)

    def cos_sin(self, positions_T, xp, dtype):
        """positions int [T] -> (cos, sin), each [T, Dr/2] in ``dtype``, scaled by the YaRN factor."""
        freqs = xp.asarray(positions_T, dtype=xp.float32)[:, None] * xp.asarray(self.inv_freq)[None, :]
        af = xp.float32(self.attention_factor)
        return (xp.cos(freqs) * af).astype(dtype), (xp.sin(freqs) * af).astype(dtype)


def apply_rope(x, cos, sin, interleave: bool):
    """Rotate x [T, ..., Dr] by per-token angles cos/sin [T, Dr/2].

    DeepSeek stores rotary dims as interleaved pairs (x0, x1), (x2, x3), ...; the output lists the
    rotated first members then the second members. Queries and keys get the same layout, so their
    dot products are those of the interleaved rotation.
    """
    xp = array_module(x)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[-1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale_all_dim's YaRN correction squared (as transformers)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


# ---- MLA ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLAWeights:
    """One layer's attention weights in HF layout, as backend arrays in the compute dtype."""

    q_proj: object | None          # [H*(Dn+Dr), D] when q_lora_rank is null
    q_a_proj: object | None        # [q_lora, D]
    q_a_layernorm: object | None   # [q_lora]
    q_b_proj: object | None        # [H*(Dn+Dr), q_lora]
    kv_a_proj_with_mqa: object     # [C+Dr, D]
    kv_a_layernorm: object         # [C]
    kv_b_proj: object              # [H*(Dn+Dv), C]
    o_proj: object                 # [D, H*Dv]
    w_uk: object                   # [H, Dn, C] kv_b_proj's key half, for the absorbed form
    w_uv: object                   # [H, Dv, C] kv_b_proj's value half


class MLA:
    """Multi-head latent attention of one layer.

    Prefill uses the plain form (latents expanded to per-head keys and values); decode uses the
    weight-absorbed form, attending directly over the latent cache of C + Dr numbers per token.
    """

    def __init__(self, cfg: ModelConfig, w: MLAWeights, rope: Rope, row_blocked: bool = False):
        self.cfg, self.w, self.rope, self.row_blocked = cfg, w, rope, row_blocked
        self.scale = softmax_scale(cfg)

    def project(self, x_TD, cos, sin):
        """x [T, D] -> q_nope [T, H, Dn], q_rot [T, H, Dr], latent [T, C + Dr] (normed kv, roped k)."""
        cfg, w = self.cfg, self.w
        xp = array_module(x_TD)
        if w.q_proj is not None:
            q = linear(x_TD, w.q_proj, self.row_blocked)
        else:
            q = linear(rms_norm(linear(x_TD, w.q_a_proj, self.row_blocked), w.q_a_layernorm, cfg.rms_norm_eps),
                       w.q_b_proj, self.row_blocked)
        q = q.reshape(x_TD.shape[0], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_rot = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        kv = linear(x_TD, w.kv_a_proj_with_mqa, self.row_blocked)
        c_kv = rms_norm(kv[:, :cfg.kv_lora_rank], w.kv_a_layernorm, cfg.rms_norm_eps)
        k_rot = apply_rope(kv[:, cfg.kv_lora_rank:], cos, sin, self.rope.interleave)
        q_rot = apply_rope(q_rot, cos, sin, self.rope.interleave)
        return q_nope, q_rot, xp.concatenate([c_kv, k_rot], axis=-1)

    def attend_plain(self, q_nope_SHn, q_rot_SHr, latent_LC, first_pos: int):
        """Causal attention of S new queries at positions first_pos.. over L = first_pos + S latents.

        Expands the latents to per-head keys/values (the prefill form). Returns [S, H*Dv].
        """
        cfg = self.cfg
        xp = array_module(latent_LC)
        L, S, H = latent_LC.shape[0], q_nope_SHn.shape[0], cfg.num_attention_heads
        kv = linear(latent_LC[:, :cfg.kv_lora_rank], self.w.kv_b_proj).reshape(L, H, -1)
        k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
        k_rot = latent_LC[:, cfg.kv_lora_rank:]
        # [H, S, L]: the nope part per head, the shared rope key for all heads.
        scores = _bmm(q_nope_SHn.transpose(1, 0, 2), k_nope.transpose(1, 2, 0))
        scores = scores + _bmm(q_rot_SHr.transpose(1, 0, 2), k_rot.T[None])
        scores = scores.astype(xp.float32) * xp.float32(self.scale)
        q_pos = first_pos + xp.arange(S)[:, None]
        scores = xp.where(xp.arange(L)[None, :] <= q_pos, scores, xp.float32(-xp.inf))
        probs = softmax(scores).astype(v.dtype)
        out = _bmm(probs, v.transpose(1, 0, 2))  # [H, S, Dv]
        return out.transpose(1, 0, 2).reshape(S, H * cfg.v_head_dim)

    def attend_absorbed(self, q_nope_BHn, q_rot_BHr, cache_BLC, lengths_B):
        """One query per sequence over its cached latents (the decode form). Returns [B, H*Dv].

        cache [B, L, C + Dr] holds each sequence's latents at positions < lengths_B[b] (the new
        token's included); the rest is padding and is masked out.
        """
        cfg = self.cfg
        xp = array_module(cache_BLC)
        B, L = cache_BLC.shape[:2]
        C = cfg.kv_lora_rank
        c_kv, k_rot = cache_BLC[..., :C], cache_BLC[..., C:]
        q_lat = _bmm(q_nope_BHn.transpose(1, 0, 2), self.w.w_uk).transpose(1, 0, 2)  # [B, H, C]
        scores = _bmm(q_lat, c_kv.transpose(0, 2, 1)) + _bmm(q_rot_BHr, k_rot.transpose(0, 2, 1))
        scores = scores.astype(xp.float32) * xp.float32(self.scale)  # [B, H, L]
        valid = xp.arange(L)[None, :] < xp.asarray(lengths_B)[:, None]
        scores = xp.where(valid[:, None, :], scores, xp.float32(-xp.inf))
        probs = softmax(scores).astype(c_kv.dtype)
        o_lat = _bmm(probs, c_kv)  # [B, H, C]
        out = _bmm(o_lat.transpose(1, 0, 2), self.w.w_uv.transpose(0, 2, 1))  # [H, B, Dv]
        return out.transpose(1, 0, 2).reshape(B, cfg.num_attention_heads * cfg.v_head_dim)


def _bmm(a, b):
    """Batched matmul; bf16 batches go through float32 because CuPy's batched bf16 GEMM is broken."""
    xp = array_module(a)
    if a.dtype == np.float32 or xp is np:
        return xp.matmul(a, b)
    return xp.matmul(a.astype(xp.float32), b.astype(xp.float32)).astype(a.dtype)
