"""Prefill then greedy decode with the latent KV cache, in one process or on one rank's sequences.

Shape legend: B sequences, S prompt length, N new tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_moe.model.kvcache import Batch
from hpc_moe.model.transformer import Model


@dataclass(frozen=True)
class Generation:
    """prefill_logits: float32 [S_b, V] per sequence; tokens: int64 [B, N] greedy continuations."""

    prefill_logits: list
    tokens: np.ndarray


def generate(model: Model, prompts: list, max_new_tokens: int, forward=None) -> Generation:
    """Greedy generation for prompts (int64 arrays of any lengths, possibly none on this rank).

    Every call runs exactly 1 + max(0, max_new_tokens - 1) forward passes whatever the prompts, so
    that ranks of the engine stay in lockstep in the MoE exchanges. forward(batch, cache) -> host
    float32 logits [T, V] replaces the model's own (the engine's overlapped schedule).
    """
    if forward is None:
        def forward(batch, cache):
            return model.backend.to_numpy(model.forward(batch, cache))
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    if len(prompts) and lens.min() < 1:
        raise ValueError("every prompt needs at least one token")
    max_len = int(lens.max(initial=0)) + max_new_tokens
    cache = model.new_cache(len(prompts), max(max_len, 1))
    batch = Batch.prefill(prompts)
    logits = forward(batch, cache)
    off = batch.offsets
    prefill_logits = [logits[off[b]:off[b + 1]] for b in range(len(prompts))]
    tokens = np.zeros((len(prompts), max_new_tokens), dtype=np.int64)
    if max_new_tokens == 0:
        return Generation(prefill_logits, tokens)
    tokens[:, 0] = [pl[-1].argmax() for pl in prefill_logits]
    slots = np.arange(len(prompts), dtype=np.int64)
    for step in range(1, max_new_tokens):
        batch = Batch.decode(tokens[:, step - 1], slots, lens + step - 1)
        step_logits = forward(batch, cache)
        tokens[:, step] = step_logits.argmax(axis=-1)
    return Generation(prefill_logits, tokens)
