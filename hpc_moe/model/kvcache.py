"""The latent KV cache of MLA and the description of a ragged batch.

MLA caches, per token and layer, only the normalised KV latent and the roped shared key:
``kv_lora_rank + qk_rope_head_dim`` numbers (576 for DeepSeek-V3, against 2 x 128 x 192 = 49152
for plain multi-head attention).

Shape legend: B sequences (cache slots), L max positions, C kv_lora_rank, Dr qk_rope_head_dim, T tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_moe.backend import Backend
from hpc_moe.config import ModelConfig
from hpc_moe.model.layers import array_module


@dataclass(frozen=True)
class Batch:
    """A ragged batch: sequence b contributes ``new[b]`` tokens at positions start[b] .. start[b]+new[b]-1.

    token_ids_T: int64 [T] host array, the sequences' new tokens concatenated in order;
    slots_B: int64 [B] cache slot of each sequence; start_B, new_B: int64 [B].
    """

    token_ids_T: np.ndarray
    slots_B: np.ndarray
    start_B: np.ndarray
    new_B: np.ndarray

    @classmethod
    def prefill(cls, prompts: list, slots=None) -> "Batch":
        """Prompts (int arrays of any lengths) from position 0, in slots 0..B-1 unless given."""
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts]) if prompts else np.zeros(0, np.int64)
        slots = np.arange(len(prompts), dtype=np.int64) if slots is None else np.asarray(slots, np.int64)
        return cls(ids, slots, np.zeros(len(prompts), np.int64), lens)

    @classmethod
    def decode(cls, token_ids_B, slots_B, start_B) -> "Batch":
        """One new token per sequence, at position start_B[b] (= tokens already cached)."""
        b = len(slots_B)
        return cls(np.asarray(token_ids_B, np.int64).reshape(b), np.asarray(slots_B, np.int64),
                   np.asarray(start_B, np.int64), np.ones(b, np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self.new_B.sum())

    @property
    def offsets(self) -> np.ndarray:
        """int64 [B+1]: sequence b's tokens are rows offsets[b]:offsets[b+1] of the packed batch."""
        return np.concatenate([[0], np.cumsum(self.new_B)]).astype(np.int64)

    @property
    def positions_T(self) -> np.ndarray:
        return np.concatenate([np.arange(s, s + n) for s, n in zip(self.start_B, self.new_B)]).astype(np.int64) \
            if len(self.new_B) else np.zeros(0, np.int64)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds one token: the weight-absorbed attention applies."""
        return len(self.new_B) > 0 and bool(np.all(self.new_B == 1))

    def split(self, parts: int) -> list["Batch"]:
        """Exactly ``parts`` batches of whole sequences with similar token counts (some may be empty:
        every rank must run the same number of micro-batches through the MoE exchanges)."""
        cum = np.cumsum(self.new_B)
        total = int(cum[-1]) if len(cum) else 0
        cuts = np.searchsorted(cum, total * np.arange(1, parts) / parts, side="left") + 1 if len(cum) \
            else np.zeros(parts - 1, np.int64)
        bounds = np.concatenate([[0], np.minimum(cuts, len(self.new_B)), [len(self.new_B)]]).astype(np.int64)
        bounds = np.maximum.accumulate(bounds)
        off = self.offsets
        return [Batch(self.token_ids_T[off[a]:off[b]], self.slots_B[a:b], self.start_B[a:b], self.new_B[a:b])
                for a, b in zip(bounds[:-1], bounds[1:])]


class KVCache:
    """Per layer a [B, L, C + Dr] array in the compute dtype; slot b holds sequence b's latents."""

    def __init__(self, cfg: ModelConfig, layers: int, slots: int, max_len: int, backend: Backend):
        self.max_len = max_len
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.data = [backend.xp.zeros((slots, max_len, width), dtype=backend.dtype) for _ in range(layers)]

    def write(self, layer: int, batch: Batch, latent_T):
        """Store the batch's new latents [T, C + Dr] at their positions."""
        end = batch.start_B + batch.new_B
        if len(end) and int(end.max()) > self.max_len:
            raise ValueError(f"sequence of {int(end.max())} tokens exceeds the cache's {self.max_len} positions")
        d = self.data[layer]
        if batch.is_decode:
            xp = array_module(d)
            d[xp.asarray(batch.slots_B), xp.asarray(batch.start_B)] = latent_T
            return
        off = batch.offsets
        for b, (slot, s, n) in enumerate(zip(batch.slots_B, batch.start_B, batch.new_B)):
            d[slot, s:s + n] = latent_T[off[b]:off[b + 1]]
