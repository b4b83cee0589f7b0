#!/usr/bin/env bash
# A straggler made on purpose, and the report that names it: a 4-rank run of the small model on this
# machine, one rank stopped STOP_MS of every STOP_MS + RUN_MS (SIGSTOP / SIGCONT, as a noisy
# neighbour or a descheduled process would be), then `hpc-moe report`'s straggler table.
#
#   scripts/straggler_demo.sh [OUT_DIR] [RANK] [STOP_MS] [RUN_MS]    # defaults: /tmp/hpc-moe-straggler 2 50 20
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/hpc-moe-straggler} rank=${2:-2} stop_ms=${3:-50} run_ms=${4:-20}
mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
.venv/bin/mpiexec -n 4 .venv/bin/python -m mpi4py -m hpc_moe run --config small --layers 3 --mode prefill \
  --batch 16 --seq-len 64 --steps 12 --warmup 1 --events-every 1 --trace "$out/straggler.h5" --overwrite \
  > "$out/run.log" 2>&1 &
job=$!
pid=
trap 'kill -CONT $pid 2>/dev/null || true; kill $job 2>/dev/null || true' EXIT
for _ in $(seq 100); do  # the rank's process: Hydra gives each its PMI_RANK
  for p in $(pgrep -f "hpc_moe run --config small" || true); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "PMI_RANK=$rank" && pid=$p
  done
  [ -n "$pid" ] && break
  sleep 0.1
done
[ -n "$pid" ] || { echo "straggler_demo.sh: rank $rank did not start" >&2; exit 1; }
while kill -0 "$job" 2>/dev/null; do
  kill -STOP "$pid" 2>/dev/null || true; sleep "$(printf '0.%03d' "$stop_ms")"
  kill -CONT "$pid" 2>/dev/null || true; sleep "$(printf '0.%03d' "$run_ms")"
done
wait "$job"
.venv/bin/hpc-moe report "$out/straggler.h5" --no-plots | sed -n '/^Stragglers/,/^$/p'
