"""The generate job: rank 0 reads the requests, hands sequences to ranks, gathers and writes results.

Shape legend: B sequences, S prompt length, N new tokens, V vocabulary.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from hpc_moe.apps.common import on_root, open_weights, quiet_other_ranks, warn_shared_cores
from hpc_moe.apps.options import GenerateOptions
from hpc_moe.apps.selftest import run_checks
from hpc_moe.apps.workload import assign
from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.engine import Engine
from hpc_moe.errors import UsageError
from hpc_moe.model.generate import generate
from hpc_moe.outputs import check_output, write_npz


def load_input_ids(path: str) -> np.ndarray:
    """An .npy of integer token ids [batch, prompt_len] -> int64 array; clear errors otherwise."""
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"input ids file not found: {path}") from None
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{path}: not a readable .npy file ({e})") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"{path}: expected integer token ids of shape [batch, prompt_len], "
                         f"got {ids.dtype} {list(ids.shape)}")
    if ids.shape[1] < 1:
        raise UsageError(f"{path}: prompts must have at least one token")
    return ids.astype(np.int64)


def check_ids(ids: np.ndarray, cfg, max_new_tokens: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise UsageError(f"token ids must be in [0, {cfg.vocab_size}) (found {ids.min()}..{ids.max()})")
    if max_new_tokens < 0:
        raise UsageError("--max-new-tokens must be >= 0")
    if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise UsageError(f"prompt_len + max_new_tokens = {ids.shape[1] + max_new_tokens} exceeds "
                         f"max_position_embeddings = {cfg.max_position_embeddings}")


def scatter_sequences(ctx, ids_BS, owner_B, S: int):
    """Rank 0's prompts [B, S] -> this rank's prompts [b, S] (rows whose owner is this rank, in
    order). ids_BS is read on rank 0 only (None elsewhere); owner_B and S on every rank."""
    counts = np.bincount(owner_B, minlength=ctx.size) * S
    order = np.argsort(owner_B, kind="stable")
    send = np.ascontiguousarray(ids_BS[order]) if ctx.rank == 0 else None
    mine = np.empty(counts[ctx.rank], np.int64)
    ctx.world.Scatterv([send, (counts, None), MPI.INT64_T] if ctx.rank == 0 else None, [mine, MPI.INT64_T], root=0)
    return mine.reshape(-1, S)


def gather_sequences(ctx, local, owner_B, dtype, mpi_type):
    """Every rank's rows [b_r, ...] -> rank 0's [B, ...] in the original sequence order."""
    row = int(np.prod(local.shape[1:]))
    counts = np.bincount(owner_B, minlength=ctx.size) * row
    out = np.empty((len(owner_B),) + local.shape[1:], dtype) if ctx.rank == 0 else None
    ctx.world.Gatherv([np.ascontiguousarray(local, dtype), mpi_type],
                      [out, (counts, None), mpi_type] if ctx.rank == 0 else None, root=0)
    if ctx.rank != 0:
        return None
    result = np.empty_like(out)
    result[np.argsort(owner_B, kind="stable")] = out
    return result


def run_generate(o: GenerateOptions) -> int:
    """Prefill + greedy decode of rank 0's prompts, each rank serving its share of sequences and
    every MoE layer expert-parallel over the EP group; rank 0 writes the output."""
    ctx = ParallelContext.create(dp=o.layout.dp, expert_tp=o.layout.expert_tp,
                                 ranks_per_node=o.layout.ranks_per_node)
    quiet_other_ranks(ctx)
    cfg, weights = open_weights(o)

    def read():
        check_output(o.output, "--output")  # here, not after the whole generation
        ids = load_input_ids(o.input_ids)
        check_ids(ids, cfg, o.max_new_tokens)
        return ids

    ids = on_root(ctx, read, share=False)
    shape = ctx.world.bcast(ids.shape if ctx.rank == 0 else None, root=0)
    owner = assign(np.full(shape[0], shape[1]), ctx.size)  # the same on every rank
    mine = scatter_sequences(ctx, ids, owner, shape[1])
    backend = get_backend(o.layout.backend, o.layout.dtype, ctx.local_rank)
    warn_shared_cores(ctx, backend)
    engine = Engine(cfg, weights, backend, ctx, options=o.layout.engine_options())
    run_checks(ctx, backend, engine.transport, o.layout.allow_shared_gpu)
    gen = generate(engine.model, list(mine), o.max_new_tokens, forward=engine.forward)
    local_logits = np.stack(gen.prefill_logits) if len(mine) else np.zeros((0, shape[1], cfg.vocab_size), np.float32)
    logits = gather_sequences(ctx, local_logits, owner, np.float32, MPI.FLOAT)
    tokens = gather_sequences(ctx, gen.tokens, owner, np.int64, MPI.INT64_T)
    if ctx.rank == 0:
        write_npz(o.output, prefill_logits=logits, tokens=tokens)
        print(f"wrote {o.output}: prefill_logits {list(logits.shape)}, tokens {list(tokens.shape)}", flush=True)
    engine.close()
    return 0
