"""``hpc-moe run --resume``: a run continued where it ended equals the run that never stopped.

A trace "killed after step n" is made from a complete one by the resumed writer's own cut
(``copy_to_resume``: the first n steps, state running), so the steps after n of the resumed trace
can be set against the uninterrupted run's, step by step. The runs are small (tiny, 3 layers) and
start mpiexec as users do. The emulated cluster's lost node is tests/test_cluster.py's.
"""
import hashlib
import os
import signal
import subprocess

import h5py
import numpy as np
import pytest
from test_cli import ENV, REPO, _start_run, _wait_for_steps, hpc_moe

from hpc_moe.trace.h5file import copy_to_resume
from hpc_moe.trace.reader import read_trace

RUN = ["--config", "tiny", "--mode", "mixed", "--batch", "uniform:4,12", "--seq-len", "uniform:4,24", "--warmup", "1",
       "--steps", "8"]


def run(ranks: int, *args) -> None:
    r = hpc_moe("run", *args, ranks=ranks, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]


def killed_after(trace, n: int, to):
    """A copy of ``trace`` as a run killed after its first n steps leaves it (state running)."""
    f, tmp = copy_to_resume(str(trace), n)
    f.close()
    os.replace(tmp, to)
    return to


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same 8-step run on 4 ranks, one with --deterministic, one with synthetic Zipf routing
    and two micro-batches (--overlap on)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    run(4, *RUN, "--deterministic", "--trace", str(d / "det.h5"))
    run(4, *RUN, "--routing", "zipf:1.2", "--overlap", "on", "--ranks-per-node", "2", "--trace", str(d / "zipf.h5"))
    return d


@pytest.mark.parametrize("name, first, ranks", [("zipf", 3, 4), ("det", 5, 3)], ids=["same-ranks", "fewer-ranks"])
def test_a_resumed_run_draws_what_the_uninterrupted_run_drew(uninterrupted, tmp_path, name, first, ranks):
    """Every step once; the resumed steps' requests and per-expert loads equal the uninterrupted
    run's: on the same ranks bit for bit (rank loads too), and on fewer ranks with --deterministic
    (the tokens and the synthetic context do not depend on the ranks)."""
    whole = read_trace(uninterrupted / f"{name}.h5")
    cut = killed_after(uninterrupted / f"{name}.h5", first, tmp_path / "t.h5")
    run(ranks, "--resume", str(cut))
    t = read_trace(cut)
    assert t.state == "completed" and t.step.tolist() == list(range(8))
    for field in ("kind", "input_tokens", "output_tokens", "num_sequences", "expert_tokens"):
        np.testing.assert_array_equal(getattr(t, field), getattr(whole, field), err_msg=field)
    assert [(s.first_step, s.num_ranks, s.after) for s in t.segments] == [(0, 4, ""), (first, ranks, "running")]
    assert t.placements["step"].tolist() == [first]  # the layout it resumed with
    np.testing.assert_array_equal(t.segment(0).rank_tokens, whole.rank_tokens[:first])
    if ranks == 4:
        np.testing.assert_array_equal(t.rank_tokens, whole.rank_tokens)
    else:  # the column of the lost rank stays empty; the three left took all its rows
        assert not t.rank_tokens[first:, :, 3:].any() and t.segment(1).rank_tokens.shape[2] == 3
        assert np.all(t.segment(1).rank_tokens.sum(axis=2) >= whole.rank_tokens[first:].max(axis=2))
        assert t.segment(1).placement.max() == 2  # experts placed on the three ranks left
    assert t.segments[1].previous_end_unix == whole.time_unix[first - 1]


def test_a_stopped_run_resumes_on_the_same_ranks_and_completes(tmp_path):
    trace = tmp_path / "t.h5"
    job = _start_run(trace, 2, "--config", "tiny")
    _wait_for_steps(trace, job)
    os.kill(job.pid, signal.SIGUSR1)  # as Slurm's --signal and scancel --signal=USR1 do
    job.communicate(timeout=60)
    assert job.returncode == 3
    stopped = read_trace(trace).num_steps
    with h5py.File(trace, "r+") as f:  # the same run, of 5 steps more than it stopped at
        cfg = f.attrs["run_config"].replace('"steps": 100000', f'"steps": {stopped + 5}')
        f.attrs["run_config"] = cfg
    r = hpc_moe("run", "--resume", str(trace), ranks=2, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    t = read_trace(trace)
    assert t.state == "completed" and t.step.tolist() == list(range(stopped + 5))
    assert t.segments[1].after == "stopped" and "resuming" in r.stderr and "Segments" in r.stdout


@pytest.mark.parametrize("make, args, ranks, message", [
    ("complete", [], 1, "the run completed (8 steps): nothing to resume"),
    ("version 2", [], 1, "written with trace schema version 2; this hpc_moe resumes version 3 traces only"),
    ("killed", ["--steps", "30"], 1, "--steps cannot be given with it (only --watchdog"),
    ("killed", ["--trace", "other.h5"], 1, "--trace cannot be given with it"),
    ("killed", [], 5, "the trace has 4 rank columns; resume it on at most 4 ranks (got 5)"),
    ("expert-tp", [], 3, "EP group size 3 (world 3 / dp 1) is not divisible by expert_tp=2"),
    ("text", [], 1, "not an HDF5 file"),
    ("gating bias", [], 1, "adjusted its gating biases (--bias-update-rate)"),
])
def test_a_trace_that_cannot_be_resumed_is_refused_in_one_line_and_left_untouched(uninterrupted, tmp_path, make,
                                                                                   args, ranks, message):
    path = tmp_path / "t.h5"
    if make == "text":
        path.write_text("not a trace\n")
    elif make == "complete":
        path.write_bytes((uninterrupted / "det.h5").read_bytes())
    else:
        killed_after(uninterrupted / "det.h5", 3, path)
        with h5py.File(path, "r+") as f:
            if make == "version 2":
                f.attrs["schema_version"] = 2
            elif make in ("expert-tp", "gating bias"):
                key, value = ("expert_tp", 2) if make == "expert-tp" else ("bias_update_rate", 0.01)
                f.attrs["run_config"] = f.attrs["run_config"].replace(f'"{key}": {1 if key == "expert_tp" else 0.0}',
                                                                      f'"{key}": {value}')
    before = digest(path)
    r = hpc_moe("run", "--resume", str(path), *args, ranks=ranks if ranks > 1 else 0)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert digest(path) == before and not list(tmp_path.glob(".*.resume"))


def test_the_bare_metal_script_resumes_after_a_lost_rank(tmp_path):
    """jobs/mpirun-local.sh with RETRIES=1: a rank killed mid-run fails the job, and the script
    resumes the trace on the same ranks until it completes; every step once."""
    trace = tmp_path / "t.h5"
    job = subprocess.Popen(["jobs/mpirun-local.sh", "2"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, start_new_session=True,
                           env={**ENV, "TRACE": str(trace), "RETRIES": "1", "STEPS": "40"})
    try:
        _wait_for_steps(trace, job)
        ranks = [int(p) for p in os.listdir("/proc") if p.isdigit() and _rank_of(int(p), trace) == "1"]
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        _, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode == 0 and "the run failed" in err and "resuming" in err, err[-3000:]
    t = read_trace(trace)
    assert t.state == "completed" and t.step.tolist() == list(range(40))
    assert [s.after for s in t.segments] == ["", "running"]


def _rank_of(pid: int, trace) -> str | None:
    """PMI_RANK of a process of the run writing ``trace`` (None for any other process)."""
    try:
        if str(trace) not in open(f"/proc/{pid}/cmdline").read():
            return None
        env = dict(x.split("=", 1) for x in open(f"/proc/{pid}/environ").read().split("\0") if "=" in x)
    except OSError:
        return None
    return env.get("PMI_RANK")


def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Slurm signals each node's ranks on its own, so some ranks learn of a stop only from the
    others (and a late signal finds the handler still installed): a signal to rank 1 alone stops
    the run on every rank, exit 3, and rank 0 says it came to another rank."""
    trace = tmp_path / "t.h5"
    job = _start_run(trace, 2)
    try:
        _wait_for_steps(trace, job)
        rank1 = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _rank_of(int(p), trace) == "1")
        os.kill(rank1, signal.SIGUSR1)
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode == 3, err[-3000:]
    assert read_trace(trace).state == "stopped" and "stopped by a signal to another rank" in err
