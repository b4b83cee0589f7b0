# hpc_moe: the commands a newcomer runs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Extras installed by `make install`. `mpich` brings an MPI library as a wheel; drop it (EXTRAS=test,fast)
# on a cluster to use the system MPI that mpi4py was built against. `fast`: numba's fused row kernels.
EXTRAS ?= test,fast,mpich
# The live transformers comparison needs CPU torch. The pin takes the CPU wheel these machines carry
# locally; set PARITY= to skip it (the committed golden files are still checked).
PARITY ?= torch==2.13.0 "transformers>=4.57"
NP     ?= 16
# Several ranks share this machine's cores: one BLAS thread per rank, or idle BLAS threads spin
# against the other ranks (20x slower steps with 8 ranks on 2 cores).
MPIEXEC ?= OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(VENV)/bin/mpiexec

.PHONY: install run test test-unit test-mpi test-slurm test-cluster lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" $(PARITY)
	touch $@

# The embedded default: the tiny preset (16 experts) on NP ranks, one expert per rank at NP=16, on
# simulated nodes of 4 ranks so that the default job crosses nodes.
run: install
	mkdir -p out
	$(MPIEXEC) -n $(NP) $(PY) -m mpi4py -m hpc_moe run --config tiny --mode mixed --batch 32 \
	    --seq-len uniform:8,64 --steps 20 --warmup 2 --overlap on --ranks-per-node 4 --trace out/run.h5 --overwrite
	$(PY) -m hpc_moe report out/run.h5 --out out/report --no-tables

test: test-unit test-mpi test-slurm test-cluster

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
test-mpi: install
	for n in 1 2 4 8 16; do \
	  $(MPIEXEC) -n $$n $(PY) -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi tests/mpi || exit 1; \
	done

lint: install
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check hpc_moe tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
