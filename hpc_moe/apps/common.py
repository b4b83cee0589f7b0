"""Helpers the jobs share: weights from the options, rank 0's checks shared with every rank."""
from __future__ import annotations

import logging
import os

import numpy as np

from hpc_moe.apps.options import GenerateOptions, RunOptions
from hpc_moe.config import load_config
from hpc_moe.errors import InputError, UsageError
from hpc_moe.links import Links
from hpc_moe.perf.hardware import Hardware, load_hardware
from hpc_moe.trace.reader import read_trace


def quiet_other_ranks(ctx) -> None:
    """Ranks but 0 speak only of trouble of their own: warnings, but not the config's, which every
    rank would repeat."""
    if ctx.rank != 0:
        logging.getLogger("hpc_moe").setLevel(logging.WARNING)
        logging.getLogger("hpc_moe.config").setLevel(logging.ERROR)


def warn_shared_cores(ctx, backend) -> None:
    """On the CPU, one warning (rank 0) where the ranks of a machine run more BLAS threads in all
    than it has cores: idle BLAS threads spin against the other ranks' work (13.6 s against 0.5 s
    for 2 steps at 8 ranks on 2 cores). One thread per rank is all the user can do: more ranks than
    cores are then just oversubscribed, and say nothing."""
    if backend.is_gpu or ctx.rank != 0:
        return
    ranks = ctx.machines.count(ctx.machines[0])
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or cores)
    if ranks > 1 and threads > 1 and ranks * threads > cores:
        logging.getLogger("hpc_moe").warning(
            "%d ranks on this machine's %d cores, each with up to %d BLAS threads: they will spin against one "
            "another (export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1)", ranks, cores, threads)


def open_weights(o: RunOptions | GenerateOptions):
    """(config, weight source) from --checkpoint or --config/--seed."""
    if o.checkpoint:
        from hpc_moe.weights.checkpoint import Checkpoint
        ckpt = Checkpoint.open(o.checkpoint)
        return ckpt.config, ckpt
    from hpc_moe.weights.synthetic import SyntheticWeights
    cfg = load_config(o.config)
    return cfg, SyntheticWeights(cfg, o.seed)


def on_root(ctx, fn, share: bool = True):
    """fn() on rank 0; an input error raised there is raised on every rank, so that none waits
    forever in a collective that rank 0 never reaches. share: broadcast the result (small Python
    objects only) to every rank; otherwise the other ranks get None."""
    return root_only(ctx.world, fn, share)


def root_only(comm, fn, share: bool = True):
    """on_root on a communicator (before the parallel context exists)."""
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except (InputError, OSError) as e:
            error = f"{e}"
    result_and_error = (result if share else None, error)
    shared, error = comm.bcast(result_and_error, root=0)
    if error is not None:
        raise UsageError(error)
    return shared if share else result


def hardware_of(name_or_path: str, links_from: str | None) -> Hardware:
    """--hardware, with the links an earlier run measured at its start (run --probe-links) when
    --links-from names its trace."""
    hw = load_hardware(name_or_path)
    if not links_from:
        return hw
    t = read_trace(links_from)
    if not t.meta.get("links"):
        raise UsageError(f"--links-from {links_from}: the trace has no measured links (it ran on one node, or "
                         "with --probe-links off)")
    return hw.with_links(Links.from_dict(t.meta["links"]), os.path.basename(links_from))


def loads_from_trace(path: str, layers: int, cfg) -> np.ndarray:
    """Mean tokens per expert per MoE layer [M, E] measured by an earlier run's trace."""
    t = read_trace(path)
    want = [i for i in range(layers) if cfg.is_moe_layer(i)]
    if t.num_steps == 0 or list(t.moe_layers) != want or t.num_experts != cfg.n_routed_experts:
        raise UsageError(f"--loads-from {path}: needs steps of the same MoE layers {want} and "
                         f"{cfg.n_routed_experts} experts")
    return t.expert_tokens.mean(axis=0)
