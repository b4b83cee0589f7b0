"""Each step's input on one rank of ``hpc-moe run``: its sequences as a ragged batch, their tokens,
and a latent cache whose context is synthetic.

All of it is a function of the seed, the step's index in the workload stream and the sequence ->
rank assignment, never of the steps before: each sequence's tokens are drawn from (seed, index,
sequence); decodes attend over a synthetic context that
depends on the position alone, and what a step writes into the cache is put back after it. So a
resumed run (hpc_moe.apps.resume) rebuilds step n exactly, and a step's tokens are the same on
any number of ranks. Attention costs the same whatever the cached values are.

Shape legend: B sequences, T tokens, L positions, C latent width (kv_lora_rank + qk_rope_head_dim).
"""
from __future__ import annotations

import numpy as np

from hpc_moe.apps.workload import Step
from hpc_moe.model.kvcache import Batch, KVCache

_TOKENS, _CONTEXT = 1, 2  # the two random streams of a run's inputs, besides the workload's


class StepInputs:
    """One rank's inputs of every step. model: the rank's hpc_moe.model.transformer.Model (its
    backend and new_cache); seed: the run's."""

    def __init__(self, model, seed: int):
        self.model, self.seed = model, seed
        self.cache: KVCache | None = None
        self._context_LC = None  # the synthetic latent of each position, compute dtype, on the device

    def batch(self, step: Step, owner_B: np.ndarray, rank: int, index: int) -> tuple[Batch, KVCache]:
        """This rank's sequences of ``step`` (the ``index``-th of the workload stream) as one
        ragged batch, and a cache that holds them. owner_B int64 [B]: the rank of each of the
        step's sequences (prefills first, then decodes). Prefills start at position 0; decodes
        add one token after a context of the drawn length."""
        a = len(step.prefill_lens)
        mine = np.flatnonzero(owner_B == rank)  # ascending: this rank's prefills, then its decodes
        pre, dec = mine[mine < a], mine[mine >= a] - a
        new_B = np.concatenate([step.prefill_lens[pre], np.ones(len(dec), np.int64)])
        start_B = np.concatenate([np.zeros(len(pre), np.int64), step.decode_ctx[dec]])
        self._fit(len(new_B), int((start_B + new_B).max(initial=1)))
        # Each sequence's tokens from (seed, step, sequence): a rank draws only its own.
        vocab = self.model.cfg.vocab_size
        tokens_T = np.concatenate([np.random.default_rng([self.seed, _TOKENS, index, int(i)]).integers(0, vocab, int(n))
                                   for i, n in zip(mine, new_B)]) if len(mine) else np.zeros(0, np.int64)
        return Batch(tokens_T, np.arange(len(new_B), dtype=np.int64), start_B, new_B), self.cache

    def restore(self, batch: Batch) -> None:
        """Put back the synthetic context where ``batch`` wrote its latents (after its step)."""
        xp = self.model.backend.xp
        one = batch.new_B == 1  # decodes (and one-token prompts): one position each, in one go
        slots, pos = xp.asarray(batch.slots_B[one]), xp.asarray(batch.start_B[one])
        for d in self.cache.data:
            if len(pos):
                d[slots, pos] = self._context_LC[pos]
            for slot, s, n in zip(batch.slots_B[~one], batch.start_B[~one], batch.new_B[~one]):
                d[slot, s:s + n] = self._context_LC[s:s + n]

    def _fit(self, slots: int, length: int) -> None:
        """A cache of at least ``slots`` sequences of ``length`` positions, every slot holding the
        synthetic context (a longer one starts the same: the draws fill positions in order)."""
        c = self.cache
        if c is not None and c.data[0].shape[0] >= slots and c.max_len >= length:
            return
        slots, length = max(slots, c.data[0].shape[0] if c else 1), max(length, c.max_len if c else 1)
        self.cache = self.model.new_cache(slots, length)
        width = self.cache.data[0].shape[2]
        rng = np.random.default_rng([self.seed, _CONTEXT])
        self._context_LC = self.model.backend.asarray(rng.standard_normal((length, width), dtype=np.float32))
        for d in self.cache.data:
            d[...] = self._context_LC[None]
