"""Helpers the jobs share: weights from the options, rank 0's checks shared with every rank, and
outputs written atomically."""
from __future__ import annotations

import json
import os

import numpy as np

from hpc_moe.apps.options import GenerateOptions, RunOptions
from hpc_moe.config import load_config
from hpc_moe.errors import InputError, UsageError
from hpc_moe.trace.reader import read_trace


def open_weights(o: RunOptions | GenerateOptions):
    """(config, weight source) from --checkpoint or --config/--seed."""
    if o.checkpoint:
        from hpc_moe.weights.checkpoint import Checkpoint
        ckpt = Checkpoint.open(o.checkpoint)
        return ckpt.config, ckpt
    from hpc_moe.weights.synthetic import SyntheticWeights
    cfg = load_config(o.config)
    return cfg, SyntheticWeights(cfg, o.seed)


def write_npz(path: str, **arrays) -> None:
    """Write atomically: a crash never leaves a half-written output."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (a file that exists is complete)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def on_root(ctx, fn, share: bool = True):
    """fn() on rank 0; an input error raised there is raised on every rank, so that none waits
    forever in a collective that rank 0 never reaches. share: broadcast the result (small Python
    objects only) to every rank; otherwise the other ranks get None."""
    result, error = None, None
    if ctx.rank == 0:
        try:
            result = fn()
        except (InputError, OSError) as e:
            error = f"{e}"
    result_and_error = (result if share else None, error)
    shared, error = ctx.world.bcast(result_and_error, root=0)
    if error is not None:
        raise UsageError(error)
    return shared if share else result


def loads_from_trace(path: str, layers: int, cfg) -> np.ndarray:
    """Mean tokens per expert per MoE layer [M, E] measured by an earlier run's trace."""
    t = read_trace(path)
    want = [i for i in range(layers) if cfg.is_moe_layer(i)]
    if t.num_steps == 0 or list(t.moe_layers) != want or t.num_experts != cfg.n_routed_experts:
        raise UsageError(f"--loads-from {path}: needs steps of the same MoE layers {want} and "
                         f"{cfg.n_routed_experts} experts")
    return t.expert_tokens.mean(axis=0)
