"""The Intel MPI Benchmarks' figure for the bytes a benchmark moved: a floor measured by a tool nobody
here wrote, printed next to ``bench dispatch``'s own raw Ialltoallv floor.

IMB-MPI1's Alltoallv sends the same message length to every rank (self included); a dispatch's
per-peer counts vary. The length asked for is the mean over ranks and peers of the bytes a rank
sends (its own rows included), so both move the same bytes in all. IMB reports, per length, the
time of one call averaged over its repetitions (``-iter``: as many as the benchmark's, every one
run), then the min, max and mean of that over ranks: its t_max is the nearest to this package's
"max over ranks of one iteration", but it is a mean over calls where ours is a median, so on a
machine with load spikes IMB's figure follows the spikes.

IMB is an MPI program of its own: rank 0 starts it with the ``mpiexec`` that sits next to it (the
``impi-rt`` wheel installs both into the venv's bin/) on as many ranks, on rank 0's machine, while
the benchmark's ranks wait without spinning. So it runs only where every rank is on that machine
(simulated nodes are fine); on a cluster it says it was skipped. Nothing here raises: a missing or
failing IMB is a line in the JSON, not a failed benchmark.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from mpi4py import MPI

IMB_BINARY = "IMB-MPI1"
# The variables by which a launcher tells its ranks who they are: a nested mpiexec that saw them
# would join this job instead of starting its own.
_LAUNCHER_VARS = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD",
                  "OMPI_MCA_ess", "OMPI_MCA_orte", "OMPI_MCA_pmix", "PRTE_", "SLURM_STEP", "SLURM_PROCID")


def find_imb(search: str | None = None) -> tuple[str, str] | None:
    """(IMB-MPI1, the mpiexec next to it), looked for beside this Python (a venv's bin/) and then on
    PATH (or on ``search``, a PATH-like string); None where either is missing."""
    path = search if search is not None else os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    imb = shutil.which(IMB_BINARY, path=path)
    if imb is None:
        return None
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(imb))
    return (imb, mpiexec) if mpiexec else None


def parse_imb(text: str) -> dict[int, dict[str, float]]:
    """IMB's result lines ``#bytes #repetitions t_min t_max t_avg`` (microseconds) -> {bytes:
    {"t_min_ms", "t_max_ms", "t_avg_ms"}}; other lines are ignored."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 5 and all(c.replace(".", "", 1).isdigit() for c in f):
            out[int(f[0])] = {"t_min_ms": float(f[2]) / 1e3, "t_max_ms": float(f[3]) / 1e3, "t_avg_ms": float(f[4]) / 1e3}
    return out


def imb_alltoallv(comm: MPI.Comm, machines, lengths: dict[str, int], iters: int, timeout_s: float = 300.0,
                  search: str | None = None) -> dict:
    """IMB-MPI1 Alltoallv on comm's size, at each of ``lengths`` ({name: bytes per peer}). Collective.

    Returns (the same on every rank) {"binary", "ranks", name: {"bytes_per_peer", "t_min_ms",
    "t_max_ms", "t_avg_ms"}} or {"skipped": why}. ``machines``: every rank's machine id (rank 0's
    machine must hold them all)."""
    result = {"skipped": "not run"}
    if comm.Get_rank() == 0:
        result = _run_on_root(comm.Get_size(), set(machines), lengths, iters, timeout_s, search)
    return _bcast_politely(comm, result)


def _run_on_root(ranks: int, machines: set, lengths: dict[str, int], iters: int, timeout_s: float, search) -> dict:
    found = find_imb(search)
    if found is None:
        return {"skipped": f"{IMB_BINARY} not found beside {sys.executable} nor on PATH (make install MPI=impi ships it)"}
    if len(machines) > 1:
        return {"skipped": f"the ranks span {len(machines)} machines: {IMB_BINARY} is started on rank 0's only"}
    imb, mpiexec = found
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_VARS)}
    lib = os.path.join(os.path.dirname(os.path.dirname(imb)), "lib")  # the wheel's libmpi.so.12 has no RPATH to it
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        msglen = os.path.join(tmp, "msglen")
        with open(msglen, "w") as f:
            f.write("".join(f"{n}\n" for n in sorted(set(lengths.values()))))
        # IMB cuts lengths above 2^22 bytes down to it unless -msglog's top and -mem (GB of buffers
        # per process: a send and a receive buffer of every peer's message) allow them.
        top = max(lengths.values())
        cmd = [mpiexec, "-n", str(ranks), imb, "Alltoallv", "-npmin", str(ranks), "-msglen", msglen,
               "-msglog", f"0:{max(22, math.ceil(math.log2(top)))}", "-mem", f"{max(1.0, 3 * ranks * top / 2**30):.1f}",
               "-iter", str(max(iters, 1)), "-iter_policy", "off", "-time", "60"]  # as many calls as ours
        try:
            done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"skipped": f"{IMB_BINARY} did not run: {e}"}
    rows = parse_imb(done.stdout)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        return {"skipped": f"{IMB_BINARY} failed (exit {done.returncode}): {last[0][:200]}"}
    missing = sorted(n for n in set(lengths.values()) if n not in rows)
    if missing:
        return {"skipped": f"{IMB_BINARY} reported no row for {missing} bytes (it did for {sorted(rows)})"}
    out = {"binary": imb, "ranks": ranks}
    for name, n in lengths.items():
        out[name] = {"bytes_per_peer": int(n), **rows[n]}
    return out


def _bcast_politely(comm: MPI.Comm, obj: dict) -> dict:
    """Broadcast rank 0's dict; the other ranks wait by sleeping between tests, not inside MPI, where
    some libraries spin on a core that IMB's ranks need."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if comm.Get_rank() == 0 else None
    size = np.array([0 if data is None else data.size], np.int64)
    _wait(comm.Ibcast([size, MPI.INT64_T], root=0))
    buf = data if data is not None else np.empty(int(size[0]), np.uint8)
    _wait(comm.Ibcast([buf, MPI.BYTE], root=0))
    return json.loads(bytes(buf).decode())


def _wait(req: MPI.Request) -> None:
    while not req.Test():
        time.sleep(0.02)
