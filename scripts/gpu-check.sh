#!/usr/bin/env bash
# Everything GPU-side in one call on a bare GPU machine (the device tool's `run`, carrying .whl):
#   scripts/gpu-check.sh [DIR]        (default /tmp/gpu-check; with $OUT set, as the device tool
#                                      sets it, DIR is also packed into $OUT/gpu-check.tgz beside
#                                      $OUT/summary.txt: the tool brings back 8 files at most)
# Installs the carried wheels (scripts/gpu-wheels.sh), then, each step's log in DIR and its exit
# status in DIR/summary.txt, a failing step not stopping the next:
#   env       versions of CuPy, NCCL, MPI, torch and the GPU
#   tests     the GPU tests (parity in bf16, CUDA-event phase timing, bench kernels)
#   kernels   hpc-moe bench kernels at the deepseek-v3 shapes (kernels.json)
#   dispatch  hpc-moe bench dispatch with --backend cupy, 4 ranks sharing the GPU (dispatch.json)
#   layer     hpc-moe bench layer with --backend cupy, 4 ranks (layer.json)
#   run       the paper model truncated to 4 layers, 4 ranks, --overlap off and on (run-*.h5)
#   report    hpc-moe report of the two runs
#   plan      hpc-moe plan's prediction of that run on the h200 hardware file (plan.json)
# BACKEND=numpy QUICK=1 runs the same steps on a CPU machine at toy sizes (to check the script).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
: > "$out/summary.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=${PYTHON:-python3}
backend=${BACKEND:-cupy}
np=4
if [ -n "${QUICK:-}" ]; then
  kernels=(--config tiny --tokens 16,64 --prefill 32 --decode 4x64 --peak-size 512 --copy-mib 16 --iters 3)
  size=(--tokens 64 --hidden 256 --experts 16 --topk 4); layer=(--tokens 64 --hidden 256 --inter 64)
  config=(--config tiny); layers=3
else
  kernels=(--config deepseek-v3 --tokens 128,512,2048,4096,8192,16384 --prefill 1024,4096 --decode 32x4096,128x4096,256x2048)
  size=(--tokens 2048 --hidden 7168 --experts 256 --topk 8); layer=(--tokens 2048 --hidden 7168 --inter 2048)
  config=(--config paper); layers=4
fi
step() {  # name command...: run it, its output to OUT/name.log, its status to the summary
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  "$@" > "$out/$name.log" 2>&1
  echo "   rc=$?" | tee -a "$out/summary.txt"
}
step env $py -c "
import mpi4py, numpy, h5py; from mpi4py import MPI
print('numpy', numpy.__version__, 'h5py', h5py.__version__, 'mpi4py', mpi4py.__version__, MPI.Get_library_version().splitlines()[0])
from hpc_moe.backend import get_backend; be = get_backend('$backend'); print('backend', be.name, be.dtype, be.device)
if be.is_gpu:
    import cupy; print('cupy', cupy.__version__, 'nccl', cupy.cuda.nccl.get_version() if cupy.cuda.nccl.available else None)
import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
step tests $py -m pytest -q -p no:cacheprovider -rs tests/test_parity_gpu.py tests/test_timing.py tests/test_bench_kernels.py
step kernels $py -m hpc_moe bench kernels --backend "$backend" "${kernels[@]}" --json "$out/kernels.json"
step dispatch mpiexec -n $np $py -m mpi4py -m hpc_moe bench dispatch --backend "$backend" "${size[@]}" \
  --json "$out/dispatch.json"
step layer mpiexec -n $np $py -m mpi4py -m hpc_moe bench layer --backend "$backend" "${layer[@]}" --experts $np --topk 2 \
  --json "$out/layer.json"
for ov in off on; do
  step run-$ov mpiexec -n $np $py -m mpi4py -m hpc_moe run "${config[@]}" --layers $layers --backend "$backend" \
    --allow-shared-gpu --mode prefill --batch 16 --seq-len 512 --steps 6 --overlap $ov --trace "$out/run-$ov.h5" \
    --overwrite --summary-json "$out/run-$ov.json"
done
step report $py -m hpc_moe report "$out/run-off.h5" "$out/run-on.h5" --no-plots
step plan $py -m hpc_moe plan "${config[@]}" --layers $layers --ranks $np --ranks-per-node $np --sequences 4 \
  --context 512 --tokens 2048 --hardware h200 --json "$out/plan.json"
cat "$out/summary.txt"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-check.tgz" -C "$out" . && cp "$out/summary.txt" "$OUT/"
fi
