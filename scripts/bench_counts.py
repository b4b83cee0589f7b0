"""The count exchange of an Ialltoallv exchange (one int64 per peer), as a non-blocking
`Ialltoall` against MPI-4's persistent `Alltoall_init` + `Start`, in one run, alternating:

    OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python scripts/bench_counts.py [--calls 2000]

Prints the microseconds per call (mean over the calls, the slowest rank), two rounds each.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from mpi4py import MPI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args()
    comm = MPI.COMM_WORLD
    send = np.arange(comm.size, dtype=np.int64)
    recv = np.empty_like(send)
    persistent = comm.Alltoall_init([send, MPI.INT64_T], [recv, MPI.INT64_T])

    def per_call(fn) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(a.calls):
            fn()
        return (time.perf_counter() - t0) / a.calls * 1e6

    def started():
        persistent.Start()
        persistent.Wait()

    def posted():
        comm.Ialltoall([send, MPI.INT64_T], [recv, MPI.INT64_T]).Wait()

    us = np.array([per_call(f) for f in (posted, started, posted, started)])
    comm.Allreduce(MPI.IN_PLACE, us, op=MPI.MAX)
    persistent.Free()
    if comm.rank == 0:
        print(f"{comm.size} ranks: Ialltoall + Wait {us[0]:.1f} / {us[2]:.1f} us, "
              f"Alltoall_init Start + Wait {us[1]:.1f} / {us[3]:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
