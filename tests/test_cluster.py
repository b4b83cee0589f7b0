"""hpc_moe on real nodes: the cluster on one machine of scripts/cluster.sh (network namespaces,
shaped links, Hydra and a multi-node Slurm across them).

What runs: the engine exact against the single-process reference on the nodes MPI finds
(tests/mpi/test_nodes.py under Hydra, block and round-robin rank placement, flat and hierarchical);
the trace's cross-node bytes against the NICs' counters; the job scripts of jobs/ under sbatch -N 2
and -N 4; a pulled cable, a dead node and Slurm's stop signal. Each class brings its cluster up and
takes it down, on failure too. Skipped, with scripts/cluster.sh's one-line reason, where namespaces
cannot be made (not root, no iproute2) or Slurm cannot be installed.

Run alone: make test-cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_slurm import _install

from hpc_moe.trace.metrics import comm_stats
from hpc_moe.trace.reader import read_trace

REPO = Path(__file__).resolve().parents[1]
CLUSTER = str(REPO / "scripts/cluster.sh")
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# What a CPU-only cluster of 2-core nodes lacks, overridden on sbatch's command line.
CPU_ONLY = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
JOB_ENV = {"SRUN_MPI": "pmi2", "PY": PY, "CONFIG": "tiny", "LAYERS": "3", "STEPS": "3",
           "WORKLOAD": "--mode prefill --batch 8 --seq-len 16"}
# The wire carries, beyond the trace's payload bytes, TCP/IP headers, the count exchanges, the
# per-step timing gathers and the start-up: 0.6 % more on docs/benchmarks.md's cluster runs, about
# 5 % (110 kB) on this test's small runs, nearly all of it fixed.
NIC_OVERHEAD, NIC_FIXED = 0.06, 256 * 1024


def cluster(*args, timeout=120, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([CLUSTER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, cwd=REPO, **kw)


def bring_up(nodes: int, slurm: bool):
    """Up -> yields; down afterwards whatever happened."""
    if slurm:
        why = _install()
        if why:
            pytest.skip(why)
    r = cluster("up", "--nodes", str(nodes), "--rate", "1gbit", *(["--slurm"] if slurm else []))
    if r.returncode == 2:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr
    try:
        yield nodes
    finally:
        cluster("down")


@pytest.fixture(scope="class")
def two_nodes():
    yield from bring_up(2, slurm=True)


@pytest.fixture(scope="class")
def four_nodes():
    yield from bring_up(4, slurm=True)


def mpi_tests(nodes: int, ranks: int, cyclic: bool):
    order = "cyclic" if cyclic else "block"
    env = {**ENV, "HPC_MOE_NODES": str(nodes), "HPC_MOE_RANK_ORDER": order}
    r = cluster("mpiexec", *(["--cyclic"] if cyclic else []), "-n", str(ranks), PY, "-m", "mpi4py", "-m", "pytest",
                "-q", "-p", "no:cacheprovider", "--with-mpi", "tests/mpi/test_nodes.py", env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def nic_tx() -> dict[str, int]:
    r = cluster("nic-bytes")
    assert r.returncode == 0, r.stderr
    return {node: int(tx) for node, tx, _ in (line.split() for line in r.stdout.splitlines())}


def run_args(trace: Path, *extra: str) -> list[str]:
    return [PY, "-m", "mpi4py", "-m", "hpc_moe", "run", "--config", "tiny", "--mode", "prefill", "--batch", "16",
            "--seq-len", "32", "--trace", str(trace), "--overwrite", *extra]


def wait_for_steps(trace: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _steps(trace) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {steps} steps in {timeout} s"
        time.sleep(0.5)


def _steps(trace: Path) -> int:
    try:
        return read_trace(trace).num_steps
    except Exception:  # noqa: BLE001 (between the file's creation and its first flush)
        return 0


def job(*args, env=None, timeout=240) -> tuple[str, str, str]:
    """sbatch and wait -> (job id, exit code, its output)."""
    r = cluster("sbatch", "--parsable", *args, env={**ENV, **JOB_ENV, **(env or {})})
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while cluster("squeue", "-h", "-j", jid).stdout.strip():
        assert time.monotonic() < deadline, f"job {jid} still running after {timeout} s"
        time.sleep(1)
    return jid, exit_code(jid), (REPO / f"traces/cluster-{jid}.out").read_text()


def exit_code(jid: str) -> str:
    out = cluster("scontrol", "show", "job", jid).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("ExitCode=")), "?")


def signalled_after_3_steps(traces: Path, env: dict, *sbatch: str) -> tuple[str, Path, float]:
    """jobs/run.sbatch on 2 nodes, sent scancel --signal=USR1 once its trace holds 3 steps ->
    (job id, its trace, a deadline 120 s after the submission)."""
    r = cluster("sbatch", "--parsable", "-N", "2", *CPU_ONLY, *sbatch, "-o", "traces/cluster-%j.out", "jobs/run.sbatch",
                env={**ENV, **JOB_ENV, **env})
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    trace = traces / f"run-{jid}.h5"
    deadline = time.monotonic() + 120
    while _steps(trace) < 3:
        assert time.monotonic() < deadline, "the job wrote no steps in 120 s"
        time.sleep(0.3)
    assert cluster("scancel", "--signal=USR1", jid).returncode == 0
    return jid, trace, deadline


@pytest.fixture
def traces():
    """The jobs write under the checkout's traces/ (their submit directory): remove what a test made."""
    (REPO / "traces").mkdir(exist_ok=True)
    before = set((REPO / "traces").glob("*"))
    yield REPO / "traces"
    for p in set((REPO / "traces").glob("*")) - before:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


class TestTwoNodes:
    @pytest.mark.parametrize("cyclic", [False, True], ids=["block", "cyclic"])
    def test_engine_exact_on_real_nodes(self, two_nodes, cyclic):
        mpi_tests(2, 4, cyclic)

    def test_trace_bytes_are_the_wire_bytes(self, two_nodes, tmp_path):
        for scheme in ("flat", "hierarchical"):
            before = nic_tx()
            r = cluster("mpiexec", "-n", "4", *run_args(tmp_path / "t.h5", "--steps", "4", "--warmup", "0",
                                                        "--dispatch", scheme), timeout=240)
            assert r.returncode == 0, r.stderr[-2000:]
            wire = sum(nic_tx().values()) - sum(before.values())
            t = read_trace(tmp_path / "t.h5")
            assert sorted(set(t.rank_host)) == ["node0", "node1"] and list(t.rank_node) == [0, 0, 1, 1]
            # The links measured at the start crossed the wire too; the trace says how much.
            payload = comm_stats(t)["inter_node_bytes_per_step"] * t.num_steps + t.meta["links"]["cross_node_bytes"]
            assert payload > 100_000 and t.meta["links"]["cross_node_bytes"] > 0
            assert payload <= wire <= payload * (1 + NIC_OVERHEAD) + NIC_FIXED, (scheme, payload, wire)

    def test_run_job_on_two_nodes(self, two_nodes, traces):
        jid, code, log = job("-N", "2", *CPU_ONLY, "-o", "traces/cluster-%j.out", "jobs/run.sbatch")
        assert code == "0:0", log
        t = read_trace(traces / f"run-{jid}.h5")
        assert t.state == "completed" and sorted(set(t.rank_host)) == ["node0", "node1"]
        assert "Throughput" in log

    def test_stop_signal_stops_every_node_after_the_same_step(self, two_nodes, traces):
        jid, trace, deadline = signalled_after_3_steps(traces, {"STEPS": "100000", "REQUEUE": "0"})
        while cluster("squeue", "-h", "-j", jid).stdout.strip():
            assert time.monotonic() < deadline + 60, "the job did not stop within 60 s of the signal"
            time.sleep(1)
        log = (traces / f"cluster-{jid}.out").read_text()
        assert exit_code(jid) == "3:0", log
        t = read_trace(trace)
        assert t.state == "stopped" and t.num_steps >= 3 and "stopped by SIGUSR1" in log
        # Every rank wrote every step it ran (the trace holds whole steps: all ranks or none).
        assert np.all(t.phase_time_s.sum(axis=(1, 3)) > 0)

    def test_a_preempted_job_requeues_itself_and_resumes_as_if_never_stopped(self, two_nodes, traces, tmp_path):
        """scancel --signal=USR1: the run stops after the step in flight (exit 3), jobs/run.sbatch
        requeues the job, and the next allocation resumes the trace on the same nodes: its steps
        equal those of the same run never stopped (Hydra on the same nodes)."""
        jid, trace, deadline = signalled_after_3_steps(traces, {"STEPS": "30"}, "--open-mode=append")
        while "COMPLETED" not in cluster("scontrol", "show", "job", jid).stdout:
            assert time.monotonic() < deadline + 180, cluster("scontrol", "show", "job", jid).stdout
            time.sleep(1)
        t = read_trace(trace)
        log = (traces / f"cluster-{jid}.out").read_text()
        assert t.state == "completed" and t.step.tolist() == list(range(30)), log
        assert [s.after for s in t.segments] == ["", "stopped"] and "resuming" in log
        workload = JOB_ENV["WORKLOAD"].split()
        r = cluster("mpiexec", "-n", "4", PY, "-m", "mpi4py", "-m", "hpc_moe", "run", "--config", "tiny", "--layers",
                    "3", "--steps", "30", "--warmup", "5", *workload, "--trace", str(tmp_path / "whole.h5"), timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        whole = read_trace(tmp_path / "whole.h5")
        for field in ("input_tokens", "num_sequences", "expert_tokens", "rank_tokens"):
            np.testing.assert_array_equal(getattr(t, field), getattr(whole, field), err_msg=field)

    def test_a_dead_node_ends_the_job(self, two_nodes, tmp_path):
        trace = tmp_path / "t.h5"
        proc = subprocess.Popen([CLUSTER, "mpiexec", "-n", "4", *run_args(trace, "--steps", "100000",
                                                                          "--watchdog", "20")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        try:
            wait_for_steps(trace, 3, proc)
            assert cluster("kill", "node1").returncode == 0
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=60)
            assert proc.returncode != 0 and time.monotonic() - t0 < 30, err[-2000:]
        finally:
            _reap(proc)
        assert read_trace(trace).num_steps >= 3

    def test_a_pulled_cable_ends_the_job_by_the_watchdog(self, two_nodes, tmp_path):
        trace, watchdog = tmp_path / "t.h5", 10
        proc = subprocess.Popen([CLUSTER, "mpiexec", "-n", "4", *run_args(trace, "--steps", "100000",
                                                                          "--watchdog", str(watchdog))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
        try:
            wait_for_steps(trace, 3, proc)
            assert cluster("link", "node1", "down").returncode == 0
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=watchdog + 60)
            took = time.monotonic() - t0
        finally:
            cluster("link", "node1", "up")
            cluster("kill", "node1")  # node1's ranks, cut off from their launcher
            _reap(proc)
        assert proc.returncode == 4, err[-2000:]
        assert took < watchdog + 30, took
        assert "rank(s) 2, 3 on node1 did not answer" in err  # the watchdog names the lost node
        assert read_trace(trace).num_steps >= 3


class TestFourNodes:
    @pytest.mark.parametrize("cyclic", [False, True], ids=["block", "cyclic"])
    def test_engine_exact_on_real_nodes(self, four_nodes, cyclic):
        mpi_tests(4, 8, cyclic)

    def test_a_slow_node_is_measured_and_gets_the_lightest_experts(self, four_nodes, tmp_path):
        """node0's NIC at a tenth of the others': the links measured at the start say so, and the
        placement by a skewed run's loads gives node0 the least loaded experts, where without the
        links (--probe-links off) it gives it the most (the policy alone puts the hottest group there)."""
        skew = ["--routing", "zipf:1.2", "--steps", "2", "--warmup", "0"]
        assert cluster("rate", "node0", "100mbit").returncode == 0
        try:
            r = cluster("mpiexec", "-n", "4", *run_args(tmp_path / "loads.h5", *skew, "--probe-links", "off"))
            assert r.returncode == 0, r.stderr[-2000:]
            node_load = {}
            for probe in ("off", "on"):
                r = cluster("mpiexec", "-n", "4", *run_args(tmp_path / f"{probe}.h5", *skew, "--probe-links", probe,
                                                            "--loads-from", str(tmp_path / "loads.h5")))
                assert r.returncode == 0, r.stderr[-2000:]
                t = read_trace(tmp_path / f"{probe}.h5")
                node_load[probe] = t.rank_tokens.sum(axis=(0, 1))  # one rank a node: its rows, [R]
        finally:
            cluster("rate", "node0", "1gbit")
        bw = np.array(t.meta["links"]["bytes_per_s"], dtype=float)
        assert bw[1:, 0].max() < 0.25 * bw[1:, 1:][~np.eye(3, dtype=bool)].min(), bw
        assert np.argmax(node_load["off"]) == 0 and np.argmin(node_load["on"]) == 0, node_load

    def test_a_lost_node_and_the_run_resumed_on_the_three_left(self, four_nodes, tmp_path):
        """A node's processes killed at a random step (and a random node but node0, where Hydra
        runs): the job ends within the watchdog's bound; ``run --resume`` on the three nodes left
        finishes it; every step is in the trace once, and with --deterministic the steps carry the
        requests and per-expert loads an uninterrupted run on those three nodes measures."""
        rng = np.random.default_rng()
        lost, after = f"node{rng.integers(1, 4)}", int(rng.integers(2, 7))
        args = ["--config", "tiny", "--mode", "mixed", "--batch", "32", "--seq-len", "64", "--steps", "30",
                "--warmup", "1", "--watchdog", "20", "--deterministic"]
        r = subprocess.run([PY, str(REPO / "scripts/lost_node.py"), "--trace", str(tmp_path / "t.h5"), "--nodes", "4",
                            "--ppn", "2", "--kill-after", str(after), "--lost", lost, "--", *args],
                           capture_output=True, text=True, env={**ENV, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=600)
        assert r.returncode == 0, (lost, after, r.stdout[-2000:], r.stderr[-3000:])
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["exit_code"] != 0 and got["job_end_s"] < 20 + 30, got
        assert got["resumed_ranks"] == 6 and lost not in got["resumed_hosts"], got
        t = read_trace(tmp_path / "t.h5")
        assert t.state == "completed" and t.step.tolist() == list(range(30)) and got["steps_before"] >= after
        left = ",".join(n for n in ("node0", "node1", "node2", "node3") if n != lost)
        r = cluster("mpiexec", "--nodes", left, "-n", "6", PY, "-m", "mpi4py", "-m", "hpc_moe", "run", *args,
                    "--trace", str(tmp_path / "three.h5"), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        three = read_trace(tmp_path / "three.h5")
        for field in ("kind", "input_tokens", "num_sequences", "expert_tokens"):
            np.testing.assert_array_equal(getattr(t, field), getattr(three, field), err_msg=field)

    def test_scaling_job_on_four_nodes(self, four_nodes, traces):
        jid, code, log = job("-N", "4", *CPU_ONLY, "-o", "traces/cluster-%j.out", "jobs/scaling.sbatch",
                             env={"FIRST": "2", "SEQ_LEN": "16"})
        assert code == "0:0", log
        series = traces / f"scaling-{jid}"
        assert sorted(p.name for p in series.glob("n*.h5")) == ["n2.h5", "n4.h5", "n8.h5"]
        assert [read_trace(series / f"n{n}.h5").num_nodes for n in (2, 4, 8)] == [1, 2, 4]
        assert (series / "report" / "scaling.png").exists()


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
