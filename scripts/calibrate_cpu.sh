#!/usr/bin/env bash
# Calibrate the planner on this machine and check it on shapes the fit never saw:
#   scripts/calibrate_cpu.sh [OUT_DIR]      (about 2 minutes on the 2-core CI VM; on an idle machine)
#   SAVE=data/hardware/cpu-2core.json scripts/calibrate_cpu.sh    # replace the committed file
# Runs the `small` model at 1 to 8 ranks, prefill and decode, several batches and lengths, on one
# node and on 2 and 4 simulated nodes (--ranks-per-node: hierarchical dispatch); one trace a shape.
# The fit set spans the range and the held-out set lies inside it, every shape different; the
# held-out traces are predicted from their shapes alone, the expert imbalance from a fit trace's
# loads. Writes the fit to OUT_DIR/cpu-2core.json, or to SAVE (the committed
# data/hardware/cpu-2core.json only when asked: every later --hardware cpu-2core uses it), its
# peaks (from scripts/cpu_peaks.py) kept, and the table to OUT_DIR/validation.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/hpc-moe-calibration}
mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
run() {  # name ranks mode batch seq_len [more run flags]
  local name=$1 n=$2 mode=$3 batch=$4 len=$5; shift 5
  .venv/bin/mpiexec -n "$n" .venv/bin/hpc-moe run --config small --mode "$mode" --batch "$batch" \
    --seq-len "$len" --steps 6 --warmup 2 --events-every 1 --trace "$out/$name.h5" --overwrite "$@" >/dev/null
}
# the fit: the corners of the range (fewest and most tokens a rank, shortest and longest contexts)
run fit-p1 1 prefill 4 64;    run fit-p2 2 prefill 16 64;  run fit-p2l 2 prefill 4 512
run fit-p4 4 prefill 16 128;  run fit-p8 8 prefill 64 64
run fit-d1 1 decode 32 2048;  run fit-d2 2 decode 16 256;  run fit-d4 4 decode 32 512
run fit-d8 8 decode 16 128
run fit-n4p 8 prefill 32 64 --ranks-per-node 4;  run fit-n2d 8 decode 32 512 --ranks-per-node 2
# held out: shapes inside that range, none of them in the fit
run out-p1 1 prefill 8 128;   run out-p2 2 prefill 8 256;  run out-p3 3 prefill 12 96
run out-p4 4 prefill 8 256;   run out-p8 8 prefill 32 64;  run out-o4 4 prefill 16 96 --overlap on
run out-d1 1 decode 64 1024;  run out-d2 2 decode 8 2048;  run out-d4 4 decode 64 1024
run out-d8 8 decode 32 512
run out-n2p 8 prefill 32 128 --ranks-per-node 2; run out-n4d 8 decode 64 256 --ranks-per-node 4
.venv/bin/hpc-moe plan --hardware cpu-2core --calibrate "$out"/fit-*.h5 --validate "$out"/out-*.h5 \
  --loads-from "$out/fit-p8.h5" --save "${SAVE:-$out/cpu-2core.json}" --json "$out/validation.json"
