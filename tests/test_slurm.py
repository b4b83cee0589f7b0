"""The job scripts of jobs/ on a real Slurm: a one-node cluster started on this machine.

Debian's slurm-wlm and munge (installed here when missing, as root with apt), slurmctld and slurmd
on localhost with a configuration of their own (a temporary directory, free ports). The scripts
are submitted as they are, overriding on the sbatch command line only what a CPU-only one-node
cluster lacks: nodes (-N 1), GPUs (--gpus-per-node=0), CPUs per task. The environment picks a
small model (CONFIG, LAYERS, STEPS, WORKLOAD) and srun's MPI plugin for the mpich wheel
(SRUN_MPI=pmi2). Skipped, with the reason, where Slurm cannot be installed or started.

Run alone: make test-slurm.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_moe.trace.reader import read_trace

REPO = Path(__file__).resolve().parents[1]
CPU_ONLY = ["-N", "1", "--ntasks-per-node=4", "--cpus-per-task=1", "--gpus-per-node=0"]


def _sh(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)


def _install() -> str | None:
    """None when sbatch, slurmctld, slurmd and munged are there (installing them if root with apt),
    else why not."""
    tools = ("sbatch", "slurmctld", "slurmd", "munged")
    if all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in tools):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and this is not root with apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if _sh("apt-get", "install", "-y", "-q", "slurm-wlm", "munge", env=env, timeout=600).returncode:
        _sh("apt-get", "update", "-q", env=env, timeout=600)
        r = _sh("apt-get", "install", "-y", "-q", "slurm-wlm", "munge", env=env, timeout=600)
        if r.returncode:
            return f"apt-get install slurm-wlm munge failed: {r.stderr.strip().splitlines()[-1:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster -> the environment that talks to it; stops it afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root")
    why = _install()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    shm_before = set(os.listdir("/dev/shm"))
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    started_munged = bool(_sh("munge", "-n").returncode)
    if started_munged:
        _sh("munged", "--force")
    host = socket.gethostname()
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=hpcmoetest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool", f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd.log", "KillWait=10",
        # 8 CPUs on a 2-core machine: the ranks oversubscribe the cores, as the MPI tests do.
        "SlurmdParameters=config_overrides", f"NodeName={host} CPUs=8 State=UNKNOWN",
        # Job ids unique across the clusters this fixture makes: srun's PMI names a job step by
        # them, and MPICH its shared memory after that (a step killed earlier leaves its segment
        # in /dev/shm, which the next cluster's job of the same id would attach to and fail).
        f"FirstJobId={int(time.time()) % 50_000_000 + 1000}",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf), "SRUN_MPI": "pmi2", "PY": sys.executable, "CONFIG": "tiny",
           "LAYERS": "3", "STEPS": "3", "WORKLOAD": "--mode prefill --batch 8 --seq-len 16",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    _sh("slurmctld", "-f", str(conf), env=env)
    _sh("slurmd", "-f", str(conf), env=env)
    deadline = time.monotonic() + 30
    while _sh("sinfo", "-h", "-o", "%T", env=env).stdout.strip() != "idle":
        if time.monotonic() > deadline:
            _stop(root, started_munged, shm_before)
            pytest.skip(f"the one-node Slurm did not come up in 30 s: {(root / 'log/slurmctld.log').read_text()[-300:]}")
        time.sleep(0.5)
    try:
        yield env
    finally:
        _stop(root, started_munged, shm_before)


def _stop(root: Path, munged: bool, shm_before: set[str]) -> None:
    """The daemons this fixture started (munged too, unless it was running before), every job
    step they still run (a job a failed test left running outlives slurmd: its slurmstepd is not
    slurmd's child), and the MPI shared-memory segments its killed ranks left in /dev/shm."""
    # Every process of this cluster's jobs carries its SLURM_CONF (sbatch exports the environment).
    jobs = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()
            and f"SLURM_CONF={root}/slurm.conf" in _environ(int(p))]
    for p in jobs:
        try:
            os.kill(p, 9)
        except OSError:
            pass
    for daemon in ("slurmd", "slurmctld"):
        pid = root / f"{daemon}.pid"
        if pid.exists():
            try:
                os.kill(int(pid.read_text()), 15)
            except (OSError, ValueError):
                pass
    if munged:
        _sh("pkill", "-x", "munged")
    for name in set(os.listdir("/dev/shm")) - shm_before:
        if name.startswith(("mpich_shm_", "sm_segment.")):
            Path("/dev/shm", name).unlink(missing_ok=True)


def _environ(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/environ", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _job(env, *args, timeout=180) -> tuple[str, str]:
    """Submit and wait -> (job id, its output)."""
    r = _sh("sbatch", "--parsable", *args, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while _sh("squeue", "-h", "-j", job, env=env).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still running after {timeout} s"
        time.sleep(1)
    return job, _exit_code(env, job)


def _exit_code(env, job: str) -> str:
    out = _sh("scontrol", "show", "job", job, env=env).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("ExitCode=")), "?")


@pytest.fixture(autouse=True)
def _no_traces_left(slurm):
    """The jobs write under the checkout's traces/ (their submit directory): remove what a test made."""
    before = set((REPO / "traces").glob("*")) if (REPO / "traces").exists() else set()
    yield
    for p in set((REPO / "traces").glob("*")) - before:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_run_job_writes_its_trace(slurm, tmp_path):
    out = tmp_path / "run-%j.out"
    job, code = _job(slurm, *CPU_ONLY, "-o", str(out), "jobs/run.sbatch")
    log = Path(str(out).replace("%j", job)).read_text()
    assert code == "0:0", log
    t = read_trace(REPO / f"traces/run-{job}.h5")
    assert t.state == "completed" and t.num_steps == 3 and t.num_ranks == 4
    assert "Throughput" in log


def test_scaling_job_runs_each_size_and_the_report(slurm, tmp_path):
    out = tmp_path / "scaling-%j.out"
    env = {**slurm, "FIRST": "2", "SEQ_LEN": "16"}
    job, code = _job(env, *CPU_ONLY, "-o", str(out), "jobs/scaling.sbatch")
    log = Path(str(out).replace("%j", job)).read_text()
    assert code == "0:0", log
    series = REPO / f"traces/scaling-{job}"
    assert sorted(p.name for p in series.glob("n*.h5")) == ["n2.h5", "n4.h5"]
    assert [read_trace(series / f"n{n}.h5").num_ranks for n in (2, 4)] == [2, 4]
    assert "Scaling" in log and (series / "report" / "scaling.png").exists()


def test_a_time_limit_signal_stops_the_run_and_keeps_the_trace(slurm, tmp_path):
    """What #SBATCH --signal=USR1@120 does before the time limit, sent now with scancel."""
    out = tmp_path / "stop-%j.out"
    r = _sh("sbatch", "--parsable", *CPU_ONLY, "-o", str(out), "jobs/run.sbatch",
            env={**slurm, "STEPS": "100000", "REQUEUE": "0"}, cwd=REPO)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    trace = REPO / f"traces/run-{job}.h5"
    deadline = time.monotonic() + 120
    while not (trace.exists() and _steps(trace) >= 3):
        assert time.monotonic() < deadline, "the job wrote no steps in 120 s"
        time.sleep(0.5)
    assert _sh("scancel", "--signal=USR1", job, env=slurm).returncode == 0
    while _sh("squeue", "-h", "-j", job, env=slurm).stdout.strip():
        assert time.monotonic() < deadline + 60, "the job did not stop within 60 s of the signal"
        time.sleep(1)
    log = Path(str(out).replace("%j", job)).read_text()
    assert _exit_code(slurm, job) == "3:0", log  # EXIT_STOPPED
    t = read_trace(trace)
    assert t.state == "stopped" and t.num_steps >= 3
    assert "stopped by SIGUSR1" in log and "Throughput" in log


def _steps(trace: Path) -> int:
    try:
        return read_trace(trace).num_steps
    except Exception:  # noqa: BLE001 (between the file's creation and its first flush)
        return 0
