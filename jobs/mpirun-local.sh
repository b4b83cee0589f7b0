#!/bin/bash
# Bare metal, one machine: the embedded default run on NP ranks (oversubscribed on small CPUs).
#   jobs/mpirun-local.sh 8
# On a cluster without Slurm, use your MPI's host file:  mpirun -np 16 --hostfile hosts ...
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:-4}
# Ranks share the cores: one BLAS thread each, or idle BLAS threads spin against the other ranks.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
.venv/bin/mpiexec -n "$NP" .venv/bin/python -m mpi4py -m hpc_moe run --config tiny --steps 20 \
    --warmup 2 --trace "out/local-n$NP.h5" --overwrite
