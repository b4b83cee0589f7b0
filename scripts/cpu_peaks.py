"""The peaks of one core of this machine, as a hardware file's base: a large float32 GEMM and a
large copy (read + write), single-threaded as every hpc_moe rank runs (OPENBLAS_NUM_THREADS=1).

    OPENBLAS_NUM_THREADS=1 python scripts/cpu_peaks.py   # prints flops_per_s.fp32 and hbm_bytes_per_s
    OPENBLAS_NUM_THREADS=1 python scripts/cpu_peaks.py --decode-attention

The second prints the `small` model's absorbed MLA decode (MLA.attend_absorbed) per cached
position at several batches and contexts: inside the last-level cache and beyond it (why the
one-level roofline of hpc_moe.perf misses large decode caches on this machine).
"""
import json
import sys
import time
import types

import numpy as np


def best(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    gemm = 2 * 2048**3 / best(lambda: a @ a)
    x = np.ones(2**25, np.float32)  # 128 MiB: far out of cache
    y = np.empty_like(x)
    copy = 2 * x.nbytes / best(lambda: np.copyto(y, x))
    print(json.dumps({"flops_per_s": {"fp32": float(f"{gemm:.3g}")}, "hbm_bytes_per_s": float(f"{copy:.3g}")}))


def decode_attention() -> None:
    from hpc_moe.config import load_config
    from hpc_moe.model.layers import MLA, softmax_scale
    cfg = load_config("small")
    H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    rng = np.random.default_rng(0)
    mla = MLA.__new__(MLA)  # only the absorbed weights are needed
    mla.cfg, mla.scale = cfg, softmax_scale(cfg)
    mla.w = types.SimpleNamespace(w_uk=rng.random((H, cfg.qk_nope_head_dim, C), dtype=np.float32),
                                  w_uv=rng.random((H, cfg.v_head_dim, C), dtype=np.float32))
    cache = rng.random((64, 2048, C + R), dtype=np.float32)
    print("batch context  MiB of latents  ms a layer  ns a cached position")
    for B, L in ((16, 256), (8, 512), (4, 2048), (16, 1024), (32, 2048), (64, 1024)):
        q_nope = rng.random((B, H, cfg.qk_nope_head_dim), dtype=np.float32)
        q_rot = rng.random((B, H, R), dtype=np.float32)
        def layer(B=B, L=L, q_nope=q_nope, q_rot=q_rot):
            return mla.attend_absorbed(q_nope, q_rot, cache[np.arange(B), :L], np.full(B, L))
        dt = best(layer, 5)
        print(f"{B:>5} {L:>7} {B * L * (C + R) * 4 / 2**20:>15.1f} {dt * 1e3:>11.2f} {dt / (B * L) * 1e9:>21.0f}")


if __name__ == "__main__":
    decode_attention() if "--decode-attention" in sys.argv[1:] else main()
