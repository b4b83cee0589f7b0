"""Expert placement rules (single process, no MPI). Legend: E experts, S slots, T tokens, K top-k."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hpc_moe.apps.plan import format_placement
from hpc_moe.ep.packing import SPILL
from hpc_moe.ep.placement import ExpertPlacement, PlacementError


def nodes(n_nodes: int, per_node: int) -> list[int]:
    return [n for n in range(n_nodes) for _ in range(per_node)]


def slot_counts(p: ExpertPlacement, layer=None) -> list[int]:
    return [len(p.local_experts(r, layer)) for r in range(0, p.ep_size, p.expert_tp)]


def test_one_expert_per_rank():
    p = ExpertPlacement.build(16, 16, node_of_rank=nodes(2, 8), n_group=4)
    assert not p.colocated and not p.replicated
    assert sorted(e for r in range(16) for e in p.local_experts(r)) == list(range(16))
    assert all(len(p.owners(e)) == 1 for e in range(16))
    assert p.to_array().shape == (16, 1)
    assert p.slot_ranks(5) == [5]


def test_colocation_is_even():
    p = ExpertPlacement.build(22, 8, node_of_rank=nodes(2, 4))
    assert p.colocated and "colocated" in format_placement(p)
    assert sorted(slot_counts(p)) == [2, 2, 3, 3, 3, 3, 3, 3]
    assert sorted(e for r in range(8) for e in p.local_experts(r)) == list(range(22))
    table = p.local_index_table()
    for r in range(8):
        for i, e in enumerate(p.local_experts(r)):
            assert table[r, e] == i


def test_colocation_balances_loads():
    loads = np.array([64, 32, 16, 8, 4, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=float)
    p = ExpertPlacement.build(16, 4, loads=loads)
    assert slot_counts(p) == [4, 4, 4, 4]
    per_slot = [loads[p.local_experts(r)].sum() for r in range(4)]
    contiguous = [loads[i:i + 4].sum() for i in range(0, 16, 4)]
    assert max(per_slot) < max(contiguous)
    assert max(per_slot) == 64 + 3  # the hottest expert shares its slot with three cold ones


def test_replicas_go_to_hot_experts():
    loads = np.array([100.0, 10.0, 1.0, 1.0])
    p = ExpertPlacement.build(4, 10, loads=loads)
    assert p.replicated and not p.colocated
    assert slot_counts(p) == [1] * 10  # every rank holds exactly one expert
    reps = [len(p.owners(e)) for e in range(4)]
    assert sum(reps) == 10 and reps[0] == max(reps) and reps[0] >= 5 and min(reps) == 1
    arr = p.to_array()
    assert arr.shape == (4, max(reps)) and (arr[3] >= 0).sum() == 1 and arr[3, 1] == -1
    # uniform loads: spares go round robin
    q = ExpertPlacement.build(3, 8)
    assert [len(q.owners(e)) for e in range(3)] == [3, 3, 2]


def test_groups_stay_on_one_node():
    # 4 simulated nodes of 4 ranks, 32 experts in 4 routing groups of 8: one group per node.
    node_of_rank = nodes(4, 4)
    p = ExpertPlacement.build(32, 16, node_of_rank=node_of_rank, n_group=4)
    for g in range(4):
        held_on = {node_of_rank[s] for e in range(8 * g, 8 * g + 8) for s in p.owners(e)}
        assert len(held_on) == 1
    # with loads, whole groups are packed by load (still one node each)
    loads = np.ones(32)
    loads[8:16] = 50.0
    q = ExpertPlacement.build(32, 16, node_of_rank=node_of_rank, n_group=4, loads=loads)
    for g in range(4):
        assert len({node_of_rank[s] for e in range(8 * g, 8 * g + 8) for s in q.owners(e)}) == 1
    # replicas stay on the node of their group: 8 experts, 4 groups, 16 ranks on 4 nodes
    r = ExpertPlacement.build(8, 16, node_of_rank=node_of_rank, n_group=4)
    for g in range(4):
        assert len({node_of_rank[s] for e in (2 * g, 2 * g + 1) for s in r.owners(e)}) == 1


def test_deepseek_shape_group_per_node():
    # 256 experts, 8 groups, EP64 on 8 nodes of 8 GPUs: 4 experts per GPU, one group per node
    p = ExpertPlacement.build(256, 64, node_of_rank=nodes(8, 8), n_group=8)
    assert slot_counts(p) == [4] * 64
    for g in range(8):
        assert len({p.owners(e)[0] // 8 for e in range(32 * g, 32 * g + 32)}) == 1


def test_expert_tp2():
    p = ExpertPlacement.build(4, 8, expert_tp=2, node_of_rank=nodes(2, 4))
    assert p.n_slots == 4 and not p.colocated
    assert p.slot_ranks(1) == [2, 3]
    assert p.local_experts(2) == p.local_experts(3)
    slots = p.route(np.array([[0, 1, 2, 3]]), src_rank=0)
    assert sorted(slots[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(PlacementError):
        ExpertPlacement.build(4, 6, expert_tp=4)


def test_replica_choice_is_deterministic_local_first_and_spread():
    node_of_rank = nodes(2, 4)
    p = ExpertPlacement.build(2, 8, node_of_rank=node_of_rank)  # each expert: 4 replicas
    topk = np.zeros((400, 1), dtype=np.int64)
    a = p.route(topk, src_rank=1)
    assert np.array_equal(a, p.route(topk, src_rank=1))
    here = [s for s in p.owners(0) if node_of_rank[s] == 0]
    if here:  # a replica on the source node wins
        assert set(a.ravel().tolist()) <= set(here)
        counts = np.bincount(a.ravel(), minlength=8)[here]
        assert counts.max() - counts.min() <= 1  # spread by token index
    far = p.route(topk, src_rank=5)
    assert set(far.ravel().tolist()) <= set(p.owners(0))
    vec = p.choose_replica(np.array([0, 0, 1]), 2, np.array([0, 1, 2]))
    assert vec.shape == (3,)
    assert p.route(np.zeros((0, 8), dtype=np.int64), 0).shape == (0, 8)


def test_per_layer_maps_and_replacement():
    p = ExpertPlacement.build(8, 4, layers=range(3, 6))
    assert p.to_array().shape == (3, 8, 1)
    loads = np.array([40, 1, 1, 1, 1, 1, 1, 30], dtype=float)
    q = p.from_loads(loads, layer=4)
    assert q.local_experts(0, layer=3) == p.local_experts(0, layer=3)
    assert q.local_experts(0, layer=4) != p.local_experts(0, layer=4)
    top = next(r for r in range(4) if 0 in q.local_experts(r, layer=4))
    assert 7 not in q.local_experts(top, layer=4)  # the two hottest are split
    all_layers = p.from_loads(np.tile(loads, (3, 1)))
    assert all_layers.local_experts(0, layer=5) == q.local_experts(0, layer=4)
    with pytest.raises(PlacementError, match="layer 9"):
        p.local_experts(0, layer=9)
    with pytest.raises(PlacementError, match="shared map"):
        ExpertPlacement.build(8, 4).from_loads(loads, layer=3)


def test_more_nodes_than_experts():
    p = ExpertPlacement.build(2, 8, node_of_rank=nodes(4, 2), loads=[3.0, 1.0])
    assert slot_counts(p) == [1] * 8
    assert len(p.owners(0)) > len(p.owners(1)) >= 1


def test_errors_and_format():
    with pytest.raises(PlacementError, match="n_group"):
        ExpertPlacement.build(10, 4, n_group=4)
    with pytest.raises(PlacementError, match="node_of_rank"):
        ExpertPlacement.build(8, 4, node_of_rank=[0, 0])
    with pytest.raises(PlacementError, match="loads"):
        ExpertPlacement.build(8, 4, loads=[1.0] * 7)
    text = format_placement(ExpertPlacement.build(4, 8, node_of_rank=nodes(2, 4)), hostnames=["h0"] * 4 + ["h1"] * 4)
    assert "replicas" in text and "h1" in text


def _slot_loads(p: ExpertPlacement, loads: np.ndarray) -> np.ndarray:
    """Expected load per slot when each expert's load splits evenly over its replicas."""
    reps = np.array([len(p.owners(e)) for e in range(p.n_experts)])
    out = np.zeros(p.n_slots)
    for s in range(p.n_slots):
        for e in p.local_experts(s * p.expert_tp):
            out[s] += loads[e] / reps[e]
    return out


def test_global_policy_replicates_hot_experts_across_nodes():
    loads = np.array([40.0, 1, 1, 1, 1, 1, 1, 1])  # one very hot expert
    p = ExpertPlacement.build(8, 16, 1, [r // 4 for r in range(16)], n_group=1, loads=loads, policy="global")
    owners = p.owners(0)
    assert len(owners) == 16 - 7 and len({s // 4 for s in owners}) == 4  # its replicas reach every node
    assert all(len(p.owners(e)) == 1 for e in range(1, 8))
    # The best split: 40 / 9 per replica against a mean of 47 / 16 per slot (1.51); one slot each: 13.6.
    assert _slot_loads(p, loads).max() / _slot_loads(p, loads).mean() == pytest.approx((40 / 9) / (47 / 16))


def test_redundant_experts_split_the_hot_ones_when_colocated():
    rng = np.random.default_rng(0)
    loads = 1.0 / (1 + rng.permutation(32)) ** 1.2  # Zipf
    nodes = [r // 4 for r in range(16)]
    imbalance = {}
    for policy in ("hierarchical", "global"):
        for red in (0, 16):
            p = ExpertPlacement.build(32, 16, 1, nodes, n_group=8, loads=loads, policy=policy, redundant=red)
            per = _slot_loads(p, loads)
            imbalance[policy, red] = per.max() / per.mean()
            held = [len(p.local_experts(r)) for r in range(16)]
            assert sum(held) == 32 + red and max(held) - min(held) <= 1  # floor/ceil per slot
            assert all(len(set(p.local_experts(r))) == len(p.local_experts(r)) for r in range(16))
            if policy == "hierarchical":  # each routing group's experts stay on one node
                for g in range(8):
                    assert len({s // 4 for e in range(4 * g, 4 * g + 4) for s in p.owners(e)}) == 1
    for policy in ("hierarchical", "global"):
        assert imbalance[policy, 16] < 0.8 * imbalance[policy, 0]
    assert p.from_loads(loads).policy == "global" and p.from_loads(loads).redundant == 16
    with pytest.raises(PlacementError, match="policy"):
        ExpertPlacement.build(8, 8, policy="random")


def _node_loads(p: ExpertPlacement, loads: np.ndarray, n_nodes: int) -> np.ndarray:
    per = _slot_loads(p, loads)
    node = np.array(p.node_of_rank[::p.expert_tp])
    return np.array([per[node == k].sum() for k in range(n_nodes)])


@pytest.mark.parametrize("policy,experts", [("hierarchical", 16), ("global", 16), ("global", 12)])
def test_the_cheapest_links_take_the_heaviest_node(policy, experts):
    loads = 1.0 / np.arange(1, experts + 1) ** 1.2  # zipf: whichever node holds expert 0 is the heaviest
    node_of_rank = nodes(4, 4)
    plain = ExpertPlacement.build(experts, 16, node_of_rank=node_of_rank, n_group=4, loads=loads, policy=policy)
    for slow in range(4):
        cost = np.ones(4)
        cost[slow] = 2.0
        cost[(slow + 1) % 4] = 1.5
        p = ExpertPlacement.build(experts, 16, node_of_rank=node_of_rank, n_group=4, loads=loads, policy=policy,
                                  node_cost=cost)
        before, after = _node_loads(plain, loads, 4), _node_loads(p, loads, 4)
        assert np.allclose(sorted(before), sorted(after))  # the same node packs, moved whole
        assert np.allclose(sorted(_slot_loads(plain, loads)), sorted(_slot_loads(p, loads)))
        assert np.argmin(after) == slow and np.argsort(after)[1] == (slow + 1) % 4
        assert np.isclose((after * cost).max(), min((before[list(q)] * cost).max()
                                                    for q in itertools.permutations(range(4))))
        again = p.from_loads(loads)  # re-placement keeps the costs
        assert again.node_cost == p.node_cost and again.slot_experts == p.slot_experts


def test_link_costs_leave_equal_loads_and_unequal_nodes_alone():
    even = ExpertPlacement.build(16, 16, node_of_rank=nodes(4, 4), n_group=4)
    assert ExpertPlacement.build(16, 16, node_of_rank=nodes(4, 4), n_group=4,
                                 node_cost=[3, 1, 1, 1]).slot_experts == even.slot_experts
    uneven = [0] * 6 + [1] * 2
    loads = np.arange(8, 0, -1.0)
    assert ExpertPlacement.build(8, 8, node_of_rank=uneven, loads=loads, node_cost=[2, 1]).slot_experts == \
        ExpertPlacement.build(8, 8, node_of_rank=uneven, loads=loads).slot_experts
    with pytest.raises(PlacementError, match="node_cost"):
        ExpertPlacement.build(8, 8, node_of_rank=nodes(2, 4), node_cost=[1.0])


# ---- the refined policies and the queries the planner prices placements with -----------------
def held_of(p: ExpertPlacement, layer=None) -> list[list[int]]:
    return [p.local_experts(s * p.expert_tp, layer) for s in range(p.n_slots)]


def test_refinement_fixes_what_greedy_packing_misses():
    # LPT with floor/ceil counts: 3, 3, 2 | 2, 2 -> 7 against 5; the optimum is 3 + 3 | 2 + 2 + 2.
    loads = np.array([3.0, 3.0, 2.0, 2.0, 2.0])
    greedy = ExpertPlacement.build(5, 2, loads=loads, policy="global")
    refined = ExpertPlacement.build(5, 2, loads=loads, policy="global-refined")
    assert greedy.slot_loads(loads).max() == pytest.approx(7.0)
    assert refined.slot_loads(loads).max() == pytest.approx(6.0)
    assert sorted(len(h) for h in held_of(refined)) == [2, 3]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("case", [(12, 16, 4, 4, 0), (32, 8, 2, 8, 8), (16, 8, 4, 4, 0), (24, 12, 3, 4, 12)])
def test_refined_policies_keep_the_rules_and_never_lose(case, seed):
    n_exp, ep, n_nodes, groups, redundant = case
    loads = np.random.default_rng(seed).zipf(1.6, n_exp).astype(float)
    node_of_rank = nodes(n_nodes, ep // n_nodes)
    for base in ("hierarchical", "global"):
        p = ExpertPlacement.build(n_exp, ep, node_of_rank=node_of_rank, n_group=groups, loads=loads, policy=base,
                                  redundant=redundant)
        q = ExpertPlacement.build(n_exp, ep, node_of_rank=node_of_rank, n_group=groups, loads=loads,
                                  policy=base + "-refined", redundant=redundant)
        assert q.slot_loads(loads).max() <= p.slot_loads(loads).max() * (1 + 1e-12)
        # the same replicas of every expert, the same count per slot, no slot with two copies
        assert [len(q.owners(e)) for e in range(n_exp)] == [len(p.owners(e)) for e in range(n_exp)]
        assert sorted(map(len, held_of(q))) == sorted(map(len, held_of(p)))
        assert all(len(set(h)) == len(h) for h in held_of(q))
        assert q.slot_loads(loads).sum() == pytest.approx(loads.sum())
        if base == "hierarchical":  # refined inside the nodes: every node holds the same experts
            for n in range(n_nodes):
                slots = [s for s in range(ep) if node_of_rank[s] == n]
                assert sorted(e for s in slots for e in q.local_experts(s)) == \
                    sorted(e for s in slots for e in p.local_experts(s))


def test_route_shares_are_choose_replica():
    loads = np.array([40.0, 9, 5, 3, 2, 1])
    node_of_rank = nodes(2, 4)
    p = ExpertPlacement.build(6, 8, node_of_rank=node_of_rank, loads=loads, policy="global")
    shares = p.route_shares()
    assert shares.shape == (2, 6, 8) and np.allclose(shares.sum(axis=2), 1.0)
    tokens = np.arange(4000)
    for src in (0, 5):
        for e in range(6):
            got = np.bincount(p.choose_replica(np.full(len(tokens), e), src, tokens), minlength=8) / len(tokens)
            assert np.allclose(got, shares[node_of_rank[src], e], atol=1e-3)


def test_unknown_policy_is_an_input_error():
    with pytest.raises(PlacementError, match="policy must be one of"):
        ExpertPlacement.build(8, 8, policy="best")


def draws(popularity, ranks: int, n_tokens: int = 4000, k: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Each rank's tokens' K distinct experts, drawn by popularity (Gumbel top-k), int [T, K]."""
    rng = np.random.default_rng(seed)
    return [np.argsort(-(np.log(popularity)[None, :] + rng.gumbel(size=(n_tokens, len(popularity)))), axis=1)[:, :k]
            for _ in range(ranks)]


def test_replica_shares_level_the_ranks_and_routing_follows_them():
    # 16 experts, 8 ranks on 2 nodes, 8 redundant: 3 experts a rank, the hot ones replicated
    # unevenly over the nodes, which an even split (or only the own node's replicas) cannot level.
    topk = draws(1 / np.arange(1, 17) ** 0.9, 8)
    loads = np.bincount(np.concatenate(topk).ravel(), minlength=16).astype(float)  # as a run measures them
    p = ExpertPlacement.build(16, 8, node_of_rank=nodes(2, 4), n_group=4, loads=loads, policy="global", redundant=8)
    even = p.slot_loads(loads)
    routed = p.routed_loads(loads)
    assert routed.sum() == pytest.approx(loads.sum())
    # tokens leave their node only to save more than SPILL of a mean rank's load
    assert routed.max() / routed.mean() <= even.max() / even.mean() + SPILL
    assert routed.max() / routed.mean() < 1.03
    # what the routing does agrees with what the placement expects
    got = sum(np.bincount(p.route(t, rank).ravel(), minlength=8) for rank, t in enumerate(topk))
    assert np.abs(got / routed - 1).max() < 0.02
    # and every share is a replica of that expert, local replicas first
    shares = p.route_shares()
    for n in range(2):
        for e in range(16):
            assert set(np.nonzero(shares[n, e])[0]) <= set(p.owners(e))
            here = [s for s in p.owners(e) if s // 4 == n]
            if here:
                assert shares[n, e, here].sum() >= 0.5


@pytest.mark.parametrize("seed", range(6))
def test_cut_fills_every_slot_once_per_expert_and_routes_as_modelled(seed):
    # Random layouts with more experts than ranks: E experts, S ranks on N nodes, some redundant.
    rng = np.random.default_rng(seed)
    n_nodes, per_node = [(2, 4), (4, 4), (2, 2)][seed % 3]
    s_count = n_nodes * per_node
    e_count = int(rng.integers(s_count + 1, 3 * s_count + 1))
    redundant = int(rng.integers(0, 2 * s_count))
    loads = rng.permutation(1000 / np.arange(1, e_count + 1) ** rng.uniform(0.6, 1.6))
    p = ExpertPlacement.build(e_count, s_count, node_of_rank=nodes(n_nodes, per_node), loads=loads, policy="cut",
                              redundant=redundant)
    cap = -(-max(s_count, e_count + redundant) // s_count)
    held = p.slot_experts[0]
    assert all(1 <= len(h) <= cap and len(set(h)) == len(h) for h in held)  # filled, within memory, no duplicate
    assert sorted({e for h in held for e in h}) == list(range(e_count))
    assert sum(map(len, held)) <= e_count + redundant
    shares = p.route_shares()  # [N, E, S]: every node's tokens of every expert, all of them, to its replicas
    assert np.allclose(shares.sum(axis=2), 1.0)
    for e in range(e_count):
        assert set(np.nonzero(shares[:, e].sum(axis=0))[0]) <= set(p.owners(e))
    if p.demand[0] is None:  # too few spare places to cut well, or nothing to gain: global's placement
        assert redundant < s_count - 1 or p.slot_loads(loads).max() <= loads.sum() / s_count * (1 + 1e-9)
        g = ExpertPlacement.build(e_count, s_count, node_of_rank=nodes(n_nodes, per_node), loads=loads,
                                  policy="global", redundant=redundant)
        assert p.slot_experts == g.slot_experts
        return
    modelled = p.demand[0] * loads[:, None]  # the pieces the cut gave every slot [E, S]
    routed = p.routed_loads(loads)
    assert routed == pytest.approx(modelled.sum(axis=0), rel=1e-9)
    if redundant >= s_count - 1:  # a cut at every slot's end: every rank at the mean
        assert routed.max() / routed.mean() == pytest.approx(1.0, abs=1e-6)
    # drawn tokens land where the placement expects them
    topk = draws(loads / loads.sum(), s_count)
    got = sum(np.bincount(p.route(t, rank).ravel(), minlength=s_count) for rank, t in enumerate(topk))
    want = p.routed_loads(np.bincount(np.concatenate(topk).ravel(), minlength=e_count).astype(float))
    assert np.abs(got / want - 1).max() < 0.03


def test_cut_keeps_tokens_on_their_node_where_the_pieces_allow():
    # One hot expert cut over both nodes: each node's tokens stay on their own replica as far as
    # its piece takes them; only the excess crosses.
    loads = np.array([8.0, 3, 1, 1, 1, 1, 1, 1, 1])
    p = ExpertPlacement.build(9, 4, node_of_rank=nodes(2, 2), loads=loads, policy="cut", redundant=3)
    shares, demand = p.route_shares(), p.demand[0]
    assert p.routed_loads(loads).max() == pytest.approx(loads.sum() / 4)  # global's split: 1.05 x the mean
    for e in range(9):
        for n in range(2):
            mine = [s for s in p.owners(e) if s // 2 == n]
            # node n's half of e's tokens: as much as its replicas' pieces hold stays home
            assert shares[n, e, mine].sum() == pytest.approx(min(1.0, 2 * demand[e, mine].sum()))


def test_replacement_matches_slots_and_keep_moves_least():
    rng = np.random.default_rng(3)
    loads = rng.permutation(1000 / np.arange(1, 33) ** 1.2)
    nudged = loads * rng.uniform(0.95, 1.05, 32)  # the loads barely move
    for policy in ("global", "hierarchical", "cut"):
        p = ExpertPlacement.build(32, 16, node_of_rank=nodes(4, 4), n_group=8, loads=loads, policy=policy,
                                  redundant=16)

        def moved(q, p=p):
            return sum(len(set(b) - set(a)) for a, b in zip(p.slot_experts[0], q.slot_experts[0]))
        fresh = ExpertPlacement.build(32, 16, node_of_rank=nodes(4, 4), n_group=8, loads=nudged, policy=policy,
                                      redundant=16)
        matched = p.from_loads(nudged)
        assert sorted(map(sorted, matched.slot_experts[0])) == sorted(map(sorted, fresh.slot_experts[0]))
        assert matched.routed_loads(nudged).max() == pytest.approx(fresh.routed_loads(nudged).max())
        assert moved(matched) <= moved(fresh)
        kept = p.from_loads(nudged, keep=True)  # the current map, refined by swaps only
        assert moved(p.from_loads(loads)) == 0  # the same loads: the same placement, nothing moves
        assert max(moved(matched), moved(kept)) <= 48 // 5  # of 48 held, where a fresh one moves more
        assert kept.demand == (None,) and kept.routed_loads(nudged).sum() == pytest.approx(nudged.sum())
