"""The source's sum of the rows that come back, in one process: hpc_moe.fused's one-pass kernel
against the NumPy path (the same bits) and against NumPy's contiguous `take` of the same rows (one
gather pass), at bench dispatch's EP 8 shape by default:

    .venv/bin/python scripts/bench_rowsum.py [--tokens 512] [--hidden 7168] [--ranks 8] [--repeats 15]

Each of --ranks receivers returns a row for about two thirds of the tokens (top-8 of 256 over 8
ranks), in receiver order, bf16. Prints min and median ms over repeats.
"""
from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np

from hpc_moe import fused
from hpc_moe.backend import bfloat16
from hpc_moe.rowops import group_rows_sum, take_rows


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm: caches, pages, numba's compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts), 1e3 * float(np.median(ts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    reached = 1 - (1 - 8 / 256) ** (256 // a.ranks)  # a token's row reaches a given rank
    token_M = np.concatenate([np.nonzero(rng.random(a.tokens) < reached)[0] for _ in range(a.ranks)])
    rows = rng.standard_normal((len(token_M) + 1, a.hidden)).astype(bfloat16)
    rows[-1] = 0
    out = np.empty_like(rows[:-1])
    figures = {"fused kernel": timed(lambda: group_rows_sum(np, rows, token_M, a.tokens, bfloat16), a.repeats)}
    with mock.patch.object(fused, "_compiled", lambda: None):
        figures["NumPy path"] = timed(lambda: group_rows_sum(np, rows, token_M, a.tokens, bfloat16), a.repeats)
    figures["take of the rows"] = timed(lambda: take_rows(np, rows, np.arange(len(token_M)), out), a.repeats)
    print(f"# {len(token_M)} rows of {a.hidden} bf16 ({rows.nbytes / 1e6:.1f} MB) for {a.tokens} tokens from "
          f"{a.ranks} receivers; ms, min / median of {a.repeats}")
    for name, (lo, med) in figures.items():
        print(f"{name:<18}{lo:8.2f}{med:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
