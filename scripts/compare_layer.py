"""hpc-moe bench layer against the PyTorch all_to_all_single baseline (scripts/torch_moe_layer.py):
the same shapes and inputs, runs interleaved so that both see the same machine, medians of repeats.

    .venv/bin/python scripts/compare_layer.py [--np 8] [--repeats 3] [--iters 20] [--out out/compare]
        [--shapes comm-heavy,compute-heavy] [--dispatch auto|flat|hierarchical] [--micro-batches M]
        [--launcher "scripts/cluster.sh mpiexec"]   # across the nodes of the cluster on one machine

Prints, per shape, layer_ms of each (median over repeats of each run's median) and the speed-up
torch / hpc_moe, with the floors bench layer measures (raw all-to-all, GEMMs alone); writes every
run's JSON and a summary.json under --out. Needs torch (make install brings the CPU wheel).
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
        ours, theirs = [], []
        for r in range(a.repeats):
            ours.append(run(mpiexec + ["-m", "mpi4py", "-m", "hpc_moe", "bench", "layer", *flags,
                                       f"--dispatch={a.dispatch}", f"--micro-batches={a.micro_batches}"],
                            out / f"{name}-hpc-{r}.json"))
            theirs.append(run(mpiexec + ["scripts/torch_moe_layer.py", *flags], out / f"{name}-torch-{r}.json"))
        med = {k: statistics.median(x[k] for x in ours) for k in ("layer_ms", "floor_ms", "expert_floor_ms")}
        torch_ms = statistics.median(x["layer_ms"] for x in theirs)
        summary[name] = {**shape, "ranks": a.np, "dispatch": a.dispatch, "micro_batches": a.micro_batches,
                         "launcher": a.launcher,
                         "repeats": a.repeats, "hpc_moe_layer_ms": med["layer_ms"],
                         "torch_layer_ms": torch_ms, "speedup": torch_ms / med["layer_ms"],
                         "raw_alltoall_floor_ms": med["floor_ms"], "gemm_floor_ms": med["expert_floor_ms"],
                         "hpc_moe_phases_ms": _phase_medians(ours), "torch_phases_ms": _phase_medians(theirs)}
        s = summary[name]
        print(f"{name}: {shape} on {a.np} ranks, {a.repeats} repeats: hpc_moe {s['hpc_moe_layer_ms']:.1f} ms, "
              f"torch {torch_ms:.1f} ms, speed-up {s['speedup']:.2f}x; floors: all-to-all {med['floor_ms']:.1f} ms, "
              f"GEMMs alone {med['expert_floor_ms']:.1f} ms", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
