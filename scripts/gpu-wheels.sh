#!/usr/bin/env bash
# The wheels scripts/gpu-check.sh needs on a bare GPU machine (Python 3.12, x86-64) that its
# image lacks: an MPI library (the mpich wheel), the mpi4py built for it and pytest-mpi. The
# image already has CuPy (cupy-cuda13x 14), NCCL, h5py, ml-dtypes, PyTorch and matplotlib.
#   scripts/gpu-wheels.sh          # into .whl/ (ignored by git; carry it to the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 -d .whl \
  mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6
ls -la .whl
