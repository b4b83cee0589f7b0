"""The benchmarks run at every world size and report what their docs promise.

Run: mpiexec -n R python -m mpi4py -m pytest --with-mpi tests/mpi/test_bench.py (R = 1..16).
"""
import json
from pathlib import Path

import pytest
from mpi4py import MPI

from hpc_moe.apps.imb import find_imb
from hpc_moe.cli import main

pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD


def out_file(factory, name) -> str:
    return WORLD.bcast(str(factory.mktemp(name) / "out.json") if WORLD.Get_rank() == 0 else None)


@pytest.mark.parametrize("extra", [[], ["--algorithm", "pipelined", "--deterministic", "--no-imb"],
                                   ["--payload", "fp8", "--no-imb"], ["--ranks-per-node", "2", "--no-overlap", "--no-imb"]])
def test_bench_dispatch_json(tmp_path_factory, extra):
    path = out_file(tmp_path_factory, "dispatch")
    assert main(["bench", "dispatch", "--tokens", "24", "--hidden", "256", "--experts", str(max(4, 2 * WORLD.Get_size())),
                 "--topk", "3", "--iters", "2", "--warmup", "1", "--json", path, *extra]) == 0
    WORLD.Barrier()
    if WORLD.Get_rank():
        return
    r = json.loads(Path(path).read_text())
    assert r["config"]["ep_size"] == WORLD.Get_size() and r["pairs_per_rank"] == 24 * 3
    ops = r["ops"]
    for name in ("dispatch", "combine", "raw Ialltoallv (dispatch bytes)", "memory pass (dispatch bytes)",
                 "local: route + pack rows", "local: combine reduce"):
        assert ops[name]["median_ms"] > 0, name
    assert r["floor_ms"] > 0 and r["ratio_vs_raw"] > 0
    assert set(r["overlap"]) == ({"dispatch", "raw_dispatch"} if "--no-overlap" not in extra else set())
    if r["config"]["nodes"] > 1 and WORLD.Get_size() % 2 == 0:  # equal nodes: both schemes, the two-stage one
        # crossing nodes no more than the flat one
        s = r["schemes"]
        assert s["hierarchical"]["internode_mb_per_rank"] <= s["flat"]["internode_mb_per_rank"]
        assert s["hierarchical"]["exchange_ms"] > 0
    # Rows leave once per destination rank: never more than the pairs.
    assert 0 < r["rows_sent_per_rank"] <= r["pairs_per_rank"]
    # IMB's Alltoallv of the same bytes where it is installed (make install MPI=impi), else one reason.
    imb = r["imb"]
    if "--no-imb" in extra:
        assert imb == {"skipped": "--no-imb"}
    elif find_imb() is None:
        assert "not found" in imb["skipped"]
    else:
        assert imb["ranks"] == WORLD.Get_size(), imb
        for kind in ("dispatch", "combine"):
            total = ops[f"raw Ialltoallv ({kind} bytes)"]["mb_per_rank"] * 1e6  # to other ranks only
            assert imb[kind]["bytes_per_peer"] * WORLD.Get_size() >= total and imb[kind]["t_max_ms"] > 0


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_bench_layer_json(tmp_path_factory, micro_batches):
    path = out_file(tmp_path_factory, "layer")
    assert main(["bench", "layer", "--tokens", "32", "--hidden", "128", "--inter", "64", "--micro-batches",
                 str(micro_batches), "--experts", str(max(2, WORLD.Get_size())), "--topk", "1", "--iters", "3",
                 "--warmup", "1", "--json", path]) == 0
    WORLD.Barrier()
    if WORLD.Get_rank():
        return
    r = json.loads(Path(path).read_text())
    assert r["config"]["world_size"] == WORLD.Get_size() and r["config"]["micro_batches"] == micro_batches
    assert set(r["phases_ms"]) == {"gate", "dispatch", "expert", "combine", "wait"}
    assert r["layer_ms"] > 0 and r["floor_ms"] > 0 and r["expert_floor_ms"] > 0
    assert r["layer_ms"] >= r["phases_ms"]["expert"]  # the layer contains its expert phase
