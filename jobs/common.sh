# Shared settings of the hpc_moe job scripts: sourced by each of them (never run on its own).
#
# One MPI rank per GPU: each rank binds GPU (node-local rank mod GPUs per node) itself, so the
# scripts only ask Slurm for one task per GPU. CUDA-aware MPI: build mpi4py against the cluster's
# MPI (`make install MPI=system`); with Open MPI + UCX export UCX_TLS=rc,cuda_copy,cuda_ipc and
# OMPI_MCA_pml=ucx, with MPICH export MPIR_CVAR_ENABLE_GPU=1; hpc_moe self-tests device buffers at
# start-up and falls back to NCCL or pinned host staging (`hpc-moe selftest` shows the choice).
#
# Environment overrides (on the sbatch command line or exported before it):
#   PY        the Python of the checkout's venv           (.venv/bin/python)
#   SRUN_MPI  srun's --mpi plugin for this MPI            (the venv's mpi.env: pmi2 for the mpich
#             and impi-rt wheels, pmix for Open MPI and MPI=system; pmix without an mpi.env)
#   CONFIG, LAYERS, STEPS, WORKLOAD   what each script runs (see the script)
#   EXTRA     more flags for hpc-moe run (e.g. "--backend numpy --allow-shared-gpu")
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${PY:-.venv/bin/python}
# The launcher settings of the venv's MPI: the Makefile owns them and `make install MPI=...` writes
# them next to the venv's python.
MPI_ENV_FILE="$(dirname "$(dirname "$PY")")/mpi.env"
# shellcheck source=/dev/null
[ ! -f "$MPI_ENV_FILE" ] || source "$MPI_ENV_FILE"
SRUN_MPI=${SRUN_MPI:-${SRUN_MPI_DEFAULT:-pmix}}
EXTRA=${EXTRA:-}
mkdir -p traces

# srun for one job step: a rank that fails ends the step (--kill-on-bad-exit), and
# `python -m mpi4py` turns an exception on any rank into MPI_Abort instead of a hung job.
# `#SBATCH --signal=USR1@120` in the scripts has Slurm send SIGUSR1 to the step's ranks 120 s
# before the time limit (so does `scancel --signal=USR1 JOBID`): hpc-moe run stops after the step
# in flight, closes its trace as "stopped" and exits 3, which ends the script (set -e).
hpc_srun() {
  srun --kill-on-bad-exit=1 --mpi="$SRUN_MPI" --cpu-bind=cores "$@"
}
