"""The generate job: rank 0 reads the requests, hands sequences to ranks, gathers and writes results.

Shape legend: B sequences, S prompt length, N new tokens, V vocabulary.
"""
from __future__ import annotations

import os

import numpy as np

from .backend import get_backend
from .config import load_config
from .generate import generate
from .model import Model


def load_input_ids(path: str) -> np.ndarray:
    """An .npy of integer token ids [batch, prompt_len] -> int64 array; clear errors otherwise."""
    from .cli import UsageError
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"input ids file not found: {path}") from None
    except (ValueError, OSError) as e:
        raise UsageError(f"{path}: not a readable .npy file ({e})") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageError(f"{path}: expected integer token ids of shape [batch, prompt_len], "
                         f"got {ids.dtype} {list(ids.shape)}")
    if ids.shape[1] < 1:
        raise UsageError(f"{path}: prompts must have at least one token")
    return ids.astype(np.int64)


def open_weights(args):
    """(config, weight source) from --checkpoint or --config/--seed."""
    if getattr(args, "checkpoint", None):
        from .checkpoint import Checkpoint
        ckpt = Checkpoint.open(args.checkpoint)
        return ckpt.config, ckpt
    from .synthetic import SyntheticWeights
    cfg = load_config(args.config)
    return cfg, SyntheticWeights(cfg, args.seed)


def check_ids(ids: np.ndarray, cfg, max_new_tokens: int) -> None:
    from .cli import UsageError
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise UsageError(f"token ids must be in [0, {cfg.vocab_size}) (found {ids.min()}..{ids.max()})")
    if max_new_tokens < 0:
        raise UsageError("--max-new-tokens must be >= 0")
    if ids.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        raise UsageError(f"prompt_len + max_new_tokens = {ids.shape[1] + max_new_tokens} exceeds "
                         f"max_position_embeddings = {cfg.max_position_embeddings}")


def write_npz(path: str, **arrays) -> None:
    """Write atomically: a crash never leaves a half-written output."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def run_generate(args) -> int:
    cfg, weights = open_weights(args)
    ids = load_input_ids(args.input_ids)
    check_ids(ids, cfg, args.max_new_tokens)
    backend = get_backend(args.backend, args.dtype)
    model = Model(cfg, weights, backend)
    gen = generate(model, list(ids), args.max_new_tokens)
    logits = np.stack(gen.prefill_logits) if len(ids) else np.zeros((0, ids.shape[1], cfg.vocab_size), np.float32)
    write_npz(args.output, prefill_logits=logits, tokens=gen.tokens)
    return 0
