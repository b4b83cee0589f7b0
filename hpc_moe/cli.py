"""The ``hpc-moe`` command line: one subcommand per job.

Bad arguments and bad inputs end with one line on stderr and exit status 2; a failure on one MPI
rank aborts the whole job (MPI_Abort) instead of leaving the other ranks waiting forever.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .backend import BackendError
from .config import ConfigError


class UsageError(Exception):
    """Bad input found after argument parsing (a file that is not what it should be, ...)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    g.add_argument("--expert-tp", type=_positive, default=1,
                   help="ranks per expert: each expert's intermediate dimension split over T ranks")
    g.add_argument("--algorithm", default="alltoallv", choices=["alltoallv", "pipelined"],
                   help="one Ialltoallv per direction, or per-peer messages with experts run as tokens land")
    g.add_argument("--transport", default="auto", choices=["auto", "host", "cuda-aware", "nccl"])
    g.add_argument("--payload", default="native", choices=["native", "fp8"],
                   help="dispatch payload: the compute dtype, or FP8 e4m3 with a scale per 128 values")
    g.add_argument("--micro-batches", type=_positive, default=1,
                   help="split each step's sequences; > 1 overlaps communication with compute")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hpc-moe", description="Large expert-parallel inference of DeepSeek-V3-class "
                     "MoE models over MPI: run it under mpiexec/srun with one rank per GPU.")
    parser.add_argument("--version", action="version", version=f"hpc-moe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    _add_generate(sub)
    _add_checkpoint(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .comm import ParallelError
    from .placement import PlacementError
    from .workload import WorkloadError
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="hpc-moe: %(message)s", stream=sys.stderr)
    known = (ConfigError, CheckpointError, BackendError, UsageError, ParallelError, PlacementError,
             WorkloadError)
    try:
        return _dispatch(args)
    except known as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _dispatch(args) -> int:
    if args.command == "generate":
        from .pipeline import run_generate
        return run_generate(args)
    if args.command == "checkpoint":
        return _checkpoint(args)
    raise AssertionError(args.command)


def _checkpoint(args) -> int:
    from .checkpoint import Checkpoint, save_checkpoint
    from .synthetic import SyntheticWeights
    from .config import load_config
    if args.action == "make":
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


def _fail(message: str, code: int) -> int:
    """One line on stderr; under MPI with several ranks, abort them all."""
    try:
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        if world.Get_size() > 1:
            sys.stderr.write(f"hpc-moe [rank {world.Get_rank()}]: {message}\n")
            sys.stderr.flush()
            world.Abort(code)
    except ImportError:
        pass
    sys.stderr.write(f"hpc-moe: {message}\n")
    return code
