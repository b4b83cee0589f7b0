"""The Hugging Face tensor names of a DeepSeek-V3 checkpoint, built and read in one place.

The model loading its weights, the executor loading the experts it owns, the checkpoint's list of
keys and shapes, the synthetic weights and the parameter counts all name tensors through these;
the names are those of the published ``model.safetensors.index.json``.
"""
from __future__ import annotations

import re

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# The 2-D weights a published FP8 checkpoint stores as e4m3 + ``weight_scale_inv``.
_QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
KINDS = ("attention", "dense_mlp", "routed_experts", "shared_experts", "router", "embeddings_and_head", "norms")


def layer(L: int) -> str:
    """Decoder layer L's prefix (names below it follow a dot)."""
    return f"model.layers.{L}"


def attention(L: int) -> str:
    return f"{layer(L)}.self_attn"


def mlp(L: int) -> str:
    """The dense MLP of a dense layer; in an MoE layer, the prefix of its router and experts."""
    return f"{layer(L)}.mlp"


def expert(L: int, e: int) -> str:
    """Routed expert e of MoE layer L (its gate_proj, up_proj, down_proj follow)."""
    return f"{mlp(L)}.experts.{e}"


def shared_experts(L: int) -> str:
    return f"{mlp(L)}.shared_experts"


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None (embedding, final norm, head)."""
    m = _LAYER.match(name)
    return int(m[1]) if m else None


def is_quantized(name: str) -> bool:
    """Whether a published FP8 checkpoint stores the tensor as e4m3 + ``_scale_inv``: the 2-D
    weights of attention projections, dense MLPs, routed and shared experts. Embedding, lm_head,
    norms, the router gate and its bias stay in high precision."""
    return _QUANTIZED.match(name) is not None


def kind(name: str) -> str:
    """Which of KINDS a tensor's parameters count as."""
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense_mlp"
    if name in (EMBED, LM_HEAD):
        return "embeddings_and_head"
    if name.endswith("layernorm.weight") or name == FINAL_NORM:
        return "norms"
    return "attention"
