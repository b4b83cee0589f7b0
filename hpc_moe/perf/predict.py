"""Predicted step time of a deployment: each phase of a layer on a roofline (a fixed cost per call,
plus the larger of its FLOPs at the compute rate reached and its HBM bytes at the bandwidth
reached), dispatch and combine on an alpha-beta model of the intra- and inter-node links, and the
overlap the two-phase step allows.

Per GPU and per step, with T tokens through each layer:
  prefill  T prompt tokens (prompts of ``context`` positions; a fused kernel attends context / 2
           positions on average, hpc_moe's materialised one computes all and masks half);
  decode   one token for each of ``sequences`` sequences (T = sequences), each attending ``context``
           latent positions in the absorbed MLA form the decode kernels use.
Routing is group-limited (a token picks ``topk_group`` groups, then K experts among theirs) and
otherwise uniform; ``imbalance`` (the hottest GPU's expert rows over the mean) scales the expert
GEMMs, since the step waits for the hottest GPU. A token sends one row to each rank holding one of
its experts (dispatch: the payload dtype, its local expert ids and weights, FP8 scales; combine: the
weighted sum back in the compute dtype), packed and summed in local memory passes. The links run
concurrently (NVLink and the NIC are separate engines), so a phase takes the longer of the two
(the sum where one engine moves both: the hardware file's ``links_concurrent``). The
MoE layer's exchange is posted before its shared expert, which runs while the payload flies; with m
micro-batches the other micro-batches' attention also hides it, and every phase is m calls.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from hpc_moe.config import ModelConfig
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.plan import meta_layout
from hpc_moe.fp8 import FP8_BLOCK
from hpc_moe.perf.footprint import Layout, layer_parameters
from hpc_moe.perf.hardware import Hardware

# Passes over the float32 scores [heads, T, context] of hpc_moe's materialised attention
# (model/layers.py MLA.attend_plain / attend_absorbed): each array operation reads and writes them
# (two GEMM outputs and their sum, scale, mask, softmax's max, exp, sum and divide, the dtype casts,
# the value GEMM's read); decode also gathers the cache rows and reads the latents twice.
SCORE_PASSES_PREFILL = 20
SCORE_PASSES_DECODE = 16
CACHE_PASSES = 4


@dataclass(frozen=True)
class Traffic:
    """A placement's exchange per token of a GPU, one direction (the combine returns as many):
    rows_sent: rows it packs (one per rank reached); inter_node_rows: rows that cross nodes, on
    the busiest node's links (the larger of what it sends and receives); intra_node_rows: rows
    that move inside a node (the second stage's forwarding included when hierarchical)."""

    rows_sent: float
    inter_node_rows: float
    intra_node_rows: float


@dataclass(frozen=True)
class Phase:
    name: str
    flops: float
    hbm_bytes: float
    seconds: float
    bound: str  # "compute" | "memory" | "intra-node link" | "inter-node link"

    def to_dict(self) -> dict:
        return {"flops": self.flops, "hbm_bytes": self.hbm_bytes, "ms": self.seconds * 1e3, "bound": self.bound}


def per_layer_parameters(cfg: ModelConfig, layer: int) -> dict[str, int]:
    """Parameters of one decoder layer by kind (hpc_moe.perf.footprint.KINDS)."""
    base = layer_parameters(cfg, [])
    return {k: v - base[k] for k, v in layer_parameters(cfg, [layer]).items()}


def reach(cfg: ModelConfig, owner_E) -> float:
    """Expected distinct owners (ranks, slots or nodes: ``owner_E[e]`` for each expert) of one
    token's K experts under group-limited routing: topk_group of the n_group groups, each set alike,
    then K distinct experts among the chosen groups' experts, each set alike."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    groups = cfg.n_group if cfg.n_group and cfg.topk_group and cfg.topk_group < cfg.n_group else 1
    size = E // groups
    chosen = list(itertools.combinations(range(groups), cfg.topk_group if groups > 1 else 1))
    total = 0.0
    for gs in chosen:
        experts = [e for g in gs for e in range(g * size, (g + 1) * size)]
        n, per_owner = len(experts), {}
        for e in experts:
            per_owner[owner_E[e]] = per_owner.get(owner_E[e], 0) + 1
        total += sum(1 - math.comb(n - c, K) / math.comb(n, K) for c in per_owner.values())
    return total / len(chosen)


def _owners(cfg: ModelConfig, layout: Layout) -> tuple[list[int], list[int]]:
    """Each expert's first rank and its node, as a run with uniform loads places them (the
    placement itself, hpc_moe.ep.placement, with the engine's policy: not a restatement of it)."""
    return _placed_owners(cfg.n_routed_experts, cfg.n_group, layout.ep, layout.expert_tp,
                          min(layout.ranks_per_node, layout.ep))


@functools.lru_cache(maxsize=256)  # a sweep predicts the same layout for many batches
def _placed_owners(n_experts: int, n_group: int, ep: int, expert_tp: int, rpn: int) -> tuple[list[int], list[int]]:
    node_of_rank = [r // rpn for r in range(ep)]
    nodes = len(set(node_of_rank))
    p = ExpertPlacement.build(n_experts, ep, expert_tp, node_of_rank, n_group,
                              policy="hierarchical" if n_group % nodes == 0 else "global")
    rank = [p.owners(e)[0] * expert_tp for e in range(n_experts)]
    return rank, [node_of_rank[r] for r in rank]


def wire_row_bytes(cfg: ModelConfig, act_bytes: int, payload: str) -> tuple[float, float]:
    """Bytes of one dispatch row (the token row and its metadata row: local expert id and weight
    per k, FP8 scales, as hpc_moe.ep.plan.meta_layout lays it out) and of one combine row."""
    H, K = cfg.hidden_size, cfg.num_experts_per_tok
    return H * (1 if payload == "fp8" else act_bytes) + meta_layout(payload, H, K).width, H * act_bytes


def messages(layout: Layout, dispatch: str) -> tuple[int, int]:
    """Messages a GPU sends inside and across nodes in a MoE layer, both directions: one a peer
    (flat), or one a remote node's rail peer plus the forwarding inside the node (hierarchical)."""
    ep, rpn = layout.ep, min(layout.ranks_per_node, layout.ep)
    nodes = -(-ep // rpn)
    if dispatch == "hierarchical" and nodes > 1:
        return 4 * (rpn - 1), 2 * (nodes - 1)
    return 2 * (rpn - 1), 2 * (ep - rpn)


def exchanges(layout: Layout, dispatch: str) -> int:
    """All-to-alls a MoE layer runs: dispatch and combine, each in two stages when hierarchical."""
    nodes = -(-layout.ep // min(layout.ranks_per_node, layout.ep))
    return 4 if dispatch == "hierarchical" and nodes > 1 else 2


def exchange_phase(cfg: ModelConfig, layout: Layout, hw: Hardware, tokens: float, dispatch: str,
                   payload: str = "native", share: float = 1.0, traffic: Traffic | None = None) -> dict:
    """Both directions of a MoE layer's all-to-all, per GPU: rows, bytes and messages inside and
    across nodes, and the alpha-beta time of each link. traffic: a placement's rows per token
    (hpc_moe.perf.balance); None: experts dealt in contiguous blocks, routing uniform."""
    ep, rpn = layout.ep, min(layout.ranks_per_node, layout.ep)
    nodes = -(-ep // rpn)
    rank_E, node_E = _owners(cfg, layout)
    ranks = reach(cfg, rank_E) * layout.expert_tp  # an expert-TP slot needs the row on each of its ranks
    row = sum(wire_row_bytes(cfg, hw.dtype_bytes, payload))  # there and back
    if traffic is not None:
        ranks = traffic.rows_sent
        inter_r, intra_r = tokens * traffic.inter_node_rows, tokens * traffic.intra_node_rows
    elif dispatch == "hierarchical" and nodes > 1:
        # one copy per remote node reached, forwarded inside that node unless it lands on its owner
        remote_nodes = reach(cfg, node_E) * (nodes - 1) / nodes
        inter_r = tokens * remote_nodes
        intra_r = tokens * ranks * ((rpn - 1) / ep + (ep - rpn) / ep * (rpn - 1) / rpn)
    else:
        inter_r, intra_r = tokens * ranks * (ep - rpn) / ep, tokens * ranks * (rpn - 1) / ep
    intra_m, inter_m = messages(layout, dispatch)
    intra_s = hw.intra_node.seconds(intra_r * row, intra_m, share) if intra_r else 0.0
    inter_s = hw.inter_node.seconds(inter_r * row, inter_m, share) if inter_r else 0.0
    return {"rows_sent": tokens * ranks, "intra_node_bytes": intra_r * row, "inter_node_bytes": inter_r * row,
            "intra_node_ms": intra_s * 1e3, "inter_node_ms": inter_s * 1e3,
            "ms": (max(intra_s, inter_s) if hw.links_concurrent else intra_s + inter_s) * 1e3,
            "bound": "inter-node link" if inter_s >= intra_s else "intra-node link"}


def layer_work(cfg: ModelConfig, layer: int, *, mode: str, tokens: float, sequences: float, context: float,
               pairs: float = 0.0, rows_sent: float = 0.0, act_bytes: int = 2, expert_bytes: float = 2,
               experts_here: float = 1.0, expert_tp: int = 1, payload: str = "native",
               attention: str = "materialised") -> dict[str, tuple]:
    """FLOPs and HBM bytes of each phase of one layer on one GPU: {phase: (flops, bytes)}.

    tokens: rows through attention and the dense parts; sequences, context: the KV cache attended;
    pairs: (token, expert) rows through this GPU's experts (their GEMMs), of experts_here experts;
    rows_sent: rows this GPU packs for dispatch and sums at combine (MoE layers); attention:
    "materialised" (hpc_moe's kernels: float32 scores written and read by each array pass) or
    "fused" (a flash-style kernel: the latents read once, no scores in HBM, the causal half skipped)."""
    p = per_layer_parameters(cfg, layer)
    T, H, heads, wb, ab = tokens, cfg.hidden_size, cfg.num_attention_heads, act_bytes, act_bytes
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    materialised = attention == "materialised"
    if mode == "decode":  # absorbed MLA: scores and values against the latent cache
        score = 2 * heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * T * context
        kv = sequences * context * latent * ab * (CACHE_PASSES if materialised else 1)
        scores = SCORE_PASSES_DECODE * heads * T * context * 4 if materialised else 0
    else:  # the materialised form computes the masked half of the causal scores too
        score = 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim) * T * context / (1 if materialised else 2)
        kv = T * latent * ab
        scores = SCORE_PASSES_PREFILL * heads * T * context * 4 if materialised else 0
    act = T * H * ab
    attn = p["attention"] + p["norms"]
    work = {"attention": (2 * attn * T + score, attn * wb + kv + scores + 4 * act)}
    if not cfg.is_moe_layer(layer):
        work["dense_mlp"] = (2 * p["dense_mlp"] * T, p["dense_mlp"] * wb + 2 * act)
        return work
    expert = 3 * H * cfg.moe_intermediate_size / expert_tp
    row_d, row_c = wire_row_bytes(cfg, ab, payload)
    work.update({
        "gate": (2 * p["router"] * T, p["router"] * wb + act),
        "shared_experts": (2 * p["shared_experts"] * T, p["shared_experts"] * wb + 2 * act),
        "routed_experts": (2 * expert * pairs, experts_here * expert * expert_bytes + 2 * pairs * H * ab),
        "dispatch": (0.0, 2 * rows_sent * row_d),  # the pack: read the tokens, write the send rows
        "combine": (rows_sent * H, rows_sent * row_c + act),  # the source's sum of the returned rows
    })
    return work


def predict_step(cfg: ModelConfig, layout: Layout, hw: Hardware, *, mode: str, tokens: float, sequences: float,
                 context: float, expert_fp8: bool, dispatch: str = "flat", micro_batches: int = 1,
                 imbalance: float = 1.0, layers: int | None = None, payload: str = "native",
                 ranks_per_host: int | None = None, attention: str = "materialised",
                 traffic: Traffic | None = None) -> dict:
    """Per-phase predictions of one layer of each kind and of the whole step, per GPU (times in ms).

    ranks_per_host: ranks sharing a machine's devices (default: the layout's ranks per node, or fewer
    when the job is smaller); more ranks than the hardware's GPUs per node divide its rates while
    they compute (Hardware.device_share): how much depends on how often they compute at once,
    so the share and the step's busy fraction are solved together. attention: the kernels' form
    ("materialised" or "fused", see layer_work); traffic: the placement's exchange (exchange_phase)."""
    ranks = ranks_per_host or min(layout.ranks_per_node, layout.ep * layout.dp)
    kw = dict(mode=mode, tokens=tokens, sequences=sequences, context=context, expert_fp8=expert_fp8,
              dispatch=dispatch, micro_batches=micro_batches, imbalance=imbalance, layers=layers, payload=payload,
              attention=attention, traffic=traffic)
    busy = 1.0
    for _ in range(50):  # a damped fixed point: more waiting frees cores, which shortens the compute
        out = _predict_at(cfg, layout, hw, hw.device_share(ranks, hw.concurrency_at(busy)),
                          exchanges(layout, dispatch) * hw.oversubscription(ranks) * hw.oversubscribed_sync_s, **kw)
        now = 1 - sum(L["count"] * L["exposed_comm_ms"] for L in out["layers"].values()) / out["step_ms"]
        if ranks <= hw.gpus_per_node or abs(now - busy) < 1e-4:
            break
        busy = (busy + now) / 2
    out["busy"] = busy
    return out


def _predict_at(cfg: ModelConfig, layout: Layout, hw: Hardware, share: float, sync_s: float, *, mode: str, tokens: float,
                sequences: float, context: float, expert_fp8: bool, dispatch: str, micro_batches: int,
                imbalance: float, layers: int | None, payload: str, attention: str,
                traffic: Traffic | None = None) -> dict:
    """predict_step with each rank getting ``share`` of its device and each MoE layer's exchanges
    waiting ``sync_s`` for peers that share it."""
    n = layers or cfg.num_hidden_layers
    T = sequences if mode == "decode" else tokens
    kinds = {"dense": [i for i in range(n) if not cfg.is_moe_layer(i)], "moe": [i for i in range(n) if cfg.is_moe_layer(i)]}
    out: dict = {"mode": mode, "tokens_per_gpu": T, "device_share": share, "layers": {}}
    step_s = hw.step_overhead_s / share  # barriers and the step's host work wait for descheduled ranks too
    for kind, idx in kinds.items():
        if not idx:
            continue
        comm: dict = {}
        fp8 = expert_fp8 and "fp8" in hw.flops_per_s
        if kind == "moe":
            slots = layout.ep // layout.expert_tp
            per_slot = -(-cfg.n_routed_experts // slots)
            ex = exchange_phase(cfg, layout, hw, T, dispatch, payload, share, traffic)
            work = layer_work(cfg, idx[0], mode=mode, tokens=T, sequences=sequences, context=context,
                              pairs=T * cfg.num_experts_per_tok * layout.ep / cfg.n_routed_experts * per_slot * imbalance,
                              rows_sent=ex["rows_sent"], act_bytes=hw.dtype_bytes,
                              expert_bytes=(1 + 4 / FP8_BLOCK**2) if expert_fp8 else hw.dtype_bytes,
                              experts_here=per_slot * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
                                                       ** (T * layout.ep)),  # those a row reaches
                              expert_tp=layout.expert_tp, payload=payload,
                              attention=attention)
            comm = {"dispatch_and_combine": ex}
        else:
            work = layer_work(cfg, idx[0], mode=mode, tokens=T, sequences=sequences, context=context,
                              act_bytes=hw.dtype_bytes, attention=attention)
        phases = []
        for name, (flops, nbytes) in work.items():
            s, bound = hw.phase_s(name, flops, nbytes, "fp8" if name == "routed_experts" and fp8 else None, share, mode)
            s += hw.rate(name, mode).overhead_s * (micro_batches - 1)  # every micro-batch calls it
            phases.append(Phase(name, flops, nbytes, s, bound))
        t = {ph.name: ph.seconds for ph in phases}
        comm_s = sum(c["ms"] for c in comm.values()) / 1e3
        hidden_by = t.get("shared_experts", 0.0) + t["attention"] * (micro_batches - 1) / micro_batches
        exposed = max(0.0, comm_s - hidden_by) + (sync_s if comm else 0.0)
        layer_s = sum(t.values()) + exposed
        out["layers"][kind] = {"count": len(idx), "ms": layer_s * 1e3, "exposed_comm_ms": exposed * 1e3,
                               "phases": {ph.name: ph.to_dict() for ph in phases}, "exchange": comm}
        step_s += len(idx) * layer_s
    last = sequences if mode == "decode" else T / context  # the positions whose logits the step needs
    flops, nbytes = 2 * cfg.vocab_size * cfg.hidden_size * last, (cfg.vocab_size + last) * cfg.hidden_size * hw.dtype_bytes
    s, bound = hw.phase_s("head", flops, nbytes, share=share, mode=mode)
    out["head"] = Phase("head", flops, nbytes, s, bound).to_dict()
    step_s += s
    out["step_overhead_ms"] = hw.step_overhead_s / share * 1e3
    out["step_ms"] = step_s * 1e3
    out["tokens_per_s_per_gpu"] = T / step_s
    out["bottleneck"] = _bottleneck(out)
    return out


def _bottleneck(pred: dict) -> str:
    """The term with the most time in the step: a phase and what bounds it, or exposed communication."""
    terms: dict[str, float] = {"fixed cost per step": pred["step_overhead_ms"]}
    for L in pred["layers"].values():
        for name, ph in L["phases"].items():
            key = f"{name} ({ph['bound']})"
            terms[key] = terms.get(key, 0.0) + L["count"] * ph["ms"]
        if L["exchange"]:
            terms[f"exposed dispatch/combine ({L['exchange']['dispatch_and_combine']['bound']})"] = \
                L["count"] * L["exposed_comm_ms"]
    return max(terms, key=terms.get)
