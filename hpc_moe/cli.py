"""The ``hpc-moe`` command line: one subcommand per job.

Bad arguments and bad inputs end with one line on stderr and exit status 2; a failure on one MPI
rank aborts the whole job (MPI_Abort) instead of leaving the other ranks waiting forever.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from hpc_moe import __version__
from hpc_moe.errors import EXIT_INPUT, InputError, UsageError

# hpc_moe.ep.transport.TRANSPORTS, written out: importing it loads MPI, which parsing must not
# (tests/test_cli.py checks that the two agree).
TRANSPORTS = ("auto", "host", "shm", "cuda-aware", "nccl")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block, and one for the whole job
        where = self.prog.removeprefix("hpc-moe").strip()  # "run", "bench layer"; "" for the top level
        sys.exit(_fail(f"{where + ': ' if where else ''}error: {message}", EXIT_INPUT))


def _add_generate(sub):
    p = sub.add_parser("generate", help="prefill + greedy decode of prompt token ids",
                       description="Prefill then greedy decode with the latent KV cache. Runs on one "
                       "process or, under mpiexec, expert-parallel on all ranks.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF checkpoint directory (config.json + safetensors)")
    src.add_argument("--config", help="preset name or config.json: synthetic weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights (with --config)")
    p.add_argument("--input-ids", required=True, help=".npy of int64 [batch, prompt_len] token ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--output", required=True, help=".npz to write (prefill_logits, tokens)")
    _add_backend_args(p)
    _add_parallel_args(p)
    return p


def _add_parallel_args(p):
    g = p.add_argument_group("parallelism and communication")
    g.add_argument("--dp", type=_positive, default=1, help="model replicas (independent EP groups)")
    g.add_argument("--ranks-per-node", type=_positive, default=None, metavar="K",
                   help="simulate nodes of K consecutive ranks (default: the real nodes, from shared memory)")
    g.add_argument("--expert-tp", type=_positive, default=1,
                   help="ranks per expert: each expert's intermediate dimension split over T ranks")
    g.add_argument("--dispatch", default="auto", choices=["auto", "flat", "hierarchical"],
                   help="flat: one exchange over the EP group; hierarchical: each token crosses to a node once, "
                   "then is forwarded inside it; auto (default): hierarchical when there is more than one node")
    g.add_argument("--algorithm", default="alltoallv", choices=["alltoallv", "pipelined"],
                   help="one Ialltoallv per direction, or per-peer messages with experts run as tokens land")
    g.add_argument("--transport", default="auto", choices=TRANSPORTS,
                   help="auto (default): shared memory on one node and host MPI across nodes on the CPU; on GPUs CUDA-aware "
                   "MPI, then NCCL, then pinned host buffers")
    g.add_argument("--payload", default="native", choices=["native", "fp8"],
                   help="dispatch payload: the compute dtype, or FP8 e4m3 with a scale per 128 values")
    g.add_argument("--overlap", default="off", choices=["on", "off"],
                   help="on: split each step's sequences into micro-batches and overlap one's all-to-all "
                   "with another's compute; off: one batch per step (the baseline of the comparison)")
    g.add_argument("--micro-batches", type=_positive, default=2, help="micro-batches per step with --overlap on")
    g.add_argument("--allow-shared-gpu", action="store_true", help="let ranks of a node share a GPU (tests on one GPU)")
    g.add_argument("--deterministic", action="store_true",
                   help="logits bitwise identical at any rank count, placement, DP and micro-batching (the combine "
                   "returns one row per (token, expert) and the source sums them in k order; more combine bytes)")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_list(text: str) -> tuple[int, ...]:
    return tuple(_positive(t) for t in text.split(","))


def _add_backend_args(p):
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default float32 on CPU, bfloat16 on GPU)")


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


def _add_run(sub):
    from hpc_moe.ep.placement import POLICIES
    p = sub.add_parser("run", help="the main job: a throughput run that writes an HDF5 trace",
                       description="Run a workload on the expert-parallel engine under mpiexec/srun "
                       "(one rank per GPU), print a summary, and write the trace on rank 0.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default="tiny", help="preset name or config.json (synthetic weights)")
    src.add_argument("--checkpoint", help="HF checkpoint directory (each rank maps only its own experts)")
    p.add_argument("--layers", type=_positive, default=None,
                   help="run only the first N layers (for machines that cannot hold the model)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, workload, tokens and synthetic routing")
    w = p.add_argument_group("workload")
    w.add_argument("--mode", default="prefill", choices=["prefill", "decode", "mixed"])
    w.add_argument("--batch", default="8", help="sequences per step: N, uniform:LO,HI, normal:M,S, "
                   "lognormal:MU,SIGMA or file:PATH")
    w.add_argument("--seq-len", default="64", help="prompt length (prefill) or context length (decode); "
                   "same forms as --batch")
    w.add_argument("--prefill-fraction", type=float, default=0.25, help="share of prefills in a mixed step")
    w.add_argument("--routing", default="model",
                   help="model (the router), or synthetic: uniform, zipf[:S] (popularity ~ 1/rank^S, the same hot "
                   "experts all run), zipf:S,drift:R (the hot experts move to a fresh draw every 1/R steps) or one "
                   "(all to the same experts)")
    s = p.add_argument_group("length and output")
    s.add_argument("--steps", type=int, default=None, help="measured steps (default 20 unless --duration)")
    s.add_argument("--duration", type=float, default=None, help="measure for this many seconds")
    s.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    s.add_argument("--trace", default="hpc-moe-trace.h5", help="HDF5 trace to write, or 'none'")
    s.add_argument("--summary-json", metavar="FILE", help="write the summary as JSON (rank 0; keys in docs/trace-format.md)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing trace file")
    s.add_argument("--events-every", type=int, default=10,
                   help="record the per-rank timeline every N measured steps (0: never)")
    s.add_argument("--watchdog", type=float, default=600.0, metavar="SECONDS",
                   help="a rank that waits in communication this long ends the job, naming the ranks that do not "
                   "answer (exit status 4; 0: off)")
    s.add_argument("--profile", default="on", choices=["on", "off"],
                   help="time every phase (on a GPU by CUDA events, read once a step: the device is not synchronised "
                   "at each phase)")
    s.add_argument("--baseline", metavar="TRACE.h5", help="a smaller run of the same scaling series: "
                   "print scaling efficiency against it")
    b = p.add_argument_group("load balancing")
    b.add_argument("--loads-from", metavar="TRACE.h5",
                   help="place experts (replicas, colocation) by the loads an earlier run measured")
    b.add_argument("--replan-every", type=int, default=0,
                   help="re-place experts from the loads measured so far every N steps (outputs unchanged; the "
                        "experts that change owner travel during the next step, in force from the one after)")
    b.add_argument("--eplb", default="auto", choices=["auto", *POLICIES],
                   help="how loads place experts: DeepSeek EPLB's hierarchical (groups packed onto nodes, replicas "
                   "inside them) or global (replicas anywhere) policy, or either -refined (its packing improved by "
                   "swaps of replicas); auto: every policy's placement priced by the planner's cost model (expert "
                   "work of the slowest rank, bytes across and inside nodes on the measured links), the cheapest")
    b.add_argument("--probe-links", default="on", choices=["on", "off"],
                   help="with more than one node: time every node pair's link at the start (about a second), record "
                   "them in the trace, and, placing by loads, give the heaviest nodes' experts to the nodes with the "
                   "fastest links")
    b.add_argument("--redundant-experts", type=int, default=0, metavar="N",
                   help="replicas beyond one per expert when experts are colocated (more experts than ranks)")
    b.add_argument("--bias-update-rate", type=float, default=0.0,
                   help="aux-loss-free gating bias adjustment per step (changes the model's outputs)")
    _add_backend_args(p)
    _add_parallel_args(p)


def _add_plan(sub):
    from hpc_moe.ep.placement import POLICIES
    from hpc_moe.perf.hardware import hardware_names
    p = sub.add_parser("plan", help="a deployment before it runs: parameters, memory per GPU and whether it "
                       "fits, the expert placement, the predicted prefill and decode step (a projection)")
    p.add_argument("--config", default="deepseek-v3", help="preset name or config.json")
    p.add_argument("--ranks", type=_positive, help="world size")
    p.add_argument("--ranks-per-node", type=_positive, default=None, help="default: the hardware's GPUs per node")
    p.add_argument("--dp", type=_positive, default=1)
    p.add_argument("--expert-tp", type=_positive, default=1)
    p.add_argument("--loads-from", metavar="TRACE.h5", help="place by the loads of an earlier run: print every "
                   "placement policy's rank load, bytes and predicted step, and plan with the cheapest")
    p.add_argument("--eplb", default="auto", choices=["auto", *POLICIES],
                   help="with --loads-from: plan this placement policy (auto: the cheapest predicted)")
    p.add_argument("--layers", type=_positive, default=None, help="the first N layers only (default: all)")
    p.add_argument("--experts-dtype", default="auto", choices=["auto", "fp8", "bf16"],
                   help="routed experts in FP8 e4m3 with 128x128 block scales or BF16 (auto: as the config's "
                   "quantization_config says)")
    r = p.add_argument_group("the run to plan (as hpc-moe run spells it; sets --sequences, --context and --tokens "
                             "for its busiest GPU and predicts its steps)")
    r.add_argument("--mode", choices=["prefill", "decode", "mixed"], default=None)
    r.add_argument("--batch", default="8", help="sequences per step, as run's --batch (N or a distribution)")
    r.add_argument("--seq-len", default="64", help="as run's --seq-len")
    r.add_argument("--prefill-fraction", type=float, default=0.25, help="as run's")
    r.add_argument("--steps", type=_positive, default=20, help="measured steps of the run (its means are over them)")
    r.add_argument("--warmup", type=int, default=2, help="as run's")
    r.add_argument("--seed", type=int, default=0, help="as run's: the same seed draws the same steps")
    r.add_argument("--overlap", choices=["off", "on"], default=None,
                   help="as run's: on is --micro-batches (2 unless given), off is 1")
    p.add_argument("--sequences", type=_positive, default=8, help="sequences per GPU (their latent KV cache)")
    p.add_argument("--context", type=_positive, default=4096, help="positions per sequence")
    p.add_argument("--tokens", type=_positive, default=4096, help="tokens per GPU through a layer at once")
    p.add_argument("--hardware", default="h100-sxm", metavar="NAME|FILE",
                   help="a device and its links: a name from data/hardware (" + ", ".join(hardware_names()) + ") or such "
                   "a JSON file")
    p.add_argument("--hbm-gib", type=float, default=None, help="GPU memory, GiB (default: the hardware's)")
    p.add_argument("--dispatch", default="auto", choices=["auto", "flat", "hierarchical"],
                   help="the all-to-all to predict (auto: hierarchical across nodes, as run does)")
    p.add_argument("--micro-batches", type=_positive, default=1,
                   help="micro-batches whose attention hides another's all-to-all (run --overlap on)")
    p.add_argument("--placement", action="store_true", help="also print the expert placement, slot by slot")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    p.add_argument("--sweep-ep", type=_positive_list, default=(), metavar="N,N,...",
                   help="instead of one layout: predict these EP sizes (x --dp) at each --sweep-sequences")
    p.add_argument("--sweep-sequences", type=_positive_list, default=(32, 64, 128, 256), metavar="N,N,...",
                   help="decode batches per GPU of the sweep")
    p.add_argument("--sweep-plot", metavar="OUT.png", help="plot the sweep: throughput per GPU and scaling efficiency")
    p.add_argument("--payload", default="native", choices=["native", "fp8"],
                   help="dispatch rows in the compute dtype or FP8 with a scale per 128 values (run --payload)")
    p.add_argument("--attention", default="materialised", choices=["materialised", "fused"],
                   help="hpc_moe's attention kernels (scores in memory) or a fused flash-style kernel's traffic")
    p.add_argument("--nics-per-node", type=_positive, default=None, metavar="N",
                   help="the node's inter-node bandwidth is N of the hardware's NICs shared by its GPUs "
                   "(default: one NIC a GPU)")
    p.add_argument("--calibrate", nargs="+", default=(), metavar="TRACE.h5",
                   help="fit --hardware's fractions reached, fixed costs and links to these traces "
                   "and show predicted against measured for each")
    p.add_argument("--validate", nargs="+", default=(), metavar="TRACE.h5",
                   help="predict these traces' steps from their shapes on --hardware (or the --calibrate fit) "
                   "against what they measured; --loads-from sets the expert imbalance")
    p.add_argument("--save", metavar="FILE.json", help="write the --calibrate fit as a hardware file")
    p.add_argument("--links-from", metavar="TRACE.h5", help="the links between and inside nodes as a run measured "
                   "them at its start (run --probe-links), instead of --hardware's; with --calibrate, the fit "
                   "finds what an all-to-all reaches of them")


def _add_bench_kernels(p):
    p.add_argument("--config", default="deepseek-v3", help="preset or config.json whose shapes to run")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the backend's")
    p.add_argument("--tokens", type=_positive_list, default=(128, 512, 2048, 4096, 16384), metavar="N,N,...",
                   help="token counts of the expert, dense MLP, router, permute and combine")
    p.add_argument("--prefill", type=_positive_list, default=(1024, 4096), metavar="S,S,...",
                   help="prompt lengths of MLA prefill (one prompt)")
    p.add_argument("--decode", type=lambda s: tuple(s.split(",")), default=("32x4096", "128x4096"),
                   metavar="BxL,...", help="batches x contexts of MLA decode")
    p.add_argument("--peak-size", type=_positive, default=8192, help="N of the N x N x N peak GEMM")
    p.add_argument("--copy-mib", type=_positive, default=1024, help="MiB of the peak copy")
    p.add_argument("--iters", type=_positive, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpc-moe", description="Large expert-parallel inference of DeepSeek-V3-class "
                     "MoE models over MPI: run it under mpiexec/srun with one rank per GPU.")
    parser.add_argument("--version", action="version", version=f"hpc-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_run(sub)
    _add_generate(sub)
    _add_checkpoint(sub)
    _add_plan(sub)
    from hpc_moe.apps.bench_dispatch import add_dispatch_args
    from hpc_moe.apps.bench_layer import add_layer_args
    from hpc_moe.trace.report import add_report_args
    bench = sub.add_parser("bench", help="micro-benchmarks (under mpiexec)")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    add_dispatch_args(bsub.add_parser("dispatch", help="dispatch/combine against the raw Ialltoallv floor"))
    add_layer_args(bsub.add_parser("layer", help="one MoE layer forward, phase by phase, against the raw floor"))
    _add_bench_kernels(bsub.add_parser("kernels", help="one device's kernels at a model's shapes against its measured "
                                       "peaks and PyTorch (one process)"))
    add_report_args(sub.add_parser("report", help="summary tables and PNG plots from traces"))
    ex = sub.add_parser("export", help="a trace's timelines for other tools: Perfetto / chrome://tracing JSON")
    ex.add_argument("trace", metavar="TRACE.h5")
    ex.add_argument("--perfetto", required=True, metavar="OUT.json[.gz]",
                    help="Chrome trace event JSON, every rank a thread of its node (gzip when it ends in .gz)")
    ex.add_argument("--steps", metavar="A:B", help="only measured steps A to B-1 (slice bounds; either may be empty)")
    st = sub.add_parser("selftest", help="check MPI, the GPUs, the dispatch transport and the trace path on every rank")
    _add_backend_args(st)
    st.add_argument("--transport", default="auto", choices=TRANSPORTS)
    st.add_argument("--trace", help="check that this trace's directory is writable")
    st.add_argument("--allow-shared-gpu", action="store_true", help="let ranks of a node share a GPU")
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
    if args.command in ("run", "generate"):
        from hpc_moe.apps.options import GenerateOptions, LayoutOptions, RunOptions
        layout = options_from(LayoutOptions, args)
    if args.command == "run":
        from hpc_moe.apps.run import run_job
        steps = 20 if args.steps is None and args.duration is None else args.steps
        return run_job(options_from(RunOptions, args, layout=layout, steps=steps,
                                    trace=None if args.trace == "none" else args.trace))
    if args.command == "generate":
        from hpc_moe.apps.generate import run_generate
        return run_generate(options_from(GenerateOptions, args, layout=layout))
    if args.command == "bench" and args.bench == "dispatch":
        from hpc_moe.apps.bench_dispatch import BenchDispatchOptions, run_bench_dispatch
        return run_bench_dispatch(options_from(BenchDispatchOptions, args))
    if args.command == "bench" and args.bench == "kernels":
        from hpc_moe.apps.bench_kernels import BenchKernelsOptions, run_bench_kernels
        return run_bench_kernels(options_from(BenchKernelsOptions, args))
    if args.command == "bench":
        from hpc_moe.apps.bench_layer import BenchLayerOptions, run_bench_layer
        return run_bench_layer(options_from(BenchLayerOptions, args))
    if args.command == "selftest":
        from hpc_moe.apps.selftest import SelftestOptions, run_selftest
        return run_selftest(options_from(SelftestOptions, args))
    if args.command == "export":
        from hpc_moe.trace.export import run_export
        return run_export(args.trace, args.perfetto, args.steps)
    if args.command == "report":
        from hpc_moe.trace.report import run_report
        return run_report(args)
    if args.command == "plan":
        from hpc_moe.apps.plan import PlanOptions, run_plan
        return run_plan(options_from(PlanOptions, args))
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


def options_from(cls, args: argparse.Namespace, **given):
    """The frozen options dataclass ``cls`` from the parsed arguments of the same names, but for
    the fields ``given``."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in given}, **given)


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
