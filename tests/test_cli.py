"""The command line as users meet it: one-line errors, a killed run's trace, a failing rank."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_moe.errors import InputError
from hpc_moe.trace.reader import read_trace

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
# Ranks share this machine's cores: one BLAS thread each (as the Makefile runs them).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def hpc_moe(*args, ranks=0, timeout=120):
    cmd = [sys.executable, "-m", "hpc_moe", *args]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpc_moe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "invalid choice"),
    (["run", "--batch", "uniform:5"], "batch size: expected N, uniform:LO,HI"),
    (["run", "--seq-len", "0"], "sequence length must be >= 1"),
    (["run", "--layers", "99"], "--layers must be in [1, 3]"),
    (["run", "--routing", "zipf:-2"], "routing must be"),
    (["run", "--steps", "0"], "--steps must be >= 1"),
    (["run", "--config", "nope"], "no config file or preset named 'nope'"),
    (["run", "--micro-batches", "0"], "expected a positive integer"),
    (["run", "--dp", "3"], "not divisible by dp=3"),
    (["generate", "--config", "tiny", "--input-ids", "missing.npy", "--output", "o.npz"], "input ids file not found"),
    (["report", "missing.h5"], "missing.h5"),
    (["generate", "--config", "tiny", "--input-ids", "/dev/null", "--output", "o.npz"], "not a readable .npy file"),
    (["plan", "--ranks", "6", "--expert-tp", "4"], "must be divisible"),
    (["checkpoint", "check", "/nonexistent"], "not found"),
    (["run", "--transport", "nccl", "--backend", "numpy"], "transport nccl needs the cupy backend"),
    (["run", "--duration", "-1"], "--duration > 0"),
    (["run", "--warmup", "-1"], "--warmup must be >= 0"),
    (["run", "--seed", "-1"], "seed must be a non-negative integer"),
    (["run", "--seq-len", "600"], "--seq-len reaches 600 tokens, but the model has max_position_embeddings 512"),
    (["run", "--mode", "decode", "--seq-len", "uniform:8,512"], "(a decode adds a token)"),
    (["run", "--config", "deepseek-v3"], "GiB per rank (weights and KV cache) but"),
    (["bench", "layer", "--topk", "9"], "--topk 9 is more than --experts 8"),
    (["bench", "dispatch", "--topk", "20", "--experts", "16"], "--topk 20 is more than --experts 16"),
    (["selftest", "--trace", "/proc/x/t.h5"], "trace: cannot write in /proc/x"),
    (["run", "--summary-json", "/proc/x.json", "--steps", "100000"], "--summary-json: cannot write in /proc"),
    (["run", "--trace", "/proc/x/t.h5", "--steps", "100000"], "--trace: cannot write in /proc/x"),
    (["plan", "--ranks", "8", "--json", "/proc/p.json"], "--json: cannot write in /proc"),
    (["plan", "--sweep-ep", "8,16", "--sweep-plot", "/proc/s.png"], "--sweep-plot: cannot write in /proc"),
    (["checkpoint", "make", "--config", "tiny", "--out", "/proc/ck"], "--out: cannot write in /proc/ck"),
    (["checkpoint", "make", "--config", "tiny", "--out", "data"], "--out data exists and is not empty"),
    (["report", "data/golden/README.md", "--out", "/proc/r"], "--out: cannot write in /proc/r"),
    (["bench", "kernels", "--json", "/proc/k.json"], "--json: cannot write in /proc"),
    (["run", "--baseline", "/nonexistent.h5", "--steps", "100000"], "trace /nonexistent.h5: no such file"),
    (["run", "--loads-from", "/dev/null"], "trace /dev/null: not a regular file"),
    (["plan", "--ranks", "16", "--hbm-gib", "-1"], "--hbm-gib must be > 0"),
    (["selftest", "--transport", "cuda-aware", "--backend", "numpy"], "transport cuda-aware needs the cupy backend"),
])
def test_bad_input_gives_one_line_and_exit_2(args, message):
    r = hpc_moe(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_existing_trace_is_not_overwritten(tmp_path):
    trace = tmp_path / "t.h5"
    assert hpc_moe("run", "--steps", "1", "--warmup", "0", "--trace", str(trace)).returncode == 0
    before = trace.read_bytes()
    r = hpc_moe("run", "--steps", "1", "--warmup", "0", "--trace", str(trace), ranks=2)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    assert trace.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["run", "--mode", "nope"], "run: error: argument --mode: invalid choice"),
    (["run", "--steps", "0"], "error: --steps must be >= 1"),
    (["run", "--summary-json", "/proc/x.json"], "--summary-json: cannot write in /proc"),
])
def test_bad_input_on_16_ranks_is_one_line_from_rank_0(args, message):
    r = hpc_moe(*args, ranks=16, timeout=180)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-moe: ") and message in lines[0], r.stderr


def test_outputs_in_missing_folders_are_made(tmp_path):
    np.save(tmp_path / "ids.npy", np.zeros((2, 3), np.int64))
    gen = tmp_path / "new" / "o.npz"
    r = hpc_moe("generate", "--config", "tiny", "--input-ids", str(tmp_path / "ids.npy"), "--output", str(gen),
                "--max-new-tokens", "1")
    assert r.returncode == 0 and gen.exists() and f"wrote {gen}" in r.stdout, r.stderr
    assert "one-expert-per-GPU" not in r.stderr  # one process holds every expert: nothing to warn of
    trace, summary = tmp_path / "a" / "t.h5", tmp_path / "b" / "s.json"
    r = hpc_moe("run", "--steps", "1", "--warmup", "0", "--trace", str(trace), "--summary-json", str(summary))
    assert r.returncode == 0 and trace.exists() and summary.exists(), r.stderr


def test_run_killed_with_sigkill_leaves_a_readable_trace(tmp_path):
    trace = tmp_path / "killed.h5"
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpc_moe", "run", "--steps",
           "100000", "--warmup", "0", "--trace", str(trace)]
    job = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if trace.exists() and read_trace(trace).num_steps >= 3:
                    break
            except Exception:  # the file may be between creation and its first flush
                pass
        else:
            pytest.fail("the run wrote no steps in 90 s")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    t = read_trace(trace)
    assert t.state == "running" and t.num_steps >= 3
    assert (t.wall_time_s > 0).all()
    out = tmp_path / "report"
    r = hpc_moe("report", str(trace), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "still running, or killed" in r.stdout
    assert len(list(out.glob("*.png"))) >= 4


def _start_run(trace, ranks: int, *args) -> subprocess.Popen:
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpc_moe", "run", "--steps",
           "100000", "--warmup", "0", "--trace", str(trace), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(trace, job, n: int = 3, limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.3)
        try:
            if trace.exists() and read_trace(trace).num_steps >= n:
                return
        except Exception:  # the file may be between creation and its first flush
            pass
    os.killpg(job.pid, signal.SIGKILL)
    pytest.fail(f"the run wrote no {n} steps in {limit} s")


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_ends_the_step_closes_the_trace_and_prints_the_summary(tmp_path, sig):
    trace = tmp_path / "stopped.h5"
    job = _start_run(trace, 2)
    _wait_for_steps(trace, job)
    os.kill(job.pid, sig)  # to mpiexec, as Slurm's --signal and scancel do: it forwards it to the ranks
    try:
        out, err = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("the job did not stop within 60 s of the signal")
    assert job.returncode == 3, err  # EXIT_STOPPED
    t = read_trace(trace)
    assert t.state == "stopped" and 3 <= t.num_steps < 100000
    assert "Throughput" in out and "stopped early by a signal" in out and f"stopped by {sig.name}" in err


def test_a_second_stop_signal_ends_the_job_at_once(tmp_path):
    trace = tmp_path / "twice.h5"
    job = _start_run(trace, 2, "--config", "small", "--seq-len", "512", "--batch", "48")  # steps of seconds
    _wait_for_steps(trace, job, n=1)
    os.kill(job.pid, signal.SIGUSR1)
    time.sleep(0.5)  # the first is handled (a stop after this step), the second ends the job
    os.kill(job.pid, signal.SIGUSR1)
    try:
        job.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("the job did not end within 30 s of the second signal")
    assert job.returncode not in (0, 3)  # ended by the signal, not by the orderly stop
    assert read_trace(trace).num_steps >= 1  # what was flushed stays readable


def test_the_watchdog_names_a_stopped_rank(tmp_path):
    """One rank of 4 stopped with SIGSTOP mid-run: the others' watchdogs end the job within the
    limit + 30 s, naming it; the trace stays readable."""
    trace = tmp_path / "hung.h5"
    job = _start_run(trace, 4, "--watchdog", "3")
    _wait_for_steps(trace, job)
    parent = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid = map(int, line.split())
        parent[pid] = ppid
    ranks = [p for p, pp in parent.items() if parent.get(pp) == job.pid]  # mpiexec -> proxy -> rank
    assert len(ranks) == 4, ranks
    victim = max(ranks)
    env = dict(x.split("=", 1) for x in open(f"/proc/{victim}/environ").read().split("\0") if "=" in x)
    rank = int(env["PMI_RANK"])  # Hydra's rank of that process
    started = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        out, err = job.communicate(timeout=3 + 30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail("the watchdog did not end the job within its limit + 30 s")
    finally:
        os.kill(victim, signal.SIGCONT) if _alive(victim) else None
    assert job.returncode != 0 and time.monotonic() - started < 33
    line = next((x for x in err.splitlines() if "watchdog:" in x), err)
    assert f"rank(s) {rank} on {socket.gethostname()} did not answer" in line and "aborting the job" in line
    assert sum("watchdog:" in x for x in err.splitlines()) == 1  # one message
    assert read_trace(trace).num_steps >= 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def test_a_failing_rank_aborts_the_job(tmp_path):
    """A checkpoint missing one expert: only the rank that owns it fails, and the job ends."""
    from hpc_moe.config import load_config
    from hpc_moe.weights.checkpoint import Checkpoint, save_checkpoint
    from hpc_moe.weights.synthetic import SyntheticWeights
    cfg = load_config("tiny")
    w = SyntheticWeights(cfg, 0)
    keep = {n: w.get(n) for n in w.keys() if n != "model.layers.2.mlp.experts.15.up_proj.weight"}
    save_checkpoint(str(tmp_path / "ck"), cfg, keep)
    with pytest.raises(InputError):
        Checkpoint.open(str(tmp_path / "ck")).validate()
    np.save(tmp_path / "ids.npy", np.zeros((2, 3), np.int64))
    t = time.monotonic()
    r = hpc_moe("generate", "--checkpoint", str(tmp_path / "ck"), "--input-ids", str(tmp_path / "ids.npy"),
                "--output", str(tmp_path / "o.npz"), ranks=4, timeout=60)
    assert r.returncode != 0 and time.monotonic() - t < 60
    assert "experts.15.up_proj.weight" in r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_workload_lengths_fit_the_model(tmp_path):
    from hpc_moe.apps.workload import Workload, WorkloadError
    w = Workload.create("decode", "64", "normal:500,100", seed=1, max_positions=512)
    ctx = np.concatenate([s.decode_ctx for s in w.steps(5)])
    assert ctx.max() == 511 and ctx.min() >= 1  # clipped: a decode adds its token at position 511
    assert Workload.create("prefill", "4", "512", max_positions=512).steps(1)[0].prefill_lens.max() == 512
    (tmp_path / "lens.txt").write_text("8 512")
    with pytest.raises(WorkloadError, match="max_position_embeddings 512"):
        Workload.create("mixed", "4", f"file:{tmp_path / 'lens.txt'}", max_positions=512)


def test_a_config_with_a_misspelled_or_missing_key_says_so_in_one_line(tmp_path):
    d = json.loads((REPO / "data/configs/tiny.json").read_text())
    d["n_routed_expert"] = d.pop("n_routed_experts")
    del d["hidden_size"]
    (tmp_path / "c.json").write_text(json.dumps(d))
    r = hpc_moe("plan", "--config", str(tmp_path / "c.json"), "--ranks", "4", "--hardware", "cpu-2core")
    assert r.returncode == 0, r.stderr  # loaded with defaults, as transformers would
    warned = [line for line in r.stderr.splitlines() if "c.json" in line]
    assert len(warned) == 1 and "unknown keys ignored: n_routed_expert" in warned[0]
    assert "missing, DeepSeek-V3's used: hidden_size=7168, n_routed_experts=256" in warned[0]
    assert "c.json" not in hpc_moe("plan", "--config", "tiny", "--ranks", "4", "--hardware", "cpu-2core").stderr


def test_progress_line_names_only_the_tokens_a_run_has():
    from hpc_moe.apps.progress import Progress
    from hpc_moe.apps.workload import Step
    p = Progress(steps=2, duration=None, stream=io.StringIO())
    p.update(Step(np.zeros(0, np.int64), np.full(4, 9, np.int64)), 0.5)  # a decode step: 4 new tokens
    assert "output tok/s" in p.line(p.t0 + 1) and "input" not in p.line(p.t0 + 1)
