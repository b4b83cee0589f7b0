"""hpc-moe bench layer against the PyTorch all_to_all_single baseline (scripts/torch_moe_layer.py):
the same shapes and inputs, runs interleaved so that both see the same machine, medians of repeats.

    .venv/bin/python scripts/compare_layer.py [--np 8] [--repeats 3] [--iters 20] [--out out/compare]
        [--shapes comm-heavy,compute-heavy] [--dispatch auto|flat|hierarchical] [--micro-batches M]
        [--transports auto,host]   # hpc_moe once per transport, each interleaved with torch
        [--launcher "scripts/cluster.sh mpiexec"]   # across the nodes of the cluster on one machine

Prints, per shape, layer_ms of each (median over repeats of each run's median) and the speed-up
torch / hpc_moe (per transport of hpc_moe's), with the floors bench layer measures (raw all-to-all,
GEMMs alone) and the expert phase (which shows how much the waiting ranks take from the computing
ones); writes every run's JSON and a summary.json under --out. Needs torch (make install brings
the CPU wheel).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # the two shapes of the issue: communication-heavy (wide rows, few FLOPs per byte) and compute-heavy
    "comm-heavy": dict(tokens=128, hidden=7168, inter=256, experts=8, topk=2),
    "compute-heavy": dict(tokens=256, hidden=2048, inter=512, experts=8, topk=4),
    # 16 ranks on 4 nodes of 1 Gbit/s (docs/benchmarks.md): wide rows, DeepSeek's top-8, the link
    # is the bottleneck
    "cluster": dict(tokens=96, hidden=5120, inter=128, experts=16, topk=8),
    # Many wide rows and little expert work: the exchange is most of the layer.
    "bandwidth": dict(tokens=512, hidden=7168, inter=128, experts=8, topk=2),
    # A decode step's few tokens at DeepSeek-V3's widths (hidden 7168, expert inter 2048), top-8.
    "decode": dict(tokens=16, hidden=7168, inter=2048, experts=8, topk=8),
}


def run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--json", str(out)], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _phase_medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r["phases_ms"][k] for r in runs) for k in runs[0]["phases_ms"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="out/compare")
    p.add_argument("--shapes", default="comm-heavy,compute-heavy", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--dispatch", default="auto", choices=["auto", "flat", "hierarchical"], help="hpc_moe's scheme")
    p.add_argument("--micro-batches", type=int, default=1, help="hpc_moe's parts in flight at once")
    p.add_argument("--transports", default="auto", help="hpc_moe's transports, comma-separated (e.g. shm,host)")
    p.add_argument("--launcher", default=str(Path(sys.executable).parent / "mpiexec"),
                   help="the mpiexec to start both with (e.g. 'scripts/cluster.sh mpiexec')")
    a = p.parse_args()
    unknown = [s for s in a.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)} (of {', '.join(SHAPES)})")
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    mpiexec = shlex.split(a.launcher) + ["-n", str(a.np), sys.executable]
    summary = {}
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        flags = [f"--{k}={v}" for k, v in shape.items()] + [f"--iters={a.iters}"]
        transports = a.transports.split(",")
        ours, theirs = {t: [] for t in transports}, []
        for r in range(a.repeats):
            for t in transports:
                ours[t].append(run(mpiexec + ["-m", "mpi4py", "-m", "hpc_moe", "bench", "layer", *flags,
                                              f"--dispatch={a.dispatch}", f"--micro-batches={a.micro_batches}",
                                              f"--transport={t}"], out / f"{name}-hpc-{t}-{r}.json"))
            theirs.append(run(mpiexec + ["scripts/torch_moe_layer.py", *flags], out / f"{name}-torch-{r}.json"))
        torch_ms = statistics.median(x["layer_ms"] for x in theirs)
        summary[name] = {**shape, "ranks": a.np, "dispatch": a.dispatch, "micro_batches": a.micro_batches,
                         "launcher": a.launcher, "repeats": a.repeats, "torch_layer_ms": torch_ms,
                         "torch_phases_ms": _phase_medians(theirs), "hpc_moe": {}}
        for t in transports:
            med = {k: statistics.median(x[k] for x in ours[t]) for k in ("layer_ms", "floor_ms", "expert_floor_ms")}
            s = summary[name]["hpc_moe"][t] = {
                "transport": ours[t][0]["config"]["transport"], "layer_ms": med["layer_ms"],
                "speedup": torch_ms / med["layer_ms"], "raw_alltoall_floor_ms": med["floor_ms"],
                "gemm_floor_ms": med["expert_floor_ms"], "phases_ms": _phase_medians(ours[t])}
            print(f"{name}: {shape} on {a.np} ranks, {a.repeats} repeats: hpc_moe ({s['transport']}) "
                  f"{s['layer_ms']:.1f} ms, torch {torch_ms:.1f} ms, speed-up {s['speedup']:.2f}x; floors: all-to-all "
                  f"{med['floor_ms']:.1f} ms, GEMMs alone {med['expert_floor_ms']:.1f} ms; expert phase "
                  f"{s['phases_ms']['expert']:.1f} ms (torch {summary[name]['torch_phases_ms']['expert']:.1f})",
                  flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
