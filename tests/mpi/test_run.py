"""The main job under MPI: its trace has the documented schema and its numbers add up.

Run: mpiexec -n R python -m mpi4py -m pytest --with-mpi tests/mpi/test_run.py (R = 1..16).
"""
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe.apps.workload import Workload
from hpc_moe.cli import main
from hpc_moe.config import load_config
from hpc_moe.trace.reader import read_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_trace import _doc_tables  # noqa: E402  (the schema tables of docs/trace-format.md)

pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD


def shared_dir(factory, name):
    return WORLD.bcast(str(factory.mktemp(name)) if WORLD.Get_rank() == 0 else None)


def run(*args):
    assert main(["run", "--config", "tiny", "--warmup", "1", "--seed", "3", *args]) == 0
    WORLD.Barrier()


@pytest.mark.parametrize("mode", ["prefill", "decode", "mixed"])
def test_run_trace_schema_and_token_accounting(tmp_path_factory, mode):
    d = shared_dir(tmp_path_factory, mode)
    run("--mode", mode, "--batch", "uniform:3,9", "--seq-len", "uniform:2,12", "--steps", "4",
        "--overlap", "on", "--trace", f"{d}/t.h5", "--events-every", "2")
    if WORLD.Get_rank():
        return
    cfg = load_config("tiny")
    t = read_trace(f"{d}/t.h5")
    size = WORLD.Get_size()
    assert t.state == "completed" and t.num_steps == 4 and t.num_ranks == size
    assert set(t.kind) == {mode}
    assert t.phase_time_s.shape == (4, cfg.num_hidden_layers, size, len(t.phases))
    # The same seed draws the same steps (after the warm-up one): every token that went through
    # the model, a prompt token or a decode's new token, was routed to top_k experts per MoE layer.
    steps = Workload.create(mode, "uniform:3,9", "uniform:2,12", seed=3).steps(5)[1:]
    assert list(t.input_tokens) == [s.input_tokens for s in steps]
    assert list(t.output_tokens) == [s.output_tokens for s in steps]
    through = np.array([s.input_tokens + len(s.decode_ctx) for s in steps])
    assert (t.expert_tokens.sum(axis=2) == cfg.num_experts_per_tok * through[:, None]).all()
    assert list(t.moe_layers) == [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert (t.phase_time_s >= 0).all() and (t.wall_time_s > 0).all()
    attn = t.phase_ids(["attention"])[0]
    assert (t.phase_time_s[:, :, :, attn].sum(axis=(0, 1)) > 0).any()
    assert set(np.unique(t.events["step"])) == {0, 2}
    assert (t.bytes_sent >= 0).all()
    if size > 1:
        assert t.bytes_sent.sum() > 0
    doc_datasets, doc_attrs = _doc_tables()
    found = set()
    with h5py.File(f"{d}/t.h5", "r", swmr=True) as f:
        f.visititems(lambda name, obj: found.add("/" + name) if isinstance(obj, h5py.Dataset) else None)
        assert found == set(doc_datasets) and set(f.attrs) == set(doc_attrs)
        assert f["layout/placement"].shape[1] == cfg.n_routed_experts


def test_trace_none_and_synthetic_routing(tmp_path_factory, capsys):
    d = shared_dir(tmp_path_factory, "none")
    run("--steps", "2", "--routing", "one", "--trace", "none")
    run("--steps", "2", "--routing", "zipf:1.5", "--trace", f"{d}/z.h5", "--bias-update-rate", "0.01",
        "--replan-every", "1")
    if WORLD.Get_rank() == 0:
        out = capsys.readouterr().out
        assert "Throughput" in out and "<memory>" in out
        t = read_trace(f"{d}/z.h5")
        assert t.num_steps == 2


def test_loads_from_an_earlier_trace(tmp_path_factory):
    d = shared_dir(tmp_path_factory, "loads")
    run("--steps", "2", "--routing", "zipf:2", "--trace", f"{d}/a.h5")
    run("--steps", "2", "--routing", "zipf:2", "--trace", f"{d}/b.h5", "--loads-from", f"{d}/a.h5",
        "--baseline", f"{d}/a.h5")
    if WORLD.Get_rank() == 0 and WORLD.Get_size() > load_config("tiny").n_routed_experts:
        t = read_trace(f"{d}/b.h5")
        assert (t.placement >= 0).sum() > load_config("tiny").n_routed_experts  # replicas exist
