#!/usr/bin/env bash
# The figures of docs/benchmarks.md "On the cluster on one machine", in one go (root; about 15 min):
# 4 nodes x 4 ranks, each node's NIC shaped to 1 Gbit/s (scripts/cluster.sh), the `wide` preset
# (the tiny model with 2048-wide rows, so that a step's bytes, not its FLOPs, bound it).
#
#   scripts/bench_cluster.sh [OUT]          # default out/cluster; brings the cluster up and down
#   RATE=250mbit PARTS="runs" scripts/bench_cluster.sh OUT    # another link rate, some parts only
#
# OUT/runs.tsv: one line per run: name, ranks, nodes, dispatch, overlap, step ms (median), MoE
# layer ms (slowest rank), cross-node bytes (trace, measured steps), NIC TX bytes (all nodes, the
# whole run: warm-up and start-up included), the exchanges' in-flight and exposed ms a step and
# the hidden share, and the CPU seconds the whole run took in user and kernel mode; OUT/*.h5 the
# traces, OUT/*.json the summaries; OUT/compare-*/ the PyTorch layer
# against bench layer; OUT/floor.txt the raw Ialltoallv of the same bytes; links-*: node0's NIC
# at SLOW (default 250mbit), experts skewed (zipf), placed without and with the measured links;
# OUT/planner.txt: the planner calibrated on fit-* traces (links as run measured them) against the
# held-out held-* and scale-* traces; eplb-*: placement policies on a skewed load (not in the
# default PARTS: PARTS=eplb).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/cluster}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-6}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mkdir -p "$OUT"
C=scripts/cluster.sh
PARTS=${PARTS:-runs scaling floor compare links planner}  # any of them
$C up --nodes 4 --rate "${RATE:-1gbit}"
trap '$C down >/dev/null' EXIT

tx() { $C nic-bytes | awk '{s += $2} END {printf "%.0f\n", s}'; }
# CPU seconds of the machine's cores so far: user (with nice), then kernel (system, irq, softirq:
# where TCP, the veths, the bridge and the shapers run).
cpu() { awk '/^cpu / {printf "%.2f %.2f\n", ($2 + $3) / 100, ($4 + $7 + $8) / 100}' /proc/stat; }
# NAME NP ARGS...: one hpc-moe run, its NIC bytes and its figures on one line of runs.tsv.
run() {
  local name=$1 np=$2; shift 2
  local before cpu0 cpu1; before=$(tx); cpu0=$(cpu)
  $C mpiexec ${PPN:+--ppn "$PPN"} -n "$np" "$PY" -m mpi4py -m hpc_moe run --config wide --mode prefill --seq-len 64 \
     --steps "$STEPS" --warmup 1 --trace "$OUT/$name.h5" --overwrite --summary-json "$OUT/$name.json" "$@" \
     > "$OUT/$name.log" 2>&1
  cpu1=$(cpu)
  "$PY" - "$OUT/$name.h5" "$name" "$np" "$(( $(tx) - before ))" "$*" $cpu0 $cpu1 >> "$OUT/runs.tsv" <<'EOF'
import sys
import numpy as np
from hpc_moe.trace.metrics import comm_stats, exchange_overlap
from hpc_moe.trace.reader import read_trace
t = read_trace(sys.argv[1])
cross = int(comm_stats(t)["inter_node_bytes_per_step"] * t.num_steps)
moe = t.phase_time_s[:, list(t.moe_layers)].sum(axis=(1, 3)).max(axis=1) / len(t.moe_layers)  # [S] slowest rank
ov = exchange_overlap(t)
print("\t".join(map(str, [sys.argv[2], sys.argv[3], t.num_nodes, sys.argv[5],
                          round(1e3 * float(np.median(t.wall_time_s)), 1), round(1e3 * float(np.median(moe)), 1),
                          cross, sys.argv[4], round(ov["total_in_flight"], 1), round(ov["total_blocked"], 1),
                          round(ov["total_hidden"], 3),
                          round(float(sys.argv[8]) - float(sys.argv[6]), 1), round(float(sys.argv[9]) - float(sys.argv[7]), 1)])))
EOF
  tail -n 1 "$OUT/runs.tsv"
}

printf 'name\tranks\tnodes\targs\tstep_ms\tmoe_layer_ms\tcross_node_B\tnic_tx_B\tin_flight_ms\texposed_ms\thidden\tcpu_user_s\tcpu_kernel_s\n' > "$OUT/runs.tsv"
part() { [[ " $PARTS " == *" $1 "* ]]; }
# Hierarchical against flat, overlap off and on: 32 sequences of 64 tokens a step, 2 a rank.
if part runs; then
  for dispatch in flat hierarchical; do
    for overlap in off on; do
      run "$dispatch-$overlap" 16 --batch 32 --dispatch "$dispatch" --overlap "$overlap"
    done
  done
fi
# Scaling at fixed work per rank (2 sequences a rank), 1 to 4 nodes of 4 ranks.
if part scaling; then
  for n in 1 2 4; do PPN=4 run "scale-n$n" $((4 * n)) --batch $((8 * n)); done
fi
# What the fabric imposes: a raw Ialltoallv of the same bytes (bench dispatch's floor column).
part floor && $C mpiexec -n 16 "$PY" -m mpi4py -m hpc_moe bench dispatch --tokens 128 --hidden 2048 --experts 16 --topk 4 \
   --dtype float32 --no-overlap --iters 5 > "$OUT/floor.txt" 2>&1 || true
# Against PyTorch over the same fabric (gloo), both started by Hydra across the nodes, interleaved.
if part compare; then
  for variant in ${VARIANTS:-flat:1 hierarchical:1 hierarchical:2}; do  # dispatch:micro-batches
    "$PY" scripts/compare_layer.py --np 16 --repeats 3 --iters 5 --shapes cluster --dispatch "${variant%:*}" \
       --micro-batches "${variant#*:}" --launcher "$C mpiexec" --out "$OUT/compare-${variant/:/-mb}" 2>/dev/null \
       | tee -a "$OUT/compare.txt"
  done
fi
# One slow node: placement by the loads of a skewed run, without and with the links measured at
# the start (the heaviest node's experts away from the slow node).
if part links; then
  $C rate node0 "${SLOW:-250mbit}"
  run links-loads 16 --batch 32 --routing zipf:1.2 --probe-links off
  for probe in off on; do
    run "links-$probe" 16 --batch 32 --routing zipf:1.2 --loads-from "$OUT/links-loads.h5" --probe-links "$probe"
  done
  $C rate node0 "${RATE:-1gbit}"
fi
# Placement policies on a skewed load (zipf:1.2, 2048-wide rows): the issue's 12 experts in 4 groups
# (e12), and the 16 of `wide` with 16 redundant (w16r16: 2 a rank); per layout one run measures the
# loads, then hierarchical, global and auto place from them, alternated REPS times
# (eplb-LAYOUT-POLICY-REP; the rank load each measured is in its .json).
if part eplb; then
  for layout in ${EPLB_LAYOUTS:-e12 w16r16}; do
    case $layout in
      e12) L=(--config scripts/eplb/wide-e12.json) ;;
      w16r16) L=(--config wide --redundant-experts 16) ;;
      *) echo "EPLB_LAYOUTS: e12 or w16r16 (got $layout)" >&2; exit 2 ;;
    esac
    L+=(--batch 32 --routing zipf:1.2 --probe-links off)
    run "eplb-$layout-loads" 16 "${L[@]}"
    for rep in $(seq "${REPS:-3}"); do
      for eplb in hierarchical global auto; do
        run "eplb-$layout-$eplb-$rep" 16 "${L[@]}" --loads-from "$OUT/eplb-$layout-loads.h5" --eplb "$eplb"
      done
    done
  done
fi
# The planner on real links: fitted to some shapes, predicting others (and the scaling runs).
if part planner; then
  run fit-p16 16 --batch 16
  run fit-p32-flat 16 --batch 32 --dispatch flat
  run fit-p64 16 --batch 64 --seq-len 32
  run fit-d64 16 --mode decode --batch 64 --seq-len 256
  PPN=4 run fit-p16-n2 8 --batch 16
  PPN=4 run fit-p4-n1 4 --batch 4 --seq-len 128
  run held-p48 16 --batch 48 --seq-len 48
  run held-d128-flat 16 --mode decode --batch 128 --seq-len 128 --dispatch flat
  run held-p32-mb2 16 --batch 32 --overlap on
  part scaling || for n in 1 2 4; do PPN=4 run "scale-n$n" $((4 * n)) --batch $((8 * n)); done
  "$PY" -m hpc_moe plan --calibrate "$OUT"/fit-*.h5 --validate "$OUT"/held-*.h5 "$OUT"/scale-*.h5 \
     --hardware cpu-2core --links-from "$OUT/fit-p16.h5" --json "$OUT/planner.json" > "$OUT/planner.txt" 2>&1
  tail -n 3 "$OUT/planner.txt"
fi
