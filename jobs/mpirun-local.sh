#!/bin/bash
# Bare metal, no Slurm: the embedded default run on NP ranks, on this machine or on the hosts of a
# Hydra host file (one "host:slots" per line; the venv at the same path on every host).
#   jobs/mpirun-local.sh 8                      # this machine (oversubscribed on small CPUs)
#   HOSTFILE=hosts jobs/mpirun-local.sh 16      # 2 hosts of 8 GPUs: "gpu01:8" and "gpu02:8" in hosts
# Other MPIs: Open MPI's mpirun takes --hostfile instead of -f (MPIEXEC="mpirun --hostfile hosts").
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:-4}
MPIEXEC=${MPIEXEC:-.venv/bin/mpiexec${HOSTFILE:+ -f $HOSTFILE}}
# Ranks share the cores: one BLAS thread each, or idle BLAS threads spin against the other ranks.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
$MPIEXEC -n "$NP" .venv/bin/python -m mpi4py -m hpc_moe run --config "${CONFIG:-tiny}" --steps "${STEPS:-20}" \
    --warmup 2 --trace "out/local-n$NP.h5" --overwrite
