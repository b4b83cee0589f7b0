"""Placement chosen by predicted cost (hpc_moe.perf.balance), single process. Legend: M MoE
layers, E experts."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hpc_moe.config import load_config
from hpc_moe.ep.placement import POLICIES, ExpertPlacement
from hpc_moe.perf.balance import best, candidates, format_candidates, rank_load, traffic
from hpc_moe.perf.footprint import Layout
from hpc_moe.perf.hardware import load_hardware


def issue_loads() -> np.ndarray:
    """float [2, 12]: loads like the issue's (zipf:1.2 over 12 experts): the two hottest experts of
    each layer in one routing group of 3."""
    base = 1.0 / np.arange(1, 13) ** 1.2
    first = base[[0, 1, 4, 2, 5, 6, 3, 7, 8, 9, 10, 11]]  # group 0 holds the two hottest
    second = base[[4, 5, 6, 0, 1, 7, 2, 8, 9, 3, 10, 11]]  # group 1 does
    return 1000 * np.stack([first, second])


@pytest.fixture(scope="module")
def tiny12():
    cfg = load_config("tiny")
    return cfg.__class__.from_dict({**cfg.to_dict(), "n_routed_experts": 12})


def test_cost_beats_the_rule_where_groups_pin_hot_experts_together(tiny12):
    loads = issue_loads()
    cands = candidates(tiny12, load_hardware("h100-sxm"), Layout(16, 1, 1, 4), [r // 4 for r in range(16)], loads,
                       layers=[1, 2], tokens=64, dispatch="hierarchical", model_layers=3)
    by = {c.policy: c for c in cands}
    assert [c.policy for c in cands] == list(POLICIES)
    # DeepSeek's rule (4 groups, 4 nodes) would take hierarchical; its rank load is far worse
    assert by["hierarchical"].rank_load > 1.3 * by["global"].rank_load
    chosen = best(cands)
    assert chosen.policy.startswith("global")
    assert chosen.rank_load == min(c.rank_load for c in cands)
    assert chosen.step_ms == min(c.step_ms for c in cands)
    table = format_candidates(cands, chosen)
    assert table.count("<- chosen") == 1 and "hierarchical-refined" in table


def test_groups_on_nodes_win_when_they_cost_no_rank_load(tiny12):
    """Groups of equal load: hierarchical balances the ranks as well as global, and with the
    router's group-limited routing a token's experts sit on topk_group nodes at most: fewer
    crossings, a faster predicted step, chosen (more so on slower links)."""
    loads = np.tile(np.array([3.0, 1, 1]), (2, 4))
    hw = load_hardware("h100-sxm")
    slow = replace(hw, inter_node=replace(hw.inter_node, bytes_per_s=hw.inter_node.bytes_per_s / 100))
    layout, nodes = Layout(16, 1, 1, 4), [r // 4 for r in range(16)]
    kw = dict(layers=[1, 2], tokens=4096, dispatch="hierarchical", model_layers=3)
    for h in (hw, slow):
        by = {c.policy: c for c in candidates(tiny12, h, layout, nodes, loads, **kw)}
        assert by["hierarchical"].rank_load == pytest.approx(by["global"].rank_load)
        assert by["hierarchical"].inter_node_bytes < 0.8 * by["global"].inter_node_bytes
        assert best(list(by.values())).policy == "hierarchical"
    # synthetic routing ignores groups: then keeping them on a node saves little
    free = {c.policy: c for c in candidates(tiny12, hw, layout, nodes, loads, group_limited=False, **kw)}
    assert free["hierarchical"].inter_node_bytes > 0.9 * free["global"].inter_node_bytes


def test_traffic_is_zero_across_one_node_and_counts_rows(tiny12):
    loads = issue_loads()
    p = ExpertPlacement.build(12, 4, node_of_rank=[0] * 4, n_group=4, loads=loads, layers=[1, 2])
    t = traffic(p, loads, top_k=4, hierarchical=False)
    assert t.inter_node_rows == 0.0
    assert 1.0 <= t.rows_sent <= 4.0  # a token reaches between one and K ranks
    q = ExpertPlacement.build(12, 8, node_of_rank=[r // 4 for r in range(8)], n_group=4, loads=loads, layers=[1, 2])
    flat, two = traffic(q, loads, 4, False), traffic(q, loads, 4, True)
    assert two.inter_node_rows <= flat.inter_node_rows  # a row crosses to a node once
    assert rank_load(q, loads) >= 1.0


def test_a_forced_policy_is_the_only_candidate(tiny12):
    cands = candidates(tiny12, load_hardware("cpu-2core"), Layout(16, 1, 1, 4), [r // 4 for r in range(16)],
                       issue_loads(), layers=[1, 2], tokens=64, model_layers=3, policies=("hierarchical",))
    assert [c.policy for c in cands] == ["hierarchical"] and best(cands) is cands[0]


def test_cut_is_chosen_where_levelling_pays_for_its_crossings(tiny12):
    # 12 experts on 8 ranks with 12 redundant (3 places a rank, 2 nodes): cut levels every rank,
    # which even splits over replicas cannot, at the price of more rows across nodes (a cut expert's
    # replicas on two nodes). On the CPU file expert rows dominate and cut is chosen; on H100
    # links cut and global are predicted within the planner's resolution (0.3 %), and the tie
    # goes to the level ranks; on links a tenth as fast the crossings cost 10 %, and global wins.
    loads = issue_loads()
    kw = dict(layers=[1, 2], tokens=4096, dispatch="hierarchical", model_layers=3, redundant=12, group_limited=False)
    layout, nodes = Layout(8, 1, 1, 4), [r // 4 for r in range(8)]
    cpu = {c.policy: c for c in candidates(tiny12, load_hardware("cpu-2core"), layout, nodes, loads, **kw)}
    assert cpu["cut"].rank_load == pytest.approx(1.0, abs=1e-6)
    assert cpu["cut"].rank_load < min(c.rank_load for c in cpu.values() if c.policy != "cut")
    assert cpu["cut"].inter_node_bytes > cpu["global"].inter_node_bytes
    assert best(list(cpu.values())).policy == "cut"
    hw = load_hardware("h100-sxm")
    gpu = {c.policy: c for c in candidates(tiny12, hw, layout, nodes, loads, **kw)}
    assert gpu["global"].step_ms < gpu["cut"].step_ms < gpu["global"].step_ms * 1.01
    assert best(list(gpu.values())).policy == "cut"
    slow = replace(hw, inter_node=replace(hw.inter_node, bytes_per_s=hw.inter_node.bytes_per_s / 10))
    assert best(candidates(tiny12, slow, layout, nodes, loads, **kw)).policy == "global"


def test_replacement_prices_the_kept_placement_and_the_moved_bytes(tiny12):
    loads = issue_loads()
    layout, nodes = Layout(8, 1, 1, 4), [r // 4 for r in range(8)]
    kw = dict(layers=[1, 2], tokens=4096, dispatch="hierarchical", model_layers=3, redundant=12, group_limited=False)
    hw = load_hardware("h100-sxm")
    now = ExpertPlacement.build(12, 8, node_of_rank=nodes, n_group=4, loads=loads, layers=[1, 2], policy="global",
                                redundant=12)
    same = candidates(tiny12, hw, layout, nodes, loads, current=now, replan_every=4, policies=("global",), **kw)
    assert [c.policy for c in same] == ["global", "global, kept"]
    assert same[0].moved_experts == 0 and same[0].move_ms == 0  # the same loads: nothing to move
    assert best(same).moved_experts == 0
    moved = candidates(tiny12, hw, layout, nodes, loads[::-1], current=now, replan_every=4, **kw)
    fresh = candidates(tiny12, hw, layout, nodes, loads[::-1], **kw)
    expert_bytes = 3 * tiny12.hidden_size * tiny12.moe_intermediate_size * hw.dtype_bytes
    for c, f in zip(moved, fresh):  # each step carries its busiest receiver's bytes over 4 steps
        assert c.moved_bytes % expert_bytes == 0 and c.step_ms == pytest.approx(f.step_ms + c.move_ms)
        assert c.move_ms == pytest.approx(1e3 * hw.inter_node.seconds(c.moved_bytes, c.moved_bytes / expert_bytes) / 4)
    assert moved[-1].policy == "global, kept" and moved[-1].moved_experts < min(c.moved_experts for c in moved[:-1])


def test_one_engine_for_every_node_counts_every_crossing(tiny12):
    # Links that run concurrently: the busiest node's crossings set the time. One engine for all
    # nodes (the CPU file: simulated nodes, or namespaced ones on one machine): every node's count.
    loads = issue_loads()
    p = ExpertPlacement.build(12, 8, node_of_rank=[r // 2 for r in range(8)], n_group=4, loads=loads, layers=[1, 2],
                              policy="cut", redundant=12)
    busiest, mean = traffic(p, loads, 4, True), traffic(p, loads, 4, True, busiest=False)
    assert 0 < mean.inter_node_rows < busiest.inter_node_rows
    assert (mean.rows_sent, mean.intra_node_rows) == (busiest.rows_sent, busiest.intra_node_rows)
    assert not load_hardware("cpu-2core").links_concurrent and load_hardware("h100-sxm").links_concurrent
