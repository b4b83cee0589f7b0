"""A node lost in the middle of a run, and the run resumed on the nodes left, on the cluster on one
machine (scripts/cluster.sh up --nodes N first): what ``hpc-moe run --resume`` costs in time.

Starts ``hpc-moe run`` on every node (--ppn ranks a node, Hydra from node0), kills one node's
processes (``cluster.sh kill``, as a node that dies) once the trace holds --kill-after steps,
waits for the job to end (the other ranks' MPI or the watchdog ends it), then runs
``hpc-moe run --resume`` on the nodes left and prints one JSON object: the node lost, the steps
written before, how long the job took to end after the kill, the exit codes, and from the kill to
the resumed run opening the trace and to its first step starting (the trace's own clock).

    python scripts/lost_node.py --trace /tmp/t.h5 --nodes 4 --ppn 2 --kill-after 4 --lost node2 -- \\
        --config tiny --mode mixed --batch 16 --seq-len 32 --steps 14 --watchdog 20 --deterministic

Run as root beside a cluster of scripts/cluster.sh; tests/test_cluster.py runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hpc_moe.trace.reader import read_trace

REPO = Path(__file__).resolve().parents[1]
CLUSTER = str(REPO / "scripts/cluster.sh")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def steps_in(trace: Path) -> int:
    try:
        return read_trace(trace).num_steps
    except Exception:  # noqa: BLE001 (between the file's creation and its first flush)
        return 0


def run(nodes: list[str], ppn: int, args: list[str], **kw) -> subprocess.Popen:
    cmd = [CLUSTER, "mpiexec", "--nodes", ",".join(nodes), "-n", str(ppn * len(nodes)), sys.executable, "-m",
           "mpi4py", "-m", "hpc_moe", "run", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, type=Path)
    p.add_argument("--nodes", type=int, required=True, help="the cluster's nodes (all run the first part)")
    p.add_argument("--ppn", type=int, default=2, help="ranks a node")
    p.add_argument("--kill-after", type=int, default=3, help="steps the trace holds when the node is lost")
    p.add_argument("--lost", default="node1", help="the node lost (not node0: Hydra runs there)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then hpc-moe run's flags (not --trace)")
    o = p.parse_args()
    args = [a for a in o.run_args if a != "--"]
    nodes = [f"node{i}" for i in range(o.nodes)]
    o.trace.unlink(missing_ok=True)  # an earlier file would be read as this run's steps before it starts
    job = run(nodes, o.ppn, [*args, "--trace", str(o.trace)], start_new_session=True)
    deadline = time.monotonic() + o.timeout
    try:
        while steps_in(o.trace) < o.kill_after:
            if job.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lost_node: the run ended or wrote no {o.kill_after} steps: {job.communicate()[1][-2000:]}")
            time.sleep(0.2)
        killed = time.time()
        subprocess.run([CLUSTER, "kill", o.lost], check=True, cwd=REPO, env=ENV)
        _, err = job.communicate(timeout=o.timeout)
        ended = time.time()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, 9)
            job.communicate()
    written = read_trace(o.trace).num_steps
    left = [n for n in nodes if n != o.lost]
    resumed = run(left, o.ppn, ["--resume", str(o.trace)])
    out, rerr = resumed.communicate(timeout=o.timeout)
    t = read_trace(o.trace)
    seg = t.segments[-1]
    mine = seg.holds(t.step)
    first_start = float(t.time_unix[mine][0] - t.wall_time_s[mine][0]) if mine.any() else None
    print(json.dumps({
        "lost": o.lost, "steps_before": written, "steps": t.num_steps, "state": t.state,
        "exit_code": job.returncode, "resume_exit_code": resumed.returncode,
        "job_end_s": round(ended - killed, 3),
        "to_resumed_open_s": round(seg.started_unix - killed, 3),
        "to_first_resumed_step_s": None if first_start is None else round(first_start - killed, 3),
        "resumed_ranks": seg.num_ranks, "resumed_hosts": sorted(set(seg.ranks["host"].tolist())),
        "first_error_line": (err.strip().splitlines() or [""])[-1][:300],
        "resume_error": rerr[-2000:] if resumed.returncode else "",
    }))
    return 0 if resumed.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
