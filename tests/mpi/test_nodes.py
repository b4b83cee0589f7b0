"""The engine on real nodes, as MPI finds them (no --ranks-per-node): run across the namespaced
nodes of scripts/cluster.sh by tests/test_cluster.py, block or round-robin (cyclic) rank placement.

HPC_MOE_NODES (the node count the launcher was given) and HPC_MOE_RANK_ORDER (block | cyclic) say
what the topology must be; without them (the plain MPI tier on one machine) there is one node and
the tests skip.
"""
import os
import socket

import numpy as np
import pytest
from mpi4py import MPI
from test_engine import check_against_reference, my_prompts, tiny_with_experts

from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.dispatch import DispatchOptions
from hpc_moe.ep.engine import Engine, EngineOptions
from hpc_moe.model.generate import generate
from hpc_moe.model.transformer import Model
from hpc_moe.weights.synthetic import SyntheticWeights

pytestmark = [pytest.mark.mpi, pytest.mark.skipif("HPC_MOE_NODES" not in os.environ,
                                                    reason="needs real nodes (tests/test_cluster.py)")]
WORLD = MPI.COMM_WORLD


def expected_node_of_rank(size: int) -> list[int]:
    n = int(os.environ["HPC_MOE_NODES"])
    if os.environ.get("HPC_MOE_RANK_ORDER", "block") == "cyclic":
        return [r % n for r in range(size)]
    return [r // -(-size // n) for r in range(size)]


def test_nodes_are_the_hosts():
    ctx = ParallelContext.create(WORLD)
    assert list(ctx.node_of_rank) == expected_node_of_rank(ctx.size)
    assert ctx.hostnames[ctx.rank] == socket.gethostname() == f"node{ctx.node_id}"
    assert ctx.describe()["simulated_ranks_per_node"] is None
    ctx.free()


@pytest.mark.parametrize("scheme", ["flat", "hierarchical"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_engine_matches_reference(scheme, micro_batches):
    cfg = tiny_with_experts(WORLD.Get_size())
    engine = check_against_reference(cfg, EngineOptions(micro_batches=micro_batches,
                                                        dispatch=DispatchOptions(scheme=scheme)))
    assert engine.executor.channels[0].hierarchical == (scheme == "hierarchical")


def test_hierarchical_is_bitwise_flat_when_deterministic():
    """--deterministic: hierarchical on these nodes gives bitwise the logits of one process."""
    size = WORLD.Get_size()
    cfg = tiny_with_experts(2 * size)
    weights = SyntheticWeights(cfg, seed=7)
    be = get_backend("numpy")
    prompts = my_prompts(WORLD.Get_rank(), cfg.vocab_size)
    # The reference of one process serving exactly these prompts: the pairs form makes every
    # token's sum independent of where its experts ran.
    want = generate(Model(cfg, weights, be, deterministic=True), prompts, 3)
    ctx = ParallelContext.create(WORLD)
    engine = Engine(cfg, weights, be, ctx, options=EngineOptions(
        micro_batches=2, dispatch=DispatchOptions(deterministic=True, scheme="hierarchical")))
    got = generate(engine.model, prompts, 3, forward=engine.forward)
    for g, r in zip(got.prefill_logits, want.prefill_logits):
        np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    engine.close()
    ctx.free()
