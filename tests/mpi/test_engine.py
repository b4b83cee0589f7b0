"""The expert-parallel engine equals the single-process reference, on any number of ranks.

Run: mpiexec -n R python -m mpi4py -m pytest --with-mpi tests/mpi/test_engine.py (R = 1..16).
Every rank serves different sequences; each rank checks its own against the reference model
(all experts in one process), computed locally.
"""
import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.config import load_config
from hpc_moe.ep.dispatch import DispatchOptions
from hpc_moe.ep.engine import Engine, EngineOptions
from hpc_moe.model.generate import generate
from hpc_moe.model.transformer import Model
from hpc_moe.weights.synthetic import SyntheticWeights

pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD


def tiny_with_experts(n_experts: int):
    """The tiny preset with E experts (routing groups of 2 experts where E allows)."""
    n_group = max(1, n_experts // 4)
    return load_config("tiny").replace(n_routed_experts=n_experts, n_group=n_group,
                                       topk_group=max(1, n_group // 2),
                                       num_experts_per_tok=min(4, (n_experts // n_group) * max(1, n_group // 2)))


def expert_counts_for(size: int) -> dict:
    """E == R, E > R and E < R where a valid config exists (E >= 2)."""
    cases = {"E>R": 4 * size}
    if size >= 2:
        cases["E==R"] = size
    if size >= 4:
        cases["E<R"] = size // 2
    return cases


def my_prompts(rank: int, vocab: int):
    # Ragged prompts, a different number per rank; rank 1 has none (an empty rank still
    # takes part in every exchange).
    rng = np.random.default_rng(100 + rank)
    n = 0 if rank == 1 else 1 + rank % 3
    return [rng.integers(0, vocab, int(rng.integers(1, 9))) for _ in range(n)]


def check_against_reference(cfg, options: EngineOptions, dp=1, expert_tp=1, new_tokens=4, ranks_per_node=None):
    ctx = ParallelContext.create(WORLD, dp=dp, expert_tp=expert_tp, ranks_per_node=ranks_per_node)
    weights = SyntheticWeights(cfg, seed=7)
    be = get_backend("numpy")
    engine = Engine(cfg, weights, be, ctx, options=options)
    prompts = my_prompts(ctx.rank, cfg.vocab_size)
    got = generate(engine.model, prompts, new_tokens, forward=engine.forward)
    ref = generate(Model(cfg, weights, be), prompts, new_tokens)
    for g, r in zip(got.prefill_logits, ref.prefill_logits):
        assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max()
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    engine.close()
    ctx.free()
    return engine


@pytest.mark.parametrize("case", ["E>R", "E==R", "E<R"])
def test_generate_matches_reference(case):
    cases = expert_counts_for(WORLD.Get_size())
    if case not in cases:
        pytest.skip(f"no valid {case} config at {WORLD.Get_size()} ranks")
    engine = check_against_reference(tiny_with_experts(cases[case]), EngineOptions())
    assert engine.placement.colocated == (case == "E>R")
    assert engine.placement.replicated == (case == "E<R")


@pytest.mark.parametrize("micro_batches, algorithm", [(2, "alltoallv"), (3, "alltoallv"), (1, "pipelined")])
def test_overlap_and_pipelined_match_reference(micro_batches, algorithm):
    cfg = tiny_with_experts(max(2, WORLD.Get_size()))
    check_against_reference(cfg, EngineOptions(micro_batches=micro_batches,
                                               dispatch=DispatchOptions(algorithm=algorithm)))


@pytest.mark.parametrize("case", ["E>R", "E==R", "E<R"])
def test_hierarchical_dispatch_matches_reference(case):
    """Two-stage dispatch on 2 and 4 simulated nodes (auto picks it), with overlap, equals the
    single-process reference; the flat scheme on the same nodes too."""
    size = WORLD.Get_size()
    cases = expert_counts_for(size)
    if case not in cases:
        pytest.skip(f"no valid {case} config at {size} ranks")
    cfg = tiny_with_experts(cases[case])
    for n in (2, 4):
        if size % n or size == n:
            continue
        for scheme in ("auto", "flat"):
            engine = check_against_reference(cfg, EngineOptions(micro_batches=2, dispatch=DispatchOptions(scheme=scheme)),
                                             ranks_per_node=size // n)
            assert engine.executor.channels[0].hierarchical == (scheme == "auto")


def test_expert_tensor_parallel_and_data_parallel():
    size = WORLD.Get_size()
    cfg = tiny_with_experts(max(2, size))
    if size % 2 == 0:
        check_against_reference(cfg, EngineOptions(micro_batches=2), expert_tp=2)
        check_against_reference(cfg, EngineOptions(), dp=2)
    if size % 4 == 0:
        check_against_reference(cfg, EngineOptions(), dp=2, expert_tp=2)


def test_all_tokens_to_one_expert_group():
    from hpc_moe.model.router import SyntheticRouting
    cfg = tiny_with_experts(max(2, WORLD.Get_size()))
    ctx = ParallelContext.create(WORLD)
    be = get_backend("numpy")
    weights = SyntheticWeights(cfg, seed=7)
    synthetic = SyntheticRouting("one", seed=1)
    engine = Engine(cfg, weights, be, ctx, synthetic_routing=synthetic)
    ref = Model(cfg, weights, be, synthetic_routing=SyntheticRouting("one", seed=1))
    prompts = my_prompts(ctx.rank, cfg.vocab_size)
    engine.start_step()
    got = generate(engine.model, prompts, 3, forward=engine.forward)
    want = generate(ref, prompts, 3)
    for g, r in zip(got.prefill_logits, want.prefill_logits):
        assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max()
    counts = engine.step_stats().expert_tokens_ME
    assert (counts[:, cfg.num_experts_per_tok:] == 0).all()  # nobody else got a token
    engine.close()


def test_step_accounting_adds_up():
    cfg = tiny_with_experts(max(2, WORLD.Get_size()))
    ctx = ParallelContext.create(WORLD)
    engine = Engine(cfg, SyntheticWeights(cfg, seed=7), get_backend("numpy"), ctx)
    prompts = my_prompts(ctx.rank, cfg.vocab_size)
    engine.start_step()
    generate(engine.model, prompts, 1, forward=engine.forward)
    stats = engine.step_stats()
    counts = stats.expert_tokens_ME
    sent = np.zeros((ctx.ep_size, ctx.ep_size), np.int64)
    ctx.ep_comm.Allgather([stats.bytes_sent_P, MPI.INT64_T], [sent, MPI.INT64_T])
    tokens = WORLD.allreduce(sum(len(p) for p in prompts))
    assert counts.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert (counts.sum(axis=1) == tokens * cfg.num_experts_per_tok).all()
    assert sent.shape == (ctx.ep_size, ctx.ep_size) and (sent >= 0).all()
    if ctx.ep_size > 1:  # ranks with prompts sent rows to other ranks' experts
        assert (sent.sum() - np.trace(sent)) > 0
    engine.close()


def test_replacement_from_loads_keeps_outputs():
    size = WORLD.Get_size()
    cfg = tiny_with_experts(max(2, size // 2 if size >= 4 else 2 * size))
    ctx = ParallelContext.create(WORLD)
    be = get_backend("numpy")
    weights = SyntheticWeights(cfg, seed=7)
    engine = Engine(cfg, weights, be, ctx)
    prompts = my_prompts(ctx.rank, cfg.vocab_size)
    engine.start_step()
    before = generate(engine.model, prompts, 3, forward=engine.forward)
    engine.replan(engine.step_stats().expert_tokens_ME)
    after = generate(engine.model, prompts, 3, forward=engine.forward)
    for a, b in zip(before.prefill_logits, after.prefill_logits):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    np.testing.assert_array_equal(before.tokens, after.tokens)
    engine.close()


def test_cli_generate_writes_once_and_matches(tmp_path_factory):
    from hpc_moe.cli import main
    from hpc_moe.weights.checkpoint import save_checkpoint
    cfg = tiny_with_experts(max(2, WORLD.Get_size()))
    root = WORLD.bcast(str(tmp_path_factory.mktemp("gen")) if WORLD.Get_rank() == 0 else None)
    if WORLD.Get_rank() == 0:
        save_checkpoint(f"{root}/ckpt", cfg, SyntheticWeights(cfg, seed=3), shards=2)
        np.save(f"{root}/ids.npy", np.random.default_rng(0).integers(0, cfg.vocab_size, (5, 6)))
    WORLD.Barrier()
    assert main(["generate", "--checkpoint", f"{root}/ckpt", "--input-ids", f"{root}/ids.npy",
                 "--max-new-tokens", "3", "--output", f"{root}/out.npz", "--overlap", "on", "--micro-batches", "3"]) == 0
    WORLD.Barrier()
    if WORLD.Get_rank() == 0:
        out = np.load(f"{root}/out.npz")
        ids = np.load(f"{root}/ids.npy")
        ref = generate(Model(cfg, SyntheticWeights(cfg, seed=3), get_backend("numpy")), list(ids), 3)
        want = np.stack(ref.prefill_logits)
        assert out["prefill_logits"].shape == (5, 6, cfg.vocab_size)
        assert np.abs(out["prefill_logits"] - want).max() <= 1e-5 * np.abs(want).max()
        np.testing.assert_array_equal(out["tokens"], ref.tokens)


@pytest.mark.parametrize("case", ["E==R", "E<R", "E>R"])
def test_deterministic_logits_are_bitwise_the_reference(case):
    """--deterministic: every rank's logits are bitwise those of one process serving all the
    prompts (R = 1), whatever the rank count, placement (replicas, colocation), micro-batching
    and DP; with expert TP (a split reduction) within 1e-6."""
    size = WORLD.Get_size()
    n_experts = {"E==R": max(2, size), "E<R": max(2, size // 2), "E>R": 4 * size}[case]
    cfg = tiny_with_experts(n_experts)
    weights = SyntheticWeights(cfg, seed=7)
    be = get_backend("numpy")
    every = [my_prompts(r, cfg.vocab_size) for r in range(size)]
    ref = generate(Model(cfg, weights, be, deterministic=True), [p for ps in every for p in ps], 3)
    first = sum(len(ps) for ps in every[:WORLD.Get_rank()])
    mine = slice(first, first + len(every[WORLD.Get_rank()]))
    want = ref.prefill_logits[mine]
    layouts = [dict(micro_batches=m) for m in (1, 2, 3)] + [dict(dp=2)] * (size % 2 == 0) + \
        [dict(ranks_per_node=size // n, micro_batches=2) for n in (2, 4) if size % n == 0 and size > n]  # hierarchical
    for lay in layouts:
        ctx = ParallelContext.create(WORLD, dp=lay.get("dp", 1), ranks_per_node=lay.get("ranks_per_node"))
        options = EngineOptions(micro_batches=lay.get("micro_batches", 1), dispatch=DispatchOptions(deterministic=True))
        engine = Engine(cfg, weights, be, ctx, options=options)
        got = generate(engine.model, every[ctx.rank], 3, forward=engine.forward)
        for g, r in zip(got.prefill_logits, want):
            np.testing.assert_array_equal(g, r, err_msg=f"{case} {lay}")
        np.testing.assert_array_equal(got.tokens, ref.tokens[mine])
        engine.close()
        ctx.free()
    if size % 2 == 0 and n_experts % (size // 2) == 0:
        ctx = ParallelContext.create(WORLD, expert_tp=2)
        engine = Engine(cfg, weights, be, ctx, options=EngineOptions(dispatch=DispatchOptions(deterministic=True)))
        got = generate(engine.model, every[ctx.rank], 3, forward=engine.forward)
        for g, r in zip(got.prefill_logits, want):
            assert np.abs(g - r).max() <= 1e-6 * np.abs(r).max()
        engine.close()
        ctx.free()
