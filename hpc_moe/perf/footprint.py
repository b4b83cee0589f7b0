"""What a deployment holds: parameters by kind (total and activated per token) and memory per GPU,
item by item, from the model config and the layout. Pure arithmetic on the shapes of
hpc_moe.weights.checkpoint.tensor_shapes: no weights are made.

Legend: E routed experts, K experts per token, S expert slots (ep / expert_tp), L layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpc_moe.config import ModelConfig
from hpc_moe.errors import UsageError
from hpc_moe.fp8 import FP8_BLOCK
from hpc_moe.weights.checkpoint import tensor_shapes
from hpc_moe.weights.names import KINDS, kind


def layer_parameters(cfg: ModelConfig, layers) -> dict[str, int]:
    """Parameters per kind of the given decoder layers, plus embeddings, head and final norm."""
    counts = dict.fromkeys(KINDS, 0)
    for name, shape in tensor_shapes(cfg, layers).items():
        counts[kind(name)] += int(np.prod(shape))
    return counts


def parameter_counts(cfg: ModelConfig, layers: int | None = None) -> dict[str, dict[str, float]]:
    """Per kind: ``total`` parameters and ``activated`` per token (a token uses K of the E routed
    experts, all of the rest), for the first ``layers`` layers (default all; the MTP module is not
    part of the model); "all" sums the kinds."""
    counts = layer_parameters(cfg, range(layers or cfg.num_hidden_layers))
    share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    out = {k: {"total": float(v), "activated": float(v) * (share if k == "routed_experts" else 1.0)}
           for k, v in counts.items()}
    out["all"] = {key: sum(v[key] for v in out.values()) for key in ("total", "activated")}
    return out


@dataclass(frozen=True)
class Layout:
    """ep ranks per model replica, dp replicas, expert_tp ranks per expert, ranks per node."""

    ep: int
    dp: int = 1
    expert_tp: int = 1
    ranks_per_node: int = 8


@dataclass(frozen=True)
class GpuLoad:
    """Per GPU: ``sequences`` it serves of ``context`` positions each (its latent KV cache), and
    ``tokens`` going through a layer at once (its activations and all-to-all buffers)."""

    sequences: int
    context: int
    tokens: int


def memory_per_gpu(cfg: ModelConfig, layout: Layout, load: GpuLoad, *, expert_dtype: str = "auto",
                   dense_bytes: int = 2, act_bytes: int = 2, layers: int | None = None) -> dict[str, float]:
    """Bytes per GPU by item: replicated weights (everything but the routed experts, in
    ``dense_bytes`` each), routed experts (this GPU's share of the slots: FP8 e4m3 with a float32
    scale per 128 x 128 block, BF16, or "dense": as the replicated weights, which is how a run
    holds them), the latent KV cache, dispatch/combine buffers (a row per token and destination
    rank, both directions, send and receive) and activations (a few [tokens, hidden] and [tokens,
    intermediate] buffers), these three in ``act_bytes`` an element; "total" sums them."""
    if layout.ep % layout.expert_tp:
        raise UsageError(f"ep {layout.ep} is not divisible by expert_tp {layout.expert_tp}")
    n = layers or cfg.num_hidden_layers
    p = parameter_counts(cfg, n)
    fp8 = expert_dtype == "fp8" or (expert_dtype == "auto" and cfg.quantization_config is not None)
    expert_bytes = 1 + 4 / (FP8_BLOCK * FP8_BLOCK) if fp8 else dense_bytes if expert_dtype == "dense" else 2
    slots = layout.ep // layout.expert_tp
    experts_per_slot = -(-cfg.n_routed_experts // slots) if cfg.n_routed_experts else 0
    per_expert = p["routed_experts"]["total"] / max(cfg.n_routed_experts, 1)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(n))
    H, K = cfg.hidden_size, cfg.num_experts_per_tok
    items = {
        "replicated_weights": (p["all"]["total"] - p["routed_experts"]["total"]) * dense_bytes,
        "routed_experts": experts_per_slot * per_expert / layout.expert_tp * expert_bytes,
        "kv_cache": load.sequences * load.context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * n * act_bytes,
        "dispatch_buffers": (load.tokens * min(K, layout.ep) * H * act_bytes * 4) if moe_layers else 0.0,
        "activations": load.tokens * (8 * H + 2 * max(cfg.intermediate_size, K * cfg.moe_intermediate_size)) * act_bytes,
    }
    items["total"] = sum(items.values())
    return items
