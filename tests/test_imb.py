"""The Intel MPI Benchmarks' figure next to bench dispatch's floor: finding IMB, reading its table.

Running it is tested under MPI (tests/mpi/test_bench.py), for real in `make test-mpi-matrix`'s
Intel MPI venv, which ships IMB-MPI1.
"""
import os
import stat

from hpc_moe.apps.bench_dispatch import _table
from hpc_moe.apps.imb import find_imb, parse_imb

# IMB-MPI1 2021.19's output (impi-rt wheel, 2 ranks), cut.
IMB_OUTPUT = """\
#----------------------------------------------------------------
# Benchmarking Alltoallv
# #processes = 2
#----------------------------------------------------------------
       #bytes #repetitions  t_min[usec]  t_max[usec]  t_avg[usec]
         1024           50       702.41      6873.46      3787.94
        65536           50       454.36      1602.82      1028.59


# All processes entering MPI_Finalize
"""


def test_parse_imb_reads_each_length_in_ms():
    rows = parse_imb(IMB_OUTPUT)
    assert set(rows) == {1024, 65536}
    assert rows[65536] == {"t_min_ms": 0.45436, "t_max_ms": 1.60282, "t_avg_ms": 1.02859}
    assert parse_imb("# no table\n") == {}


def _executable(path):
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_find_imb_needs_the_benchmark_and_its_mpiexec(tmp_path):
    assert find_imb(str(tmp_path)) is None
    _executable(tmp_path / "IMB-MPI1")
    assert find_imb(str(tmp_path)) is None  # no launcher beside it
    _executable(tmp_path / "mpiexec")
    assert find_imb(os.pathsep.join(["/nonexistent", str(tmp_path)])) == (str(tmp_path / "IMB-MPI1"),
                                                                           str(tmp_path / "mpiexec"))


def _result(imb):
    op = {"median_ms": 2.0, "p99_ms": 3.0, "max_ms": 3.0, "mb_per_rank": 1.5, "algbw_gbps": 0.75}
    return {"config": {"ep_size": 4, "nodes": 1, "tokens_per_rank": 64, "hidden": 1024, "topk": 4, "experts": 16,
                       "dtype": "bfloat16", "payload": "native", "deterministic": False, "transport": "host",
                       "iters": 10, "warmup": 3, "mpi": "Intel(R) MPI Library 2021.18.1 for Linux* OS"},
            "rows_sent_per_rank": 186, "pairs_per_rank": 256,
            "ops": {"raw Ialltoallv (dispatch bytes)": op, "raw Ialltoallv (combine bytes)": op},
            "ratio_vs_raw": 1.0, "ratio_exchange_vs_raw": 1.0, "schemes": {}, "overlap": {}, "imb": imb}


def test_the_table_shows_imb_under_each_raw_floor_and_nothing_without_it():
    figure = {"bytes_per_peer": 375000, "t_min_ms": 0.2, "t_max_ms": 0.5, "t_avg_ms": 0.3}
    lines = _table(_result({"binary": "/v/bin/IMB-MPI1", "ranks": 4, "dispatch": figure, "combine": figure})).splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("raw Ialltoallv")]
    for i, kind in zip(at, ("dispatch", "combine")):
        assert lines[i + 1].split()[:5] == ["IMB-MPI1", "Alltoallv", f"({kind}", "bytes)", "0.50"]
        assert lines[i + 1].split()[-1] == "3.00"  # 1.5 MB in 0.5 ms
    assert any("375000 and 375000 B" in line for line in lines)
    assert "IMB" not in _table(_result({"skipped": "IMB-MPI1 not found"}))
