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
# Each step runs under a time limit of its own (timeout -k 10), and DIR is packed into $OUT after
# every step, so that a step that runs out of time still leaves what finished.
# BACKEND=numpy QUICK=1 runs the same steps on a CPU machine at toy sizes (to check the script);
# WHEELS=DIR installs the wheels of DIR instead of .whl (here: a check of the install itself).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
: > "$out/summary.txt"
wheels=${WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  # --prefix, not --target: --target drops the mpich wheel's lib/ (libmpi.so.12), and mpi4py then
  # cannot load its MPI.
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/site "$wheels"/*.whl
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("platlib", vars={"base": "/tmp/site", "platbase": "/tmp/site"}))')
  export PYTHONPATH=$site PATH=/tmp/site/bin:$PATH LD_LIBRARY_PATH=/tmp/site/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
py=${PYTHON:-python3}
backend=${BACKEND:-cupy}
dtype=$([ "$backend" = cupy ] && echo bfloat16 || echo float32)  # bench layer defaults to float32
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
pack() {
  [ -z "${OUT:-}" ] || { tar czf "$OUT/gpu-check.tgz" -C "$out" . && cp "$out/summary.txt" "$OUT/"; }
}
step() {  # name seconds command...: run it under the limit, its output to DIR/name.log, its status
  local name=$1 limit=$2 t0=$SECONDS; shift 2   # and time to the summary; then pack DIR
  echo "== $name: $*" | tee -a "$out/summary.txt"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   rc=$? ($((SECONDS - t0)) s of $limit)" | tee -a "$out/summary.txt"
  pack
}
step env 30 $py -c "
import mpi4py, numpy, h5py; from mpi4py import MPI
print('numpy', numpy.__version__, 'h5py', h5py.__version__, 'mpi4py', mpi4py.__version__, MPI.Get_library_version().splitlines()[0])
from hpc_moe.backend import get_backend; be = get_backend('$backend'); print('backend', be.name, be.dtype, be.device)
if be.is_gpu:
    import cupy; print('cupy', cupy.__version__, 'nccl', cupy.cuda.nccl.get_version() if cupy.cuda.nccl.available else None)
import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
step tests 90 $py -m pytest -q -p no:cacheprovider -rs tests/test_parity_gpu.py tests/test_timing.py tests/test_bench_kernels.py
step transports 45 mpiexec -n 2 $py -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi -rs \
  tests/mpi/test_dispatch.py -k "gpu_transports or nccl_set_up or leave_their"
step kernels 90 $py -m hpc_moe bench kernels --backend "$backend" "${kernels[@]}" --json "$out/kernels.json"
# The next steps put 4 ranks on the one GPU: NCCL refuses two ranks on a GPU, so MPI on host buffers.
step dispatch 45 mpiexec -n $np $py -m mpi4py -m hpc_moe bench dispatch --backend "$backend" "${size[@]}" \
  --transport host --json "$out/dispatch.json"
step layer 45 mpiexec -n $np $py -m mpi4py -m hpc_moe bench layer --backend "$backend" "${layer[@]}" --experts $np --topk 2 \
  --dtype "$dtype" --transport host --json "$out/layer.json"
for ov in off on; do
  step run-$ov 60 mpiexec -n $np $py -m mpi4py -m hpc_moe run "${config[@]}" --layers $layers --backend "$backend" \
    --allow-shared-gpu --transport host --watchdog 60 --mode prefill --batch 16 --seq-len 512 --steps 6 --overlap $ov --trace "$out/run-$ov.h5" \
    --overwrite --summary-json "$out/run-$ov.json"
done
step report 30 $py -m hpc_moe report "$out/run-off.h5" "$out/run-on.h5" --no-plots
step plan 30 $py -m hpc_moe plan "${config[@]}" --layers $layers --ranks $np --ranks-per-node $np --sequences 4 \
  --context 512 --tokens 2048 --hardware h200 --json "$out/plan.json"
cat "$out/summary.txt"
