"""The link measurement's pure parts: the pairing rounds, the node costs placement uses, the
trace form."""
import json

import numpy as np
import pytest

from hpc_moe.links import UNEVEN, Links, _rounds


@pytest.mark.parametrize("n", range(1, 9))
def test_rounds_meet_every_pair_once_and_each_node_once_a_round(n):
    rounds = _rounds(n)
    pairs = [tuple(sorted(p)) for r in rounds for p in r]
    assert sorted(pairs) == [(a, b) for a in range(n) for b in range(a + 1, n)]
    for r in rounds:
        nodes = [x for p in r for x in p]
        assert len(nodes) == len(set(nodes))
    assert len(rounds) == (n - 1 if n % 2 == 0 else n) or n == 1


def links(bw_N: list[float]) -> Links:
    """Nodes whose NIC reaches bw_N[a] both ways: a pair is as fast as its slower end."""
    bw = np.minimum.outer(np.array(bw_N), np.array(bw_N))
    np.fill_diagonal(bw, 10e9)
    return Links(bw, np.full(bw.shape, 1e-5), 1 << 20)


def test_even_links_have_no_cost_and_noise_is_not_a_difference():
    assert links([1e9] * 4).node_cost() is None
    assert links([1e9, 1e9, 1e9, 0.9e9]).node_cost() is None  # 10% apart: noise
    assert Links(np.full((1, 1), 5e9), np.zeros((1, 1)), 1).node_cost() is None


def test_a_slow_node_costs_most():
    cost = links([1e9, 1e9, 1e9, 0.25e9]).node_cost()
    assert cost is not None and np.argmax(cost) == 3 and cost.min() == 1.0
    assert cost[3] > UNEVEN and np.allclose(cost[:3], cost[0])


def test_trace_form_round_trips_with_single_rank_nodes():
    lk = links([1e9, 2e9])
    lk.bytes_per_s_NN[1, 1] = lk.latency_s_NN[1, 1] = np.nan
    back = Links.from_dict(json.loads(json.dumps(lk.to_dict())))
    assert np.array_equal(back.bytes_per_s_NN, lk.bytes_per_s_NN, equal_nan=True)
    assert back.message_bytes == lk.message_bytes and len(back.inside()) == 1
    assert "between nodes 1-1 GB/s" in back.describe() and back.seconds == lk.seconds
