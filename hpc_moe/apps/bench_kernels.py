"""``hpc-moe bench kernels``: one device's kernels at a model's shapes, against the device's
measured peaks and against the same operation in PyTorch on the same device (when torch imports).

Every operation is the package's own code (hpc_moe.model, hpc_moe.rowops) on random data: an
expert (gate and up as one GEMM, SwiGLU, down) and the dense MLP at several token counts, the
router, the dispatch permute (a row gather) and the weighted combine, MLA prefill (the plain form)
per prompt length and MLA decode (the absorbed form over the latent cache) per batch and context.
The peaks are measured in the same run: a large GEMM in the compute dtype and a large device copy.
Figures are medians over iterations; FLOP/s count the useful FLOPs, bytes the least traffic the
operation needs (each operand read once, each result written once), so the fraction of the peak
says how close the kernel comes to the machine. Single process: no MPI.
"""
from __future__ import annotations

import time
import types

import numpy as np

from hpc_moe.apps.bench_options import BenchKernelsOptions
from hpc_moe.backend import Backend, get_backend
from hpc_moe.config import load_config
from hpc_moe.errors import UsageError
from hpc_moe.model.layers import MLA, softmax_scale
from hpc_moe.model.moe import ExpertWeights
from hpc_moe.model.router import route
from hpc_moe.outputs import check_output, write_json
from hpc_moe.rowops import take_rows, weighted_rows_sum


def _decode_shapes(o: BenchKernelsOptions) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in o.decode]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise UsageError(f"--decode wants BxL,BxL,... with B, L >= 1 (got {','.join(o.decode)})")
    return shapes


class _Timer:
    def __init__(self, be: Backend, iters: int, warmup: int):
        self.be, self.iters, self.warmup = be, iters, warmup

    def __call__(self, fn, *args, sync=None) -> float:
        """Median seconds of fn(*args) over the iterations, the device synchronised around each."""
        sync = sync or self.be.synchronize
        for _ in range(self.warmup):
            fn(*args)
        sync()
        times = []
        for _ in range(self.iters):
            t = time.perf_counter()
            fn(*args)
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))


def run_bench_kernels(o: BenchKernelsOptions) -> int:
    if o.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    check_output(o.json, "--json")
    decode = _decode_shapes(o)
    cfg = load_config(o.config)
    be = get_backend(o.backend, o.dtype)
    xp, dt, b = be.xp, be.dtype, be.dtype.itemsize
    rng = np.random.default_rng(o.seed)
    rand = lambda *shape, scale=0.02: be.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)  # noqa: E731
    timer = _Timer(be, o.iters, o.warmup)
    tt = _Torch.create(be, timer) if o.torch else None

    n = o.peak_size
    A = rand(n, n, scale=1.0)
    gemm_peak = 2 * n**3 / timer(xp.matmul, A, A)
    src = xp.ones(o.copy_mib * 2**20 // 4, dtype=xp.float32)
    dst = xp.empty_like(src)
    copy_peak = 2 * src.nbytes / timer(xp.copyto, dst, src)
    del A, src, dst
    rows: list[dict] = []

    def add(op, shape, seconds, flops, nbytes, torch_s=None):
        rows.append({"op": op, "shape": shape, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
                     "gbps": nbytes / seconds / 1e9, "of_gemm_peak": flops / seconds / gemm_peak,
                     "of_copy_peak": nbytes / seconds / copy_peak,
                     "torch_ms": None if torch_s is None else torch_s * 1e3,
                     "speedup_vs_torch": None if torch_s is None else torch_s / seconds})

    H, E, K = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    for name, inter in (("expert", cfg.moe_intermediate_size), ("dense_mlp", cfg.intermediate_size)):
        w = ExpertWeights(rand(2 * inter, H), rand(H, inter))
        for T in o.tokens:
            x = rand(T, H, scale=1.0)
            add(name, f"{T}x{H}->{inter}->{H}", timer(w, x), 6 * T * H * inter,
                (3 * H * inter + 2 * T * H) * b, tt and tt.mlp(w, x))
    # Every array a kernel touches comes from the backend (CuPy refuses implicit host-to-device copies).
    gate = be.asarray(rng.standard_normal((E, H), dtype=np.float32) * 0.02, np.float32)
    bias = be.asarray(np.zeros(E, np.float32), np.float32)
    for T in o.tokens:
        x = rand(T, H, scale=1.0)
        add("router", f"{T}x{H}->{E} top-{K}", timer(route, x, gate, bias, cfg), 2 * T * H * E,
            E * H * 4 + T * H * b, tt and tt.router(x, gate, cfg))
        idx = rng.integers(0, T, T * K)
        out = xp.empty((T * K, H), dt)
        add("permute", f"{T}x{H} -> {T * K} rows", timer(take_rows, xp, x, idx, out), 0,
            2 * T * K * H * b, tt and tt.permute(x, idx))
        rows_RD = rand(T * K + 1, H, scale=1.0)
        index_TK, weight_TK = np.arange(T * K).reshape(T, K), rng.random((T, K), dtype=np.float32)
        add("combine", f"{T * K} rows -> {T}x{H}",
            timer(weighted_rows_sum, xp, rows_RD, index_TK, weight_TK, dt), 2 * T * K * H,
            (T * K + T) * H * b, tt and tt.combine(rows_RD, index_TK, weight_TK))
    mla, heads, C, R = _mla(cfg, rand), cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for S in o.prefill:
        qn, qr, lat = rand(S, heads, cfg.qk_nope_head_dim, scale=1.0), rand(S, heads, R, scale=1.0), rand(S, C + R, scale=1.0)
        flops = 2 * S * C * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
            + 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim) * S * S / 2  # kv expansion, the causal half
        add("mla_prefill", f"{S} positions, {heads} heads", timer(mla.attend_plain, qn, qr, lat, 0), flops,
            (S * (C + R) + S * heads * (cfg.qk_head_dim + cfg.v_head_dim)) * b, tt and tt.prefill(mla, qn, qr, lat))
    for B, L in decode:
        qn, qr = rand(B, heads, cfg.qk_nope_head_dim, scale=1.0), rand(B, heads, R, scale=1.0)
        cache, lengths = rand(B, L, C + R, scale=1.0), np.full(B, L)
        add("mla_decode", f"{B} x {L} positions", timer(mla.attend_absorbed, qn, qr, cache, lengths),
            2 * B * heads * (2 * C + R) * L, B * L * (C + R) * b, tt and tt.decode(mla, qn, qr, cache))
    _print(cfg, o, be, gemm_peak, copy_peak, rows, tt)
    if o.json:
        write_json(o.json, {"config": o.config, "device": be.device, "backend": be.name, "dtype": str(dt),
                            "gemm_peak_tflops": gemm_peak / 1e12, "copy_peak_gbps": copy_peak / 1e9,
                            "torch": tt.version if tt else None, "kernels": rows})
    return 0


def _mla(cfg, rand) -> MLA:
    """An MLA of the config's shapes with only the absorbed-form and expansion weights set."""
    heads, C = cfg.num_attention_heads, cfg.kv_lora_rank
    mla = MLA.__new__(MLA)
    mla.cfg, mla.scale, mla.row_blocked = cfg, softmax_scale(cfg), False
    kv_b = rand(heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), C)
    per_head = kv_b.reshape(heads, cfg.qk_nope_head_dim + cfg.v_head_dim, C)
    mla.w = types.SimpleNamespace(kv_b_proj=kv_b, w_uk=per_head[:, :cfg.qk_nope_head_dim].copy(),
                                  w_uv=per_head[:, cfg.qk_nope_head_dim:].copy())
    return mla


def _print(cfg, o, be, gemm_peak, copy_peak, rows, tt) -> None:
    print(f"{o.config} kernels on {be.device} ({be.name}, {be.dtype}); measured peaks: GEMM "
          f"{gemm_peak / 1e12:.2f} TFLOP/s ({o.peak_size}^3), copy {copy_peak / 1e9:.1f} GB/s (read + write)"
          + (f"; PyTorch {tt.version} on {tt.device}" if tt else ""))
    print(f"{'op':<12} {'shape':<28} {'ms':>9} {'TFLOP/s':>8} {'of GEMM':>8} {'GB/s':>8} {'of copy':>8} "
          f"{'torch ms':>9} {'x torch':>8}")
    for r in rows:
        t = f"{r['torch_ms']:>9.3f} {r['speedup_vs_torch']:>8.2f}" if r["torch_ms"] is not None else ""
        print(f"{r['op']:<12} {r['shape']:<28} {r['ms']:>9.3f} {r['tflops']:>8.3f} {r['of_gemm_peak']:>8.1%} "
              f"{r['gbps']:>8.1f} {r['of_copy_peak']:>8.1%} {t}")


class _Torch:
    """The same operations written as a PyTorch user would, on the backend's device."""

    @classmethod
    def create(cls, be: Backend, timer: _Timer) -> "_Torch | None":
        """None where torch does not import (or cannot reach the backend's GPU): no column."""
        try:
            import torch
        except ImportError:
            return None
        return cls(torch, be, timer) if not be.is_gpu or torch.cuda.is_available() else None

    def __init__(self, torch, be: Backend, timer: _Timer):
        self.torch, self.timer, self.version = torch, timer, torch.__version__
        self.device = "cuda" if be.is_gpu else "cpu"
        self.dtype = torch.bfloat16 if str(be.dtype) == "bfloat16" else torch.float32
        self.be = be
        self.sync = torch.cuda.synchronize if be.is_gpu else (lambda: None)

    def t(self, a, dtype=None):
        a = self.be.to_numpy(a)
        if a.dtype.name == "bfloat16":
            a = a.astype(np.float32)
        return self.torch.as_tensor(np.ascontiguousarray(a), device=self.device, dtype=dtype or self.dtype)

    def time(self, fn) -> float:
        with self.torch.inference_mode():
            return self.timer(fn, sync=self.sync)

    def mlp(self, w, x):
        F, gu, down, xt = self.torch.nn.functional, self.t(w.gate_up), self.t(w.down), self.t(x)
        i = gu.shape[0] // 2

        def fn():
            h = F.linear(xt, gu)
            return F.linear(F.silu(h[:, :i]) * h[:, i:], down)
        return self.time(fn)

    def router(self, x, gate, cfg):
        xt, g = self.t(x), self.t(gate, self.torch.float32)
        return self.time(lambda: self.torch.topk(self.torch.sigmoid(xt.float() @ g.T), cfg.num_experts_per_tok))

    def permute(self, x, idx):
        xt, it = self.t(x), self.torch.as_tensor(idx, device=self.device)
        return self.time(lambda: xt.index_select(0, it))

    def combine(self, rows, index_TK, weight_TK):
        rt = self.t(rows)
        it, wt = self.torch.as_tensor(index_TK, device=self.device), self.t(weight_TK, self.torch.float32)
        return self.time(lambda: self.torch.einsum("tk,tkd->td", wt, rt[it].float()).to(self.dtype))

    def prefill(self, mla, qn, qr, lat):
        torch, cfg = self.torch, mla.cfg
        heads, C = cfg.num_attention_heads, cfg.kv_lora_rank
        q = torch.cat([self.t(qn), self.t(qr)], -1).transpose(0, 1)  # [H, S, Dq]
        latt, kv_b = self.t(lat), self.t(mla.w.kv_b_proj)

        def fn():
            kv = (latt[:, :C] @ kv_b.T).view(-1, heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
            k_rot = latt[:, C:].unsqueeze(1).expand(-1, heads, -1)
            k = torch.cat([kv[..., :cfg.qk_nope_head_dim], k_rot], -1).transpose(0, 1)
            v = kv[..., cfg.qk_nope_head_dim:].transpose(0, 1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=mla.scale)
        return self.time(fn)

    def decode(self, mla, qn, qr, cache):
        torch, C = self.torch, mla.cfg.kv_lora_rank
        qnt, qrt, ct, w_uk, w_uv = self.t(qn), self.t(qr), self.t(cache), self.t(mla.w.w_uk), self.t(mla.w.w_uv)

        def fn():
            q_lat = torch.einsum("bhn,hnc->bhc", qnt, w_uk)
            s = (q_lat @ ct[..., :C].transpose(1, 2) + qrt @ ct[..., C:].transpose(1, 2)).float() * mla.scale
            o = torch.softmax(s, -1).to(ct.dtype) @ ct[..., :C]
            return torch.einsum("bhc,hvc->bhv", o, w_uv)
        return self.time(fn)
