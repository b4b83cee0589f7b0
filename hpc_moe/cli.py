"""The ``hpc-moe`` command line: one subcommand per job.

Bad arguments and bad inputs end with one line on stderr and exit status 2; a failure on one MPI
rank aborts the whole job (MPI_Abort) instead of leaving the other ranks waiting forever.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from hpc_moe import __version__
from hpc_moe.errors import EXIT_INPUT, InputError, UsageError
from hpc_moe.flags import add_flags, from_args


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block, and one for the whole job
        where = self.prog.removeprefix("hpc-moe").strip()  # "run", "bench layer"; "" for the top level
        sys.exit(_fail(f"{where + ': ' if where else ''}error: {message}", EXIT_INPUT))


def _add_checkpoint(sub):
    p = sub.add_parser("checkpoint", help="write a synthetic HF checkpoint, or check one")
    csub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    m = csub.add_parser("make", help="write synthetic weights for a preset as an HF checkpoint")
    m.add_argument("--config", required=True, help="preset name or config.json")
    m.add_argument("--out", required=True, help="directory to create")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--shards", type=int, default=1)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--fp8", action="store_true", help="store linear weights as FP8 e4m3 with 128x128 block scales")
    c = csub.add_parser("check", help="check that every tensor of a checkpoint is there with its shape")
    c.add_argument("dir")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's parser; the jobs' flags come from their options dataclasses (hpc_moe.flags),
    which are MPI-free: parsing loads no MPI."""
    from hpc_moe.apps.bench_options import BenchDispatchOptions, BenchKernelsOptions, BenchLayerOptions
    from hpc_moe.apps.options import GenerateOptions, PlanOptions, RunOptions, SelftestOptions
    from hpc_moe.trace.report import ReportOptions
    parser = _Parser(prog="hpc-moe", description="Large expert-parallel inference of DeepSeek-V3-class "
                     "MoE models over MPI: run it under mpiexec/srun with one rank per GPU.")
    parser.add_argument("--version", action="version", version=f"hpc-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    add_flags(sub.add_parser("run", help="the main job: a throughput run that writes an HDF5 trace",
                             description="Run a workload on the expert-parallel engine under mpiexec/srun (one rank "
                             "per GPU), print a summary, and write the trace on rank 0."), RunOptions)
    add_flags(sub.add_parser("generate", help="prefill + greedy decode of prompt token ids",
                             description="Prefill then greedy decode with the latent KV cache. Runs on one process "
                             "or, under mpiexec, expert-parallel on all ranks."), GenerateOptions)
    _add_checkpoint(sub)
    add_flags(sub.add_parser("plan", help="a deployment before it runs: parameters, memory per GPU and whether it "
                             "fits, the expert placement, the predicted prefill and decode step (a projection)"),
              PlanOptions)
    bench = sub.add_parser("bench", help="micro-benchmarks (under mpiexec)")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    add_flags(bsub.add_parser("dispatch", help="dispatch/combine against the raw Ialltoallv floor"),
              BenchDispatchOptions)
    add_flags(bsub.add_parser("layer", help="one MoE layer forward, phase by phase, against the raw floor"),
              BenchLayerOptions)
    add_flags(bsub.add_parser("kernels", help="one device's kernels at a model's shapes against its measured peaks "
                              "and PyTorch (one process)"), BenchKernelsOptions)
    add_flags(sub.add_parser("report", help="summary tables and PNG plots from traces"), ReportOptions)
    ex = sub.add_parser("export", help="a trace's timelines for other tools: Perfetto / chrome://tracing JSON")
    ex.add_argument("trace", metavar="TRACE.h5")
    ex.add_argument("--perfetto", required=True, metavar="OUT.json[.gz]",
                    help="Chrome trace event JSON, every rank a thread of its node (gzip when it ends in .gz)")
    ex.add_argument("--steps", metavar="A:B", help="only measured steps A to B-1 (slice bounds; either may be empty)")
    add_flags(sub.add_parser("selftest", help="check MPI, the GPUs, the dispatch transport and the trace path on "
                             "every rank"), SelftestOptions)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="hpc-moe: %(message)s", stream=sys.stderr)
    # The extra dispatch channels of --overlap on repeat channel 0's transport choice.
    logging.getLogger("hpc_moe.channel").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        code = _dispatch(args)
    except InputError as e:
        return _fail(f"error: {e}", EXIT_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return code


def entry() -> None:
    """The program (``hpc-moe``, ``python -m hpc_moe``): main(), and an orderly non-zero end
    (stopped, or bad input every rank agreed on) finalizes MPI first, or ``python -m mpi4py``
    aborts the job on it and the launcher adds its own lines."""
    try:
        code = main()
    except SystemExit as e:  # argparse: --help, or a bad flag (_Parser.error has agreed on it)
        code = e.code if isinstance(e.code, int) else 1
    if code and "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    sys.exit(code)


def _dispatch(args) -> int:
    if args.command == "run":
        from hpc_moe.apps.options import RunOptions
        from hpc_moe.apps.run import run_job
        return run_job(from_args(RunOptions, args))
    if args.command == "generate":
        from hpc_moe.apps.generate import run_generate
        from hpc_moe.apps.options import GenerateOptions
        return run_generate(from_args(GenerateOptions, args))
    if args.command == "bench" and args.bench == "dispatch":
        from hpc_moe.apps.bench_dispatch import run_bench_dispatch
        from hpc_moe.apps.bench_options import BenchDispatchOptions
        return run_bench_dispatch(from_args(BenchDispatchOptions, args))
    if args.command == "bench" and args.bench == "kernels":
        from hpc_moe.apps.bench_kernels import run_bench_kernels
        from hpc_moe.apps.bench_options import BenchKernelsOptions
        return run_bench_kernels(from_args(BenchKernelsOptions, args))
    if args.command == "bench":
        from hpc_moe.apps.bench_layer import run_bench_layer
        from hpc_moe.apps.bench_options import BenchLayerOptions
        return run_bench_layer(from_args(BenchLayerOptions, args))
    if args.command == "selftest":
        from hpc_moe.apps.options import SelftestOptions
        from hpc_moe.apps.selftest import run_selftest
        return run_selftest(from_args(SelftestOptions, args))
    if args.command == "export":
        from hpc_moe.trace.export import run_export
        return run_export(args.trace, args.perfetto, args.steps)
    if args.command == "report":
        from hpc_moe.trace.report import ReportOptions, run_report
        return run_report(from_args(ReportOptions, args))
    if args.command == "plan":
        from hpc_moe.apps.options import PlanOptions
        from hpc_moe.apps.plan import run_plan
        return run_plan(from_args(PlanOptions, args))
    if args.command == "checkpoint":
        return _checkpoint(args)
    raise AssertionError(args.command)


def _checkpoint(args) -> int:
    from hpc_moe.config import load_config
    from hpc_moe.outputs import check_output
    from hpc_moe.weights.checkpoint import Checkpoint, save_checkpoint
    from hpc_moe.weights.synthetic import SyntheticWeights
    if args.action == "make":
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UsageError(f"--out {args.out} exists and is not empty (a checkpoint's shards would mix with "
                             "what is there)")
        check_output(os.path.join(args.out, "config.json"), "--out")
        cfg = load_config(args.config)
        if args.fp8 and cfg.quantization_config is None:
            cfg = cfg.replace(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                   "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
        elif not args.fp8 and cfg.quantization_config is not None:
            cfg = cfg.replace(quantization_config=None)
        save_checkpoint(args.out, cfg, SyntheticWeights(cfg, args.seed), shards=args.shards, dtype=args.dtype)
        print(f"wrote {args.out}")
        return 0
    Checkpoint.open(args.dir).validate()
    print(f"{args.dir}: ok")
    return 0


_LAUNCHED = ("PMI_SIZE", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID")  # a rank of a job


def _fail(message: str, code: int) -> int:
    """One line on stderr; under MPI with several ranks, from rank 0 when every rank failed alike,
    else from the failing rank as it aborts them all (hpc_moe.comm.fail_together)."""
    if "mpi4py.MPI" in sys.modules or any(v in os.environ for v in _LAUNCHED):
        from mpi4py import MPI

        from hpc_moe.comm import fail_together
        if MPI.COMM_WORLD.Get_size() > 1:
            fail_together(message, code)
            return code
    sys.stderr.write(f"hpc-moe: {message}\n")
    return code
