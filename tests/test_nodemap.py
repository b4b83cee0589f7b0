"""Where EP ranks sit (NodeMap): any placement of equal-sized nodes feeds the two-stage exchange."""
import numpy as np
import pytest

from hpc_moe.ep.dispatch import DispatchOptions, _hierarchical
from hpc_moe.ep.plan import NodeMap
from hpc_moe.errors import InputError


def check(nodes: NodeMap, node_P, local_P, rank_at_NL):
    np.testing.assert_array_equal(nodes.node_P, node_P)
    np.testing.assert_array_equal(nodes.local_P, local_P)
    np.testing.assert_array_equal(nodes.rank_at_NL, rank_at_NL)
    assert nodes.unusable is None
    n, l = nodes.rank_at_NL.shape
    assert nodes.n_nodes == n
    # rank_at_NL inverts (node_P, local_P)
    np.testing.assert_array_equal(nodes.rank_at_NL[nodes.node_P, nodes.local_P], np.arange(n * l))


def test_blocks_of_consecutive_ranks():
    check(NodeMap.of([0, 0, 0, 1, 1, 1]), [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], [[0, 1, 2], [3, 4, 5]])


def test_round_robin():  # srun -m cyclic: node_of_rank = r % n
    check(NodeMap.of([r % 2 for r in range(6)]), [0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2], [[0, 2, 4], [1, 3, 5]])


def test_ids_are_renumbered_in_their_order():  # e.g. the EP group of a second DP replica
    check(NodeMap.of([3, 2, 3, 2]), [1, 0, 1, 0], [0, 0, 1, 1], [[1, 3], [0, 2]])


def test_unequal_nodes_are_refused():
    nodes = NodeMap.of([0, 1, 0, 0])
    np.testing.assert_array_equal(nodes.local_P, [0, 0, 1, 2])
    assert nodes.rank_at_NL is None and nodes.unusable == "nodes differ in size"
    assert not _hierarchical(DispatchOptions(scheme="auto"), nodes, 1)
    with pytest.raises(InputError, match="cannot run here: nodes differ in size"):
        _hierarchical(DispatchOptions(scheme="hierarchical"), nodes, 1)


def test_auto_picks_two_stages_on_any_equal_map_with_several_ranks_per_node():
    assert _hierarchical(DispatchOptions(), NodeMap.of([0, 1, 0, 1]), 1)
    assert not _hierarchical(DispatchOptions(), NodeMap.of([0, 1]), 1)  # one rank per node
    assert not _hierarchical(DispatchOptions(), NodeMap.of([4, 4]), 1)  # one node
