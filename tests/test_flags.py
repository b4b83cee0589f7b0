"""The command line's flags, frozen: every subcommand's flags with their defaults (and choices), so
that a flag renamed, dropped or given a new default by accident fails here (torchtitan freezes its
generated command line the same way). A deliberate change updates FLAGS. Also: the parsers come
from the options dataclasses (parsed defaults are the options' defaults) and parsing loads no MPI."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_moe.apps.bench_options import BenchDispatchOptions, BenchKernelsOptions, BenchLayerOptions
from hpc_moe.apps.options import DEFAULT_STEPS, GenerateOptions, PlanOptions, RunOptions, SelftestOptions
from hpc_moe.cli import build_parser
from hpc_moe.flags import from_args
from hpc_moe.trace.report import ReportOptions

REPO = Path(__file__).resolve().parents[1]

# The parallel layout's flags (LayoutOptions): the same in run and generate.
LAYOUT = {
    "--dp": 1, "--ranks-per-node": None, "--expert-tp": 1, "--dispatch": ("auto", ("auto", "flat", "hierarchical")),
    "--algorithm": ("alltoallv", ("alltoallv", "pipelined")),
    "--transport": ("auto", ("auto", "host", "shm", "cuda-aware", "nccl")),
    "--payload": ("native", ("native", "fp8")), "--overlap": ("off", ("on", "off")), "--micro-batches": 2,
    "--allow-shared-gpu": False, "--deterministic": False,
    "--eplb": ("auto", ("auto", "hierarchical", "global", "hierarchical-refined", "global-refined", "cut")),
    "--redundant-experts": 0, "--backend": ("auto", ("auto", "numpy", "cupy")),
    "--dtype": (None, ("float32", "bfloat16")),
}

# subcommand -> {flag: default, or (default, choices)}; positional arguments by their names.
FLAGS = {
    "run": {
        "--config": "tiny", "--checkpoint": None, "--layers": None, "--seed": 0,
        "--mode": ("prefill", ("prefill", "decode", "mixed")), "--batch": "8", "--seq-len": "64",
        "--prefill-fraction": 0.25, "--routing": "model", "--steps": None, "--duration": None, "--warmup": 2,
        "--trace": "hpc-moe-trace.h5", "--summary-json": None, "--overwrite": False, "--events-every": 10,
        "--watchdog": 600.0, "--profile": ("on", ("on", "off")), "--resume": None, "--baseline": None,
        "--loads-from": None, "--replan-every": 0, "--probe-links": ("on", ("on", "off")), "--bias-update-rate": 0.0,
        **LAYOUT,
    },
    "generate": {
        "--checkpoint": None, "--config": None, "--seed": 0, "--input-ids": None, "--max-new-tokens": 16,
        "--output": None, **LAYOUT,
    },
    "checkpoint make": {
        "--config": None, "--out": None, "--seed": 0, "--shards": 1, "--dtype": ("float32", ("float32", "bfloat16")),
        "--fp8": False,
    },
    "checkpoint check": {
        "dir": None,
    },
    "plan": {
        "--config": "deepseek-v3", "--ranks": None, "--ranks-per-node": None, "--dp": 1, "--expert-tp": 1,
        "--loads-from": None,
        "--eplb": ("auto", ("auto", "hierarchical", "global", "hierarchical-refined", "global-refined", "cut")),
        "--layers": None, "--experts-dtype": ("auto", ("auto", "fp8", "bf16")),
        "--mode": (None, ("prefill", "decode", "mixed")), "--batch": "8", "--seq-len": "64",
        "--prefill-fraction": 0.25, "--steps": 20, "--warmup": 2, "--seed": 0, "--overlap": (None, ("off", "on")),
        "--sequences": 8, "--context": 4096, "--tokens": 4096, "--hardware": "h100-sxm", "--hbm-gib": None,
        "--dispatch": ("auto", ("auto", "flat", "hierarchical")), "--micro-batches": 1, "--placement": False,
        "--json": None, "--sweep-ep": (), "--sweep-sequences": (32, 64, 128, 256), "--sweep-plot": None,
        "--payload": ("native", ("native", "fp8")), "--attention": ("materialised", ("materialised", "fused")),
        "--nics-per-node": None, "--calibrate": (), "--validate": (), "--save": None, "--links-from": None,
    },
    "bench dispatch": {
        "--tokens": 512, "--hidden": 7168, "--topk": 8, "--experts": 256,
        "--algorithm": ("alltoallv", ("alltoallv", "pipelined")), "--payload": ("native", ("native", "fp8")),
        "--transport": ("auto", ("auto", "host", "shm", "cuda-aware", "nccl")), "--deterministic": False,
        "--backend": ("auto", ("auto", "numpy", "cupy")), "--dtype": ("bfloat16", ("float32", "bfloat16")),
        "--iters": 20, "--warmup": 3, "--ranks-per-node": None, "--no-overlap": False, "--no-imb": False, "--seed": 0,
        "--json": None,
    },
    "bench layer": {
        "--tokens": 128, "--hidden": 7168, "--inter": 256, "--experts": 8, "--topk": 2,
        "--dtype": ("float32", ("float32", "bfloat16")), "--backend": ("auto", ("auto", "numpy", "cupy")),
        "--transport": ("auto", ("auto", "host", "shm", "cuda-aware", "nccl")),
        "--payload": ("native", ("native", "fp8")), "--deterministic": False, "--ranks-per-node": None,
        "--dispatch": ("auto", ("auto", "flat", "hierarchical")), "--micro-batches": 1, "--iters": 20, "--warmup": 3,
        "--seed": 0, "--json": None,
    },
    "bench kernels": {
        "--config": "deepseek-v3", "--backend": ("auto", ("auto", "numpy", "cupy")),
        "--dtype": (None, ("float32", "bfloat16")), "--tokens": (128, 512, 2048, 4096, 16384),
        "--prefill": (1024, 4096), "--decode": ("32x4096", "128x4096"), "--peak-size": 8192, "--copy-mib": 1024,
        "--iters": 10, "--warmup": 2, "--no-torch": True, "--seed": 0, "--json": None,
    },
    "report": {
        "traces": None, "--out": None, "--skip-steps": 0, "--step": None, "--no-plots": False, "--no-tables": False,
    },
    "export": {
        "trace": None, "--perfetto": None, "--steps": None,
    },
    "selftest": {
        "--backend": ("auto", ("auto", "numpy", "cupy")), "--dtype": (None, ("float32", "bfloat16")),
        "--transport": ("auto", ("auto", "host", "shm", "cuda-aware", "nccl")), "--trace": None,
        "--allow-shared-gpu": False,
    },
}


def _leaves(parser: argparse.ArgumentParser, prefix: str = ""):
    """(subcommand, its parser) for every parser without subcommands below ``parser``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and prefix:
        yield prefix, parser
    for a in subs:
        for name, p in a.choices.items():
            yield from _leaves(p, f"{prefix} {name}".strip())


def _flags(parser: argparse.ArgumentParser) -> dict:
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        key = "/".join(a.option_strings) or a.dest
        out[key] = a.default if a.choices is None else (a.default, tuple(a.choices))
    return out


def test_the_flag_list_is_frozen():
    assert {name: _flags(p) for name, p in _leaves(build_parser())} == FLAGS


def test_every_help_formats():  # a stray % in a field's help breaks only --help
    for name, p in _leaves(build_parser()):
        assert p.format_help().startswith(f"usage: hpc-moe {name}")


@pytest.mark.parametrize("argv, cls, given", [
    (["run"], RunOptions, {}),
    (["generate", "--config", "tiny", "--input-ids", "i.npy", "--output", "o.npz"], GenerateOptions,
     {"config": "tiny", "input_ids": "i.npy", "output": "o.npz"}),
    (["plan"], PlanOptions, {}),
    (["selftest"], SelftestOptions, {}),
    (["report", "t.h5"], ReportOptions, {"traces": ("t.h5",)}),
    (["bench", "dispatch"], BenchDispatchOptions, {}),
    (["bench", "layer"], BenchLayerOptions, {}),
    (["bench", "kernels"], BenchKernelsOptions, {}),
])
def test_parsed_defaults_are_the_options_defaults(argv, cls, given):
    assert from_args(cls, build_parser().parse_args(argv)) == cls(**given)


def test_run_length_and_trace_defaults_live_in_run_options():
    parse = build_parser().parse_args
    assert from_args(RunOptions, parse(["run"])).steps == DEFAULT_STEPS == PlanOptions().steps
    o = from_args(RunOptions, parse(["run", "--duration", "5", "--trace", "none"]))
    assert o.steps is None and o.duration == 5.0 and o.trace is None


def test_generate_sets_every_engine_knob():
    args = build_parser().parse_args(["generate", "--config", "tiny", "--input-ids", "i.npy", "--output", "o.npz",
                                      "--eplb", "global", "--redundant-experts", "3", "--overlap", "on",
                                      "--micro-batches", "4", "--payload", "fp8", "--dispatch", "flat"])
    engine = from_args(GenerateOptions, args).layout.engine_options()
    assert (engine.eplb, engine.redundant_experts, engine.micro_batches) == ("global", 3, 4)
    assert (engine.dispatch.payload, engine.dispatch.scheme) == ("fp8", "flat")


def test_parsing_loads_no_mpi():
    code = ("import sys; from hpc_moe.cli import build_parser; p = build_parser(); "
            "[p.parse_args(a) for a in (['run'], ['plan'], ['bench', 'dispatch'], ['bench', 'layer'], "
            "['selftest'], ['report', 't.h5'])]; "
            "assert not [m for m in sys.modules if m.startswith('mpi4py')], 'mpi4py imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
