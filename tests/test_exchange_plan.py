"""hpc_moe.ep.plan in one process: rows, counts and pairs of a hand-made routing, replicas, the
nodes a token reaches, and the hierarchical exchange's two stages composed against the flat plan."""
import numpy as np
import pytest

from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.plan import NodeMap, flat_plan, meta_layout, node_codes, node_plan, plan_rows, rail_plan, route


def test_plan_rows_by_hand():
    slot_TK = np.array([[2, 0], [2, -1], [1, 1]])  # token 2 uses slot 1 twice (two local experts)
    local_TK = np.array([[0, 0], [1, -1], [0, 1]])
    p = plan_rows(slot_TK, local_TK, n_slots=3)
    assert p.counts_P.tolist() == [1, 1, 2] and p.pair_counts_P.tolist() == [1, 2, 2]
    assert p.token_M.tolist() == [0, 2, 0, 1]  # grouped by destination, in token order within
    assert p.local_MK.tolist() == [[-1, 0], [0, 1], [0, -1], [1, -1]]
    # pairs come back in (row, k) order; the padding entry (token 1, k 1) points past them
    assert p.pair_index_TC.tolist() == [[3, 0], [4, 5], [1, 2]]


def test_plan_rows_sends_every_rank_of_a_slot():
    p = plan_rows(np.array([[1, 0]]), np.array([[0, 0]]), n_slots=2, tp=2)
    assert p.counts_P.tolist() == [1, 1, 1, 1] and p.pair_counts_P.tolist() == [1, 1, 1, 1]
    assert p.pair_index_TC.shape == (1, 4)


def test_route_and_flat_plan_follow_the_placement():
    pl = ExpertPlacement.build(4, 8, node_of_rank=[0] * 4 + [1] * 4, policy="global")  # two replicas each
    topk = np.array([[0, 3], [1, -1]])
    for rank in (0, 5):
        slot_TK, local_TK = route(pl, rank, None, topk)
        for e, s, i in zip(topk[topk >= 0], slot_TK[topk >= 0], local_TK[topk >= 0]):
            near = [o for o in pl.owners(e) if o // 4 == rank // 4]
            assert pl.local_experts(s)[i] == e and (s in near if near else s in pl.owners(e))
        assert (slot_TK[topk < 0] == -1).all() and (local_TK[topk < 0] == -1).all()
        p = flat_plan(pl, NodeMap.of(pl.node_of_rank), rank, None, topk)
        dest = np.unique(slot_TK[0][slot_TK[0] >= 0] // 4)
        assert p.nodes_T.tolist() == [len(dest), 1] and p.counts_P.sum() == len(np.unique(slot_TK[0][slot_TK[0] >= 0])) + 1


@pytest.mark.parametrize("seed", range(4))
def test_the_two_stages_reach_what_the_flat_plan_reaches(seed):
    rng = np.random.default_rng(seed)
    node_of_rank = [r % 3 for r in range(12)]  # round-robin: 3 nodes of 4
    pl = ExpertPlacement.build(24, 12, node_of_rank=node_of_rank, n_group=3)  # two experts a rank
    nodes, codes = NodeMap.of(node_of_rank), node_codes(pl, None)
    t, k = 16, 4
    topk = np.argsort(rng.random((t, 24)), axis=1)[:, :k]
    topk[rng.random((t, k)) < 0.2] = -1
    w = rng.random((t, k)).astype(np.float32)
    for src in range(12):
        rank_TK, local_TK = route(pl, src, None, topk)
        want = {(tok, kk, int(rank_TK[tok, kk]), int(local_TK[tok, kk])) for tok, kk in zip(*np.nonzero(topk >= 0))}
        p1 = rail_plan(pl, nodes, src, None, topk)
        assert p1.nodes_T.tolist() == flat_plan(pl, nodes, src, None, topk).nodes_T.tolist()
        got, start = set(), np.cumsum(p1.counts_P) - p1.counts_P
        for node in range(3):  # what node's rail peer receives from src, forwarded inside the node
            rows = slice(start[node], start[node] + p1.counts_P[node])
            token_N, code_NK = p1.token_M[rows], p1.local_MK[rows]
            row_Q, k_Q = np.nonzero(code_NK >= 0)
            p2, dest_NK, w_NK = node_plan(codes, len(token_N), k, row_Q, k_Q, code_NK[row_Q, k_Q],
                                          w[token_N[row_Q], k_Q], 4)
            assert np.array_equal(w_NK[row_Q, k_Q], w[token_N[row_Q], k_Q])
            dest_M = np.repeat(np.arange(4), p2.counts_P)
            for m, (n_row, local_K) in enumerate(zip(p2.token_M, p2.local_MK)):
                for kk in np.flatnonzero(local_K >= 0):
                    got.add((int(token_N[n_row]), int(kk), int(nodes.rank_at_NL[node, dest_M[m]]), int(local_K[kk])))
        assert got == want


def test_meta_layout():
    assert meta_layout("native", 7168, 8).width == 64
    fp8 = meta_layout("fp8", 7168, 8)
    assert fp8.span("scale") == (64, 64 + 4 * 56)
