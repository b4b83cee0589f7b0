"""Online re-placement: the experts that change owner travel as non-blocking messages while a step
runs on the old placement, and arrive bitwise equal to the weights they were loaded from.

Run: mpiexec -n R python -m mpi4py -m pytest --with-mpi tests/mpi/test_migration.py (R = 1..8).
"""
import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.config import load_config
from hpc_moe.ep.engine import Engine, EngineOptions
from hpc_moe.ep.migration import moves
from hpc_moe.model.generate import generate
from hpc_moe.model.moe import ExpertWeights
from hpc_moe.weights.synthetic import SyntheticWeights

pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD


def test_experts_fetched_during_a_step_equal_the_loaded_ones_and_keep_outputs():
    cfg = load_config("tiny")
    ctx = ParallelContext.create(WORLD)
    be = get_backend("numpy")
    weights = SyntheticWeights(cfg, seed=5)
    engine = Engine(cfg, weights, be, ctx, options=EngineOptions(eplb="global"))
    rng = np.random.default_rng([4, ctx.rank])
    prompts = list(rng.integers(0, cfg.vocab_size, (2, 6)))
    before = generate(engine.model, prompts, 2, forward=engine.forward)
    # Built loads, the same on every rank: expert e weighs e^3, so the even placement must change.
    loads = np.tile(np.arange(cfg.n_routed_experts, dtype=np.float64) ** 3, (cfg.num_moe_layers, 1))
    old = engine.placement
    pending = engine.post_replan(loads)
    during = generate(engine.model, prompts, 2, forward=engine.forward)  # runs on the old placement
    record = engine.finish_replan(pending)
    after = generate(engine.model, prompts, 2, forward=engine.forward)
    todo = moves(old, engine.placement, engine.moe_layers)
    mine = [m for m in todo if m.dst == ctx.ep_rank]
    per_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * 4
    assert record.experts_received == len(mine) and record.bytes_received == len(mine) * per_expert
    assert record.bytes_sent == sum(m.src == ctx.ep_rank for m in todo) * per_expert
    assert record.fetch_s >= record.post_s + record.wait_s and min(record.post_s, record.wait_s) >= 0
    if 1 < ctx.ep_size < cfg.n_routed_experts:
        assert todo  # the built loads moved experts
    elif ctx.ep_size == cfg.n_routed_experts:  # one expert a rank whatever the placement: it keeps them
        assert not todo
    for m in todo:
        assert m.expert in old.local_experts(m.src, m.layer) and m.expert not in old.local_experts(m.dst, m.layer)
        assert m.expert in engine.placement.local_experts(m.dst, m.layer)
    ex = engine.executor
    for m in mine:  # what arrived is what the weights hold, bit for bit
        got = ex.experts[m.layer][ex.expert_ids[m.layer].index(m.expert)]
        ref = ExpertWeights.load(weights, be, f"model.layers.{m.layer}.mlp.experts.{m.expert}")
        np.testing.assert_array_equal(got.gate_up, ref.gate_up)
        np.testing.assert_array_equal(got.down, ref.down)
    for g in (during, after):
        np.testing.assert_array_equal(g.tokens, before.tokens)
        for a, b in zip(g.prefill_logits, before.prefill_logits):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    engine.close()
