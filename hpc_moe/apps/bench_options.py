"""The options of ``hpc-moe bench dispatch|layer|kernels``, the one declaration of their flags
(hpc_moe.flags). MPI-free, unlike the benchmarks: the command line imports them while it parses."""
from __future__ import annotations

from dataclasses import dataclass

from hpc_moe.apps.options import (
    DTYPES,
    backend_flag,
    dispatch_flag,
    dtype_flag,
    payload_flag,
    ranks_per_node_flag,
    transport_flag,
)
from hpc_moe.ep.choices import ALGORITHMS
from hpc_moe.flags import flag, positive, positive_list


# What the MPI benchmarks share (a field is made once per class, so each class calls these).
def _deterministic():
    return flag(False, help="the pairs form of the combine")


def _iters(default=20):
    return flag(default, help="measured iterations")


def _json():
    return flag(None, metavar="OUT", help="write the figures as JSON (rank 0)")


def _strings(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


@dataclass(frozen=True)
class BenchDispatchOptions:
    tokens: int = flag(512, help="tokens per rank")
    hidden: int = flag(7168)
    topk: int = flag(8)
    experts: int = flag(256, help="routed experts (uniform random routing)")
    algorithm: str = flag("alltoallv", choices=ALGORITHMS, help="for the exchange row")
    payload: str = payload_flag()
    transport: str = transport_flag()
    deterministic: bool = _deterministic()
    backend: str = backend_flag()
    dtype: str = flag("bfloat16", choices=DTYPES)
    iters: int = _iters()
    warmup: int = flag(3)
    ranks_per_node: int | None = ranks_per_node_flag(help="simulate nodes of K consecutive ranks")
    no_overlap: bool = flag(False, help="skip the overlap measurement")
    no_imb: bool = flag(False, help="skip IMB-MPI1's Alltoallv of the same bytes (run where installed)")
    seed: int = flag(0)
    json: str | None = _json()


@dataclass(frozen=True)
class BenchLayerOptions:
    tokens: int = flag(128, help="tokens per rank")
    hidden: int = flag(7168)
    inter: int = flag(256, help="moe_intermediate_size")
    experts: int = flag(8, help="routed experts (as many as ranks: one a rank; more are colocated, fewer replicated)")
    topk: int = flag(2)
    dtype: str = flag("float32", choices=DTYPES)
    backend: str = backend_flag()
    transport: str = transport_flag()
    payload: str = payload_flag()
    deterministic: bool = _deterministic()
    ranks_per_node: int | None = ranks_per_node_flag(help="simulate nodes of K consecutive ranks")
    dispatch: str = dispatch_flag()
    micro_batches: int = flag(1, help="parts of the tokens in flight at once (overlap)")
    iters: int = _iters()
    warmup: int = flag(3)
    seed: int = flag(0)
    json: str | None = _json()


@dataclass(frozen=True)
class BenchKernelsOptions:
    config: str = flag("deepseek-v3", help="preset or config.json whose shapes to run")
    backend: str = backend_flag()
    dtype: str | None = dtype_flag(help="default: the backend's")
    tokens: tuple[int, ...] = flag((128, 512, 2048, 4096, 16384), type=positive_list, metavar="N,N,...",
                                   help="token counts of the expert, dense MLP, router, permute and combine")
    prefill: tuple[int, ...] = flag((1024, 4096), type=positive_list, metavar="S,S,...",
                                    help="prompt lengths of MLA prefill (one prompt)")
    decode: tuple[str, ...] = flag(("32x4096", "128x4096"), type=_strings, metavar="BxL,...",
                                   help="batches x contexts of MLA decode")
    peak_size: int = flag(8192, type=positive, help="N of the N x N x N peak GEMM")
    copy_mib: int = flag(1024, type=positive, help="MiB of the peak copy")
    iters: int = flag(10, type=positive)
    warmup: int = flag(2)
    torch: bool = flag(True, name="--no-torch", help="skip the PyTorch column")
    seed: int = flag(0)
    json: str | None = _json()
