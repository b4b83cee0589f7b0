"""hpc-moe bench dispatch on each transport at several EP sizes on this machine, runs interleaved so
that every transport sees the same machine, medians of repeats:

    .venv/bin/python scripts/bench_transports.py [--eps 4,8,16] [--transports shm,host] [--repeats 3]
        [--iters 10] [--out out/transports] [-- extra bench dispatch flags]

Prints one markdown table per EP size: dispatch, combine, the raw Ialltoallv floors of the same
bytes, one memory pass, the local passes, and the two ratios the intra-node issue asks for
((dispatch + combine) / raw floor and dispatch / raw dispatch); the shape is bench dispatch's
default (512 tokens per rank, hidden 7168, top-8 of 256, bf16) unless flags after -- say otherwise.
Writes every run's JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("dispatch", "dispatch"), ("combine", "combine"), ("raw Ialltoallv (dispatch bytes)", "raw dispatch"),
        ("raw Ialltoallv (combine bytes)", "raw combine"), ("memory pass (dispatch bytes)", "one memory pass"),
        ("local: route + pack rows", "local: route + pack"), ("local: combine reduce", "local: reduce")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eps", default="4,8,16")
    p.add_argument("--transports", default="shm,host")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="out/transports")
    p.add_argument("extra", nargs="*", help="more bench dispatch flags (after --)")
    a = p.parse_args()
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    transports = a.transports.split(",")
    for ep in (int(e) for e in a.eps.split(",")):
        runs = {t: [] for t in transports}
        for r in range(a.repeats):
            for t in transports:
                path = out / f"ep{ep}-{t}-{r}.json"
                subprocess.run([mpiexec, "-n", str(ep), sys.executable, "-m", "mpi4py", "-m", "hpc_moe", "bench",
                                "dispatch", "--no-overlap", f"--iters={a.iters}", f"--transport={t}", "--json", str(path),
                                *a.extra], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
                runs[t].append(json.loads(path.read_text()))
        c = runs[transports[0]][0]["config"]
        print(f"\nEP {ep}: {c['tokens_per_rank']} tokens/rank, hidden {c['hidden']}, top-{c['topk']} of "
              f"{c['experts']}, {c['dtype']}, {a.repeats} runs of {a.iters} iterations each (median of the runs' "
              "medians, ms; max over ranks per iteration)\n")
        print("| ms | " + " | ".join(transports) + " |")
        print("|---|" + "---:|" * len(transports))

        for key, label in ROWS:
            print(f"| {label} | " + " | ".join(
                f"{statistics.median(x['ops'][key]['median_ms'] for x in runs[t]):.1f}" for t in transports) + " |")
        for label, f in (("(dispatch + combine) / raw floor", lambda x: x["ratio_vs_raw"]),
                         ("dispatch / raw dispatch", lambda x: x["ops"]["dispatch"]["median_ms"]
                          / x["ops"]["raw Ialltoallv (dispatch bytes)"]["median_ms"])):
            print(f"| **{label}** | " + " | ".join(
                f"**{statistics.median(f(x) for x in runs[t]):.2f}** ({', '.join(f'{f(x):.2f}' for x in runs[t])})"
                for t in transports) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
