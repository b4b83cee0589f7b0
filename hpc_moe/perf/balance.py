"""Expert placement chosen by predicted cost: every policy's placement for the measured loads,
each priced by the planner's cost model (hpc_moe.perf.predict: the slowest rank's expert work,
the rows that cross nodes on the busiest node's links (the mean node's where one engine moves
every node's bytes) and those that move inside nodes, on the hardware's or the measured links),
and the one of least predicted step time chosen.

DeepSeek's EPLB picks its policy by a rule (hierarchical when the nodes divide the routing groups).
The rule cannot see that keeping each group on one node may leave a node's hottest experts
sharing one node's slots (the rank load the issue measured at 2.78 x the mean where the global
policy gives 1.53), nor what the cross-node rows it saves are worth on the links at hand; the
prediction weighs both.

Legend: M MoE layers, E experts, S slots, N nodes, K top-k.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from hpc_moe.config import ModelConfig
from hpc_moe.ep.placement import POLICIES, ExpertPlacement
from hpc_moe.perf.footprint import Layout
from hpc_moe.perf.hardware import Hardware
from hpc_moe.perf.predict import Traffic, predict_step, wire_row_bytes


@dataclass(frozen=True, eq=False)
class Candidate:
    """One policy's placement and its price: rank_load the hottest slot's rows over the mean (the
    rows its replicas take as choose_replica sends them), the mean over MoE layers; traffic its rows per
    token; inter_node_bytes and intra_node_bytes per GPU per step (one MoE layer, both
    directions); step_ms the predicted step. At a re-placement: moved_experts the experts ranks
    receive (all MoE layers), moved_bytes the busiest receiver's weight bytes, move_ms their time
    on the inter-node link spread over the steps to the next re-placement (in step_ms)."""

    policy: str
    placement: ExpertPlacement
    rank_load: float
    traffic: Traffic
    inter_node_bytes: float
    intra_node_bytes: float
    step_ms: float
    moved_experts: int = 0
    moved_bytes: float = 0.0
    move_ms: float = 0.0


def rank_load(p: ExpertPlacement, loads_ME: np.ndarray) -> float:
    """The hottest slot's rows over the mean as choose_replica sends the tokens (routed_loads),
    the mean over the MoE layers (loads float [M, E])."""
    ids = p.layer_ids or [None] * len(loads_ME)
    out = []
    for layer, loads_E in zip(ids, loads_ME):
        s = p.routed_loads(loads_E, layer)
        out.append(s.max() / s.mean() if s.mean() > 0 else 1.0)
    return float(np.mean(out))


def traffic(p: ExpertPlacement, loads_ME: np.ndarray, top_k: int, hierarchical: bool,
            groups: tuple[int, int] | None = None, busiest: bool = True) -> Traffic:
    """Rows per token of a GPU under placement p, the mean over MoE layers (loads float [M, E]).

    A token's K picks are taken as draws of experts in proportion to their loads (the joint law of
    a token's experts is not in the loads); with ``groups`` = (n_group, topk_group), group-limited
    routing: the token first takes topk_group of the groups (a set of groups in proportion to the
    product of their loads), then its K experts among theirs. Each pick goes where choose_replica
    sends it; a token reaches a slot (or a node) with probability 1 - (1 - q)^K, q the share of
    its picks that go there. Tokens are spread evenly over ranks. The busiest node's cross-node
    rows (the larger of what its tokens send and what it receives) set the link time, or with
    busiest False (one engine moves every node's bytes: simulated nodes, or namespaced ones on one
    machine) the mean node's, so that every crossing counts; a row to the source's own slot
    stays put."""
    node_S = np.asarray(p.node_of_rank[::p.expert_tp])
    nodes = np.unique(node_S)
    node_ix = np.searchsorted(nodes, node_S)  # node index 0..N-1 of every slot
    n_nodes, tp = len(nodes), p.expert_tp
    per_node = np.bincount(node_ix, minlength=n_nodes)
    own_N = np.eye(n_nodes, dtype=bool)
    on_SM = node_ix[:, None] == np.arange(n_nodes)[None, :]
    local_NS = own_N[:, node_ix]  # slot on the token's node
    stay_S = 1.0 / per_node[node_ix]  # the chance that a slot is the source's own (or the rail peer's)
    ids = p.layer_ids or [None] * len(loads_ME)
    sent, inter, intra = [], [], []
    for layer, loads_E in zip(ids, loads_ME):
        weight_C, pick_CE = _draws(np.asarray(loads_E, np.float64), groups)
        shares = p.route_shares(layer)[nodes]  # [N, E, S], from each node's tokens
        q_CNS = np.einsum("ce,nes->cns", pick_CE, shares)
        reach_NS = np.einsum("c,cns->ns", weight_C, 1 - (1 - q_CNS) ** top_k)
        reach_NM = np.einsum("c,cnm->nm", weight_C, 1 - (1 - q_CNS @ on_SM) ** top_k)
        sent.append(float((reach_NS.sum(axis=1) * tp).mean()))
        if hierarchical and n_nodes > 1:
            cross_NM = np.where(own_N, 0.0, reach_NM)
            inside = (reach_NS * (1 - stay_S)).sum(axis=1) * tp
        else:
            cross_NM = np.where(local_NS, 0.0, reach_NS) @ on_SM * tp
            inside = (np.where(local_NS, reach_NS, 0.0) * (1 - stay_S)).sum(axis=1) * tp
        node = np.max if busiest else np.mean
        inter.append(float(max(node(cross_NM.sum(axis=1)), node(cross_NM.sum(axis=0)))))  # egress, ingress
        intra.append(float(inside.mean()))
    return Traffic(float(np.mean(sent)), float(np.mean(inter)), float(np.mean(intra)))


def _draws(loads_E: np.ndarray, groups: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """-> (weight_C float [C], pick_CE float [C, E]): the sets of groups a token may take, each
    with its probability and the law of one pick inside it (one set of all experts when routing
    is not group-limited)."""
    total = max(float(loads_E.sum()), 1e-300)
    if groups is None or groups[0] <= 1 or not 1 <= groups[1] < groups[0]:
        return np.ones(1), (loads_E / total)[None, :]
    n_group, topk_group = groups
    group_G = loads_E.reshape(n_group, -1).sum(axis=1) / total
    combos = np.array(list(itertools.combinations(range(n_group), topk_group)))
    weight_C = np.prod(group_G[combos], axis=1)
    in_CG = np.zeros((len(combos), n_group), dtype=bool)
    in_CG[np.arange(len(combos))[:, None], combos] = True
    pick_CE = np.where(np.repeat(in_CG, len(loads_E) // n_group, axis=1), loads_E[None, :], 0.0)
    pick_CE /= np.maximum(pick_CE.sum(axis=1, keepdims=True), 1e-300)
    return weight_C / max(weight_C.sum(), 1e-300), pick_CE


def candidates(cfg: ModelConfig, hw: Hardware, layout: Layout, node_of_rank, loads_ME: np.ndarray, *,
               layers: list[int] | None, tokens: float, mode: str = "prefill", sequences: float = 1,
               context: float = 1, dispatch: str = "flat", expert_fp8: bool = False, micro_batches: int = 1,
               redundant: int = 0, node_cost=None, policies=POLICIES, model_layers: int | None = None,
               payload: str = "native", group_limited: bool = True, current: ExpertPlacement | None = None,
               replan_every: int = 1) -> list[Candidate]:
    """Every policy's placement for loads_ME (float [M, E]; per-layer maps when ``layers`` are the
    M MoE layer ids, else one map for their mean) and its predicted step (predict_step's inputs
    for the rest: tokens per GPU, mode, ...; model_layers: the layers the step runs;
    group_limited: the tokens' experts come from topk_group groups, as the model's router picks
    them; False for synthetic routing, which ignores groups).

    current: at a re-placement, the placement in force: each policy's placement is then laid over
    it (ExpertPlacement.from_loads), the current one refined by swaps is one more candidate
    ("<policy>, kept"), and each candidate's step carries the time of the weights it moves,
    spread over the replan_every steps it will serve."""
    groups = (cfg.n_group, cfg.topk_group) if group_limited and cfg.n_group and cfg.topk_group else None
    out = []
    loads_ME = np.asarray(loads_ME, dtype=np.float64)
    built = []
    for policy in policies:
        if current is None:
            built.append((policy, ExpertPlacement.build(
                cfg.n_routed_experts, layout.ep, layout.expert_tp, node_of_rank, cfg.n_group,
                loads=loads_ME if layers else loads_ME.mean(axis=0), layers=layers or None, policy=policy,
                redundant=redundant, node_cost=node_cost)))
        else:
            built.append((policy, dataclasses.replace(current, policy=policy).from_loads(loads_ME)))
    if current is not None:
        built.append((f"{current.policy}, kept", current.from_loads(loads_ME, keep=True)))
    expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * (1 if expert_fp8 else hw.dtype_bytes) \
        / layout.expert_tp
    for policy, p in built:
        hier = dispatch == "hierarchical"
        t = traffic(p, loads_ME, cfg.num_experts_per_tok, hier, groups, busiest=hw.links_concurrent)
        imb = rank_load(p, loads_ME)
        pred = predict_step(cfg, layout, hw, mode=mode, tokens=tokens, sequences=sequences, context=context,
                            expert_fp8=expert_fp8, dispatch=dispatch, micro_batches=micro_batches, imbalance=imb,
                            layers=model_layers, payload=payload, traffic=t)
        row = sum(wire_row_bytes(cfg, hw.dtype_bytes, payload))
        T = pred["tokens_per_gpu"]
        moved, busiest = _moved(current, p) if current is not None else (0, 0)
        move_ms = 1e3 * hw.inter_node.seconds(busiest * expert_bytes, busiest) / max(replan_every, 1)
        out.append(Candidate(policy, p, imb, t, T * t.inter_node_rows * row, T * t.intra_node_rows * row,
                             pred["step_ms"] + move_ms, moved, busiest * expert_bytes, move_ms))
    return out


def _moved(old: ExpertPlacement, new: ExpertPlacement) -> tuple[int, int]:
    """-> (experts that ranks receive going from old to new, all maps; the most one rank receives)."""
    per_slot = np.zeros(new.n_slots, dtype=np.int64)
    for a, b in zip(old.slot_experts, new.slot_experts):
        per_slot += [len(set(y) - set(x)) for x, y in zip(a, b)]
    return int(per_slot.sum()) * new.expert_tp, int(per_slot.max())


def best(cands: list[Candidate]) -> Candidate:
    """The candidate of least predicted step; a tie (within 1 %: the planner's steps are off by
    5-15 % against measured ones, docs/benchmarks.md, and placements a few tenths of a percent
    apart are not told apart by it) goes to the lower rank load, then to fewer moved experts,
    then to the earlier policy (DeepSeek's own first)."""
    fastest = min(c.step_ms for c in cands)
    near = [c for c in cands if c.step_ms <= fastest * 1.01]
    return min(near, key=lambda c: (round(c.rank_load, 6), c.moved_experts))


def format_candidates(cands: list[Candidate], chosen: Candidate) -> str:
    """The table `hpc-moe plan --loads-from` prints: each policy's rank load, bytes and step."""
    moving = any(c.moved_experts for c in cands)
    lines = [f"  {'policy':<22}{'rank load max/mean':>19}{'cross-node MiB':>16}{'intra-node MiB':>16}"
             + (f"{'experts moved':>15}{'move ms/step':>14}" if moving else "") + f"{'predicted step ms':>19}"]
    for c in cands:
        lines.append(f"  {c.policy:<22}{c.rank_load:>19.3f}{c.inter_node_bytes / 2**20:>16.3f}"
                     f"{c.intra_node_bytes / 2**20:>16.3f}"
                     + (f"{c.moved_experts:>15}{c.move_ms:>14.3f}" if moving else "")
                     + f"{c.step_ms:>19.3f}{'  <- chosen' if c is chosen else ''}")
    return "\n".join(lines)
