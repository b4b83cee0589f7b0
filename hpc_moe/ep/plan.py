"""Where one rank's rows go in an MoE exchange, from its routing: pure host functions, no MPI.

The exchange kinds (hpc_moe.ep.exchange, .pipelined, .hierarchical) move what these functions
plan; each can be checked here in one process:

* :func:`route`: each (token, k)'s global expert -> the slot serving it (the placement's replica
  choice) and the expert's local index there;
* :func:`plan_rows`: each token's row once to every rank of each slot it uses, grouped by
  destination, with the local expert id per k (the metadata), the counts, and where each (token,
  k) pair's row comes back in the pairs form of the combine;
* :func:`flat_plan`: the two above for the flat exchange, with the nodes each token reaches;
* :class:`NodeMap`, :func:`rail_plan` and :func:`node_plan`: the hierarchical exchange's two
  stages (across nodes to one rail peer per node, then inside the node), whose node codes carry
  each k's rank in the node and local expert id as one integer;
* :func:`meta_layout`: the metadata row's fields.

Legend: T tokens of this rank, K top-k, S slots, P ranks, M rows sent, N rows received, Q pairs,
C columns of a reduction table; in NodeMap N nodes, L ranks per node, R ranks sorted by node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.wire import RowLayout
from hpc_moe.fp8 import FP8_BLOCK


@dataclass(frozen=True, eq=False)
class Plan:
    """Where this rank's rows go (host arrays)."""

    token_M: np.ndarray    # int64 token of each sent row, grouped by destination rank
    local_MK: np.ndarray   # int32 local expert id at the destination per k, -1 if not there
    counts_P: np.ndarray   # int64 rows per destination
    pair_counts_P: np.ndarray  # int64 (row, expert) pairs per destination
    pair_index_TC: np.ndarray  # pairs form: row of the combine buffer of (t, k, tp rank j) at column k * tp + j
    nodes_T: np.ndarray | None  # int64 nodes each token reaches (0: none of its experts is valid)


def plan_rows(slot_TK: np.ndarray, local_TK: np.ndarray, n_slots: int, tp: int = 1) -> Plan:
    """Where rows go, given each (token, k)'s destination slot (int [T, K], -1: none; slot s is
    ranks [s * tp, (s + 1) * tp)) and the expert's local index there: each token's row once to
    every rank of each slot it uses, grouped by rank and in token order within; its pairs come
    back in (row, k) order. -> Plan with counts over n_slots * tp ranks (nodes_T not set)."""
    t, k = slot_TK.shape
    s = n_slots
    slot = np.where(slot_TK >= 0, slot_TK, s)  # s: a dummy column
    in_slot_TS = np.zeros((t, s + 1), dtype=bool)
    in_slot_TS[np.arange(t)[:, None], slot] = True
    dest_M, token_M = np.nonzero(np.repeat(in_slot_TS[:, :s], tp, axis=1).T)  # sorted by (dest, t)
    local_MK = np.where(slot[token_M] == (dest_M // tp)[:, None], local_TK[token_M], -1).astype(np.int32)
    m_B, k_B = np.nonzero(local_MK >= 0)
    pair_index_TC = np.full((t, k * tp), len(m_B), dtype=np.int64)
    pair_index_TC[token_M[m_B], k_B * tp + dest_M[m_B] % tp] = np.arange(len(m_B))
    p = s * tp
    return Plan(token_M.astype(np.int64), local_MK, np.bincount(dest_M, minlength=p).astype(np.int64),
                np.bincount(dest_M[m_B], minlength=p).astype(np.int64), pair_index_TC, None)


def route(placement: ExpertPlacement, rank: int, layer, topk_TK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global expert ids int [T, K] of EP rank ``rank``'s tokens (-1: none) -> (the slot serving
    each, the expert's local index there), int64 [T, K], -1 where there is no expert."""
    valid = topk_TK >= 0
    e_TK = np.where(valid, topk_TK, 0)
    slot_TK = np.where(valid, placement.route(e_TK, rank, layer), -1)
    local_TK = np.where(valid, placement.local_index_table(layer)[np.maximum(slot_TK, 0), e_TK], -1)
    return slot_TK, local_TK


@dataclass(frozen=True, eq=False)
class NodeMap:
    """Which node each EP rank is on, nodes numbered 0..N-1 in the order of their ids (an EP group
    of a DP replica sees ids that need not start at 0). node_P int64 [P]: the node of each rank;
    local_P int64 [P]: its index among its node's ranks, in rank order; rank_at_NL int64 [N, L]:
    the rank of node n with local index l (None when nodes differ in size); unusable: why the
    two-stage exchange cannot run on this map (None: it can)."""

    node_P: np.ndarray
    local_P: np.ndarray
    rank_at_NL: np.ndarray | None
    unusable: str | None

    @classmethod
    def of(cls, node_of_rank) -> NodeMap:
        """From a node id per EP rank [P] (any integers)."""
        _, node_P = np.unique(np.asarray(node_of_rank, np.int64), return_inverse=True)
        size_N = np.bincount(node_P)
        rank_R = np.argsort(node_P, kind="stable")  # node by node, in rank order inside each
        local_P = np.empty_like(node_P)
        local_P[rank_R] = np.arange(len(node_P)) - np.repeat(np.cumsum(size_N) - size_N, size_N)
        equal = bool((size_N == size_N[0]).all())
        return cls(node_P, local_P, rank_R.reshape(len(size_N), -1) if equal else None,
                   None if equal else "nodes differ in size")

    @property
    def n_nodes(self) -> int:
        return int(self.node_P.max()) + 1


def flat_plan(placement: ExpertPlacement, nodes: NodeMap, rank: int, layer, topk_TK: np.ndarray) -> Plan:
    """The flat exchange's plan for EP rank ``rank``: every rank of each slot a token uses gets its
    row once; nodes_T counts the nodes a token reaches."""
    slot_TK, local_TK = route(placement, rank, layer, topk_TK)
    plan = plan_rows(slot_TK, local_TK, placement.n_slots, placement.expert_tp)
    dest_M = np.repeat(np.arange(placement.ep_size), plan.counts_P)
    n = nodes.n_nodes
    token_node = np.unique(plan.token_M * n + nodes.node_P[dest_M])
    return dataclasses.replace(plan, nodes_T=np.bincount(token_node // n, minlength=len(slot_TK)))


def node_codes(placement: ExpertPlacement, layer) -> int:
    """How many local expert ids a rank can have in ``layer``: a node code is (rank in the node)
    x this + (local expert id)."""
    return int(placement.local_index_table(layer).max()) + 1


def rail_plan(placement: ExpertPlacement, nodes: NodeMap, rank: int, layer, topk_TK: np.ndarray) -> Plan:
    """Stage 1 of the hierarchical exchange (expert_tp 1): a token's row once to the rail peer of
    every node it needs (node ids are ranks on the rail), each k's node code as its local id."""
    rank_TK, local_TK = route(placement, rank, layer, topk_TK)  # expert_tp 1: a slot is a rank
    valid_TK = rank_TK >= 0  # rank -1 indexes the last rank below, and is masked
    node_TK = np.where(valid_TK, nodes.node_P[rank_TK], -1)
    code_TK = np.where(valid_TK, nodes.local_P[rank_TK] * node_codes(placement, layer) + local_TK, -1)
    plan = plan_rows(node_TK, code_TK, nodes.n_nodes)
    return dataclasses.replace(plan, nodes_T=np.bincount(plan.token_M, minlength=len(topk_TK)))


def node_plan(codes: int, rows: int, topk: int, row_Q: np.ndarray, k_Q: np.ndarray, code_Q: np.ndarray,
              weight_Q: np.ndarray, ranks_per_node: int) -> tuple[Plan, np.ndarray, np.ndarray]:
    """Stage 2: the ``rows`` rows a rail rank received in stage 1, with their (row, k) pairs'
    node codes and weights [Q] -> (the plan forwarding each row inside the node once per rank
    that runs one of its experts, the destination rank in the node int64 [N, K] (-1: none), the
    weights float32 [N, K])."""
    dest_NK, local_NK = np.full((rows, topk), -1, np.int64), np.full((rows, topk), -1, np.int64)
    dest_NK[row_Q, k_Q], local_NK[row_Q, k_Q] = np.divmod(code_Q, codes)
    w_NK = np.zeros((rows, topk), np.float32)
    w_NK[row_Q, k_Q] = weight_Q
    return plan_rows(dest_NK, local_NK, ranks_per_node), dest_NK, w_NK


def meta_layout(payload: str, hidden: int, topk: int) -> RowLayout:
    """The metadata row: local expert id and weight per k, and with an FP8 payload the float32
    scale of every 128 values."""
    fields = {"local": 4 * topk, "weight": 4 * topk}
    if payload == "fp8":
        fields["scale"] = 4 * -(-hidden // FP8_BLOCK)
    return RowLayout.of(**fields)
