"""Synthetic weights: a deterministic random model of any size, one tensor at a time.

``SyntheticWeights`` has the reading interface of :class:`hpc_moe.checkpoint.Checkpoint` (``get``,
``keys``, ``shape``, ``dtype``, ``config``), so every consumer runs unchanged on a model nobody
trained, including the 671B ``deepseek-v3`` preset: a tensor is generated when asked for, from a
generator seeded by (seed, crc32(name)), so a rank that owns expert 7 generates expert 7 only and
every rank agrees on it without communicating.

Scales (chosen so that a forward pass stays O(1) and routing is decisive, not so that it is "good"):
- linear weights (attention, MLP, experts, lm_head): N(0, 1/fan_in). Each projection then roughly
  keeps the RMS of its input, so activations neither explode nor vanish over 61 layers.
- RMSNorm weights: 1 + 0.1 N(0, 1): near identity, but not exactly, so a missing norm shows.
- embeddings: N(0, 1), the RMS a normed hidden state has.
- router gate: N(0, 1) * 2/sqrt(H). The gate sees a normed input of RMS ~1, so router logits have
  std ~2 and sigmoid scores spread over ~(0.1, 0.9): top-k picks are well separated, not near-ties
  that float rounding could flip between the NumPy and CuPy paths.
- e_score_correction_bias: U(-0.05, 0.05): non-zero so that the bias path is exercised, small next
  to the score spread so it shifts selection only at the margin (as a trained bias does).
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from hpc_moe.config import ModelConfig
from hpc_moe.errors import UsageError
from hpc_moe.weights import names
from hpc_moe.weights.checkpoint import CheckpointError, tensor_shapes


class SyntheticWeights:
    """Deterministic random float32 weights for ``cfg``; same interface as Checkpoint's reader.

    keys(): the names of :func:`tensor_shapes` (no ``_scale_inv``: nothing is quantised here).
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        if not isinstance(seed, int) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer (got {seed!r})")
        self.config = cfg
        self.seed = seed
        self._shapes = tensor_shapes(cfg)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return self._shapes[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found in synthetic weights "
                                  f"(no such key for this config)") from None

    def dtype(self, name: str) -> np.dtype:
        self.shape(name)
        return np.dtype(np.float32)

    def get(self, name: str) -> np.ndarray:
        """float32, C-contiguous, shape ``shape(name)``; identical on every call and every rank."""
        shape = self.shape(name)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        if name.endswith("e_score_correction_bias"):
            return rng.uniform(-0.05, 0.05, size=shape).astype(np.float32)
        w = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("norm.weight"):  # input/post_attention/q_a/kv_a layernorms, model.norm
            w *= np.float32(0.1)
            w += np.float32(1.0)
        elif name == names.EMBED:
            pass
        elif name.endswith("mlp.gate.weight"):
            w *= np.float32(2.0 / math.sqrt(self.config.hidden_size))
        else:  # every other tensor is a (out, in) linear weight
            w *= np.float32(1.0 / math.sqrt(shape[1]))
        return w
