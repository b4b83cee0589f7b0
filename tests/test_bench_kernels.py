"""hpc-moe bench kernels (one process): every operation timed, against the measured peaks and,
where torch imports, the same operation in PyTorch."""
import json

import pytest

from hpc_moe.cli import main


def test_bench_kernels_reports_every_operation(tmp_path):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--config", "tiny", "--tokens", "16,64", "--prefill", "16", "--decode", "2x32",
                 "--peak-size", "256", "--copy-mib", "8", "--iters", "2", "--warmup", "0", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["gemm_peak_tflops"] > 0 and r["copy_peak_gbps"] > 0
    ops = [k["op"] for k in r["kernels"]]
    assert ops.count("expert") == ops.count("dense_mlp") == ops.count("router") == ops.count("combine") == 2
    assert ops.count("mla_prefill") == ops.count("mla_decode") == 1
    for k in r["kernels"]:
        assert k["ms"] > 0 and k["gbps"] > 0
        assert k["of_gemm_peak"] == pytest.approx(k["tflops"] / r["gemm_peak_tflops"])
        if r["torch"]:
            assert k["speedup_vs_torch"] == pytest.approx(k["torch_ms"] / k["ms"])


def test_bench_kernels_bad_shapes(capsys):
    assert main(["bench", "kernels", "--config", "tiny", "--decode", "2by32"]) == 2
    assert "--decode wants BxL" in capsys.readouterr().err
