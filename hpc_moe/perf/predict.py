"""Predicted step time of a deployment: each phase of a layer on a roofline (the larger of its
FLOPs at the compute rate reached and its HBM bytes at the bandwidth reached), dispatch and combine
on an alpha-beta model of the intra- and inter-node links, and the overlap the two-phase step allows.

Per GPU and per step, with T tokens through each layer:
  prefill  T prompt tokens (prompts of ``context`` positions; attention sees context / 2 on average,
           computed naively as the prefill kernels do);
  decode   one token for each of ``sequences`` sequences (T = sequences), each attending ``context``
           latent positions in the absorbed MLA form the decode kernels use.
Routing is taken as uniform over the experts; ``imbalance`` (the hottest GPU's rows over the mean)
scales the expert GEMMs, since the step waits for the hottest GPU. Dispatch and combine move BF16
rows. The links run concurrently (NVLink and the NIC are separate engines), so a phase takes the
longer of the two. The MoE layer's exchange is posted before its shared expert, which runs while the
payload flies; with m micro-batches the other micro-batches' attention also hides it.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpc_moe.config import ModelConfig
from hpc_moe.perf.footprint import Layout, layer_parameters
from hpc_moe.perf.hardware import Hardware

ROW_BYTES = 2  # BF16 activations, on the wire and in HBM


@dataclass(frozen=True)
class Phase:
    name: str
    flops: float
    hbm_bytes: float
    seconds: float
    bound: str  # "compute" | "memory" | "intra-node link" | "inter-node link"

    def to_dict(self) -> dict:
        return {"flops": self.flops, "hbm_bytes": self.hbm_bytes, "ms": self.seconds * 1e3, "bound": self.bound}


def _roofline(hw: Hardware, name: str, flops: float, nbytes: float, dtype: str = "bf16") -> Phase:
    c, m = hw.compute_s(flops, dtype), hw.memory_s(nbytes)
    return Phase(name, flops, nbytes, max(c, m), "compute" if c >= m else "memory")


def _per_layer(cfg: ModelConfig, layer: int) -> dict[str, int]:
    base = layer_parameters(cfg, [])
    return {k: v - base[k] for k, v in layer_parameters(cfg, [layer]).items()}


def _nodes_reached(cfg: ModelConfig, nodes: int) -> float:
    """Expected distinct nodes holding a token's K experts, under group-limited routing when the
    groups are node-aligned (one node holds whole groups, or a group spans whole nodes)."""
    reachable = nodes if nodes < cfg.n_group else max(1, cfg.topk_group * nodes // cfg.n_group)
    return reachable * (1 - (1 - 1 / reachable) ** cfg.num_experts_per_tok)


def exchange_phase(cfg: ModelConfig, layout: Layout, hw: Hardware, tokens: float, dispatch: str) -> dict:
    """One direction (dispatch or combine) of a MoE layer's all-to-all, per GPU: bytes and messages
    inside and across nodes, and the alpha-beta time of each link."""
    ep, rpn, K, row = layout.ep, min(layout.ranks_per_node, layout.ep), cfg.num_experts_per_tok, cfg.hidden_size * ROW_BYTES
    nodes = -(-ep // rpn)
    pairs = tokens * K
    if dispatch == "hierarchical" and nodes > 1:
        # one copy per remote node reached, forwarded inside that node unless it lands on its owner
        remote_nodes = _nodes_reached(cfg, nodes) * (nodes - 1) / nodes
        inter_b = tokens * remote_nodes * row
        intra_b = pairs * ((rpn - 1) / ep + (ep - rpn) / ep * (rpn - 1) / rpn) * row
        inter_m, intra_m = nodes - 1, 2 * (rpn - 1)
    else:
        inter_b, intra_b = pairs * (ep - rpn) / ep * row, pairs * (rpn - 1) / ep * row
        inter_m, intra_m = ep - rpn, rpn - 1
    intra_s, inter_s = hw.intra_node.seconds(intra_b, intra_m), hw.inter_node.seconds(inter_b, inter_m)
    return {"intra_node_bytes": intra_b, "inter_node_bytes": inter_b,
            "intra_node_ms": intra_s * 1e3, "inter_node_ms": inter_s * 1e3, "ms": max(intra_s, inter_s) * 1e3,
            "bound": "inter-node link" if inter_s >= intra_s else "intra-node link"}


def predict_step(cfg: ModelConfig, layout: Layout, hw: Hardware, *, mode: str, tokens: int, sequences: int,
                 context: int, expert_fp8: bool, dispatch: str = "flat", micro_batches: int = 1,
                 imbalance: float = 1.0, layers: int | None = None) -> dict:
    """Per-phase predictions of one layer of each kind and of the whole step, per GPU (times in ms)."""
    n = layers or cfg.num_hidden_layers
    T = sequences if mode == "decode" else tokens
    H, heads, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts_per_tok
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
    kinds = {"dense": [i for i in range(n) if not cfg.is_moe_layer(i)], "moe": moe_layers}
    out: dict = {"mode": mode, "tokens_per_gpu": T, "layers": {}}
    step_s = 0.0
    for kind, idx in kinds.items():
        if not idx:
            continue
        p = _per_layer(cfg, idx[0])
        if mode == "decode":  # absorbed MLA: scores and values against the latent cache
            score = 2 * heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * T * context
            kv = sequences * context * latent * ROW_BYTES
        else:
            score = 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim) * T * context / 2
            kv = T * latent * ROW_BYTES
        act = T * H * ROW_BYTES
        phases = [_roofline(hw, "attention", 2 * (p["attention"] + p["norms"]) * T + score,
                            (p["attention"] + p["norms"]) * 2 + kv + 4 * act)]
        comm = []
        if kind == "dense":
            phases.append(_roofline(hw, "dense_mlp", 2 * p["dense_mlp"] * T, p["dense_mlp"] * 2 + 2 * act))
        else:
            slots = layout.ep // layout.expert_tp
            per_slot = -(-cfg.n_routed_experts // slots)
            rows = T * K * layout.ep / cfg.n_routed_experts * per_slot * imbalance
            expert = 3 * H * cfg.moe_intermediate_size / layout.expert_tp
            phases.append(_roofline(hw, "gate", 2 * p["router"] * T, p["router"] * 2 + act))
            phases.append(_roofline(hw, "shared_experts", 2 * p["shared_experts"] * T,
                                    p["shared_experts"] * 2 + 2 * act))
            phases.append(_roofline(hw, "routed_experts", 2 * expert * rows,
                                    per_slot * expert * (1 if expert_fp8 else 2) + 2 * rows * H * ROW_BYTES,
                                    "fp8" if expert_fp8 and "fp8" in hw.flops_per_s else "bf16"))
            one = exchange_phase(cfg, layout, hw, T, dispatch)
            comm = [dict(one, name=d) for d in ("dispatch", "combine")]  # combine retraces dispatch's rows
        t = {ph.name: ph.seconds for ph in phases}
        comm_s = sum(c["ms"] for c in comm) / 1e3
        hidden_by = t.get("shared_experts", 0.0) + t["attention"] * (micro_batches - 1) / micro_batches
        exposed = max(0.0, comm_s - hidden_by)
        layer_s = sum(t.values()) + exposed
        out["layers"][kind] = {"count": len(idx), "ms": layer_s * 1e3, "exposed_comm_ms": exposed * 1e3,
                               "phases": {ph.name: ph.to_dict() for ph in phases},
                               "exchange": {c["name"]: c for c in comm}}
        step_s += len(idx) * layer_s
    last = sequences if mode == "decode" else T / context  # the positions whose logits the step needs
    head = _roofline(hw, "head", 2 * cfg.vocab_size * H * last, cfg.vocab_size * H * 2 + last * H * 2)
    step_s += head.seconds
    out["head"] = head.to_dict()
    out["step_ms"] = step_s * 1e3
    out["tokens_per_s_per_gpu"] = T / step_s
    out["bottleneck"] = _bottleneck(out)
    return out


def _bottleneck(pred: dict) -> str:
    """The term with the most time in the step: a phase and what bounds it, or exposed communication."""
    terms: dict[str, float] = {}
    for L in pred["layers"].values():
        for name, ph in L["phases"].items():
            key = f"{name} ({ph['bound']})"
            terms[key] = terms.get(key, 0.0) + L["count"] * ph["ms"]
        if L["exchange"]:
            terms[f"exposed dispatch/combine ({L['exchange']['dispatch']['bound']})"] = L["count"] * L["exposed_comm_ms"]
    return max(terms, key=terms.get)
