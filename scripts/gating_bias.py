"""What the aux-loss-free gating bias (`hpc-moe run --bias-update-rate R`) costs in outputs next to
what it buys in balance, on the same prompts and weights, at the rates given.

The bias is the seeds' "monitor per-expert load and adjust gating probabilities": after every step
each MoE layer's bias moves by R * sign(mean load - load) (hpc_moe.model.router.update_bias), which
steers the router's choice and so changes what the model computes. For each rate (and rate 0, the
model as its weights define it) this script, under mpiexec, on one expert-parallel engine:

1. learns the bias as `run` would: --adapt-steps prefill steps of fresh random prompts (the same
   prompts for every rate), the bias updated from each step's global expert counts;
2. routes held-out prompts (the same for every rate) with the learned bias, and counts on the very
   hidden states the model routed the tokens whose top-k set differs from the checkpoint's bias
   (``topk changed``), and the rank load max/mean of those tokens under the engine's placement
   (the same placement for every rate, so only the bias moves it);
3. generates --new-tokens greedy tokens of those prompts and compares them position by position
   with rate 0's (``token agreement``) and whole (``sequences identical``);
4. times the held-out prefill step --reps times, the rates interleaved so that the machine's drift
   falls on all alike, and reports the median and its ratio to rate 0's median of the same run.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python -m mpi4py \\
        scripts/gating_bias.py --config small --rates 0.001 0.01

Prints one Markdown table (docs/benchmarks.md) on rank 0. Bad arguments: a one-line error and exit 2
on every rank, before any collective.

Shape legend: M MoE layers, E routed experts, B prompts per rank, S prompt length, N new tokens.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.config import load_config
from hpc_moe.ep.engine import Engine
from hpc_moe.errors import InputError
from hpc_moe.model.generate import generate
from hpc_moe.model.kvcache import Batch
from hpc_moe.perf.balance import rank_load
from hpc_moe.weights.checkpoint import Checkpoint
from hpc_moe.weights.synthetic import SyntheticWeights


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", help="preset or config.json (synthetic weights of --seed)")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory: its config and weights instead")
    ap.add_argument("--seed", type=int, default=0, help="synthetic weights and the prompts")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.001, 0.01],
                    help="--bias-update-rate values to measure against rate 0")
    ap.add_argument("--adapt-steps", type=int, default=20, help="prefill steps that learn the bias")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts per rank")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated per prompt")
    ap.add_argument("--reps", type=int, default=7, help="timed held-out steps per rate")
    ap.add_argument("--ranks-per-node", type=int, default=None, help="simulate nodes of k consecutive ranks")
    a = ap.parse_args(argv)
    try:
        if a.checkpoint:
            a.weights = Checkpoint.open(a.checkpoint)
            a.cfg = a.weights.config
        else:
            a.cfg = load_config(a.config)
            a.weights = SyntheticWeights(a.cfg, a.seed)
    except (InputError, OSError) as e:
        ap.exit(2, f"gating_bias.py: error: {e}\n")
    bad = [f"--rates must be > 0 (rate 0 is always measured): {r}" for r in a.rates if not r > 0]
    bad += [f"{n} must be >= {lo}" for n, v, lo in [("--adapt-steps", a.adapt_steps, 1), ("--prompts", a.prompts, 1),
                                                   ("--prompt-len", a.prompt_len, 1), ("--new-tokens", a.new_tokens, 1),
                                                   ("--reps", a.reps, 1)] if v < lo]
    if a.prompt_len + a.new_tokens > a.cfg.max_position_embeddings:
        bad.append("--prompt-len + --new-tokens exceeds the config's max_position_embeddings")
    if bad:
        ap.exit(2, f"gating_bias.py: error: {bad[0]}\n")
    a.rates = [0.0] + sorted(set(a.rates))
    return a


def prompts(cfg, seed: int, rank: int, stream: int, n: int, length: int) -> list:
    """n int64 [S] prompts of this rank; the same for every rate (seeded by seed, rank, stream)."""
    rng = np.random.default_rng([seed, rank, stream])
    return list(rng.integers(0, cfg.vocab_size, (n, length)))


def set_biases(engine: Engine, biases: list) -> None:
    """Every MoE block's bias <- biases[m] (float32 [E], host)."""
    for block, b in zip(engine.model.moe_blocks(), biases):
        block.bias = engine.backend.asarray(b, dtype=np.float32)


def prefill(engine: Engine, ps: list) -> None:
    batch = Batch.prefill(ps)
    engine.forward(batch, engine.model.new_cache(len(ps), max(len(p) for p in ps)), last_only=True)


def learn(engine: Engine, base: list, rate: float, a) -> list:
    """The bias after --adapt-steps prefill steps updated at ``rate`` (as `run` updates it), float32 [E] per layer."""
    set_biases(engine, base)
    for step in range(a.adapt_steps if rate else 0):
        engine.start_step()
        prefill(engine, prompts(a.cfg, a.seed, engine.ctx.rank, 1 + step, a.prompts, a.prompt_len))
        engine.update_biases(engine.step_stats().expert_tokens_ME, rate)
    return [engine.backend.to_numpy(b.bias).copy() for b in engine.model.moe_blocks()]


def audit(engine: Engine, base: list, biases: list, held_out: list) -> tuple[float, float, np.ndarray]:
    """Held-out prefill under ``biases`` -> (share of routed tokens whose top-k differs from the
    checkpoint bias's, over all MoE layers and ranks; rank load max/mean; counts int64 [M, E])."""
    set_biases(engine, biases)
    blocks = engine.model.moe_blocks()
    for block, b in zip(blocks, base):
        block.reference_bias = engine.backend.asarray(b, dtype=np.float32)
    engine.start_step()
    prefill(engine, held_out)
    counts = engine.step_stats().expert_tokens_ME
    changed = np.array([sum(b.topk_changed for b in blocks), sum(b.topk_seen for b in blocks)], np.int64)
    engine.ctx.world.Allreduce(MPI.IN_PLACE, [changed, MPI.INT64_T])
    for block in blocks:
        block.reference_bias = None  # the timed steps route once, as `run` does
    return changed[0] / max(changed[1], 1), rank_load(engine.placement, counts.astype(np.float64)), counts


def timed(engine: Engine, held_out: list) -> float:
    """Wall seconds of one held-out prefill step, the slowest rank's (barriers on both sides)."""
    engine.ctx.world.Barrier()
    t0 = time.perf_counter()
    prefill(engine, held_out)
    engine.backend.synchronize()
    engine.ctx.world.Barrier()
    return time.perf_counter() - t0


def measure(a, ctx: ParallelContext) -> tuple[list, dict]:
    """Collective. -> (one dict per rate, rate 0 first: rate, drift (the largest |bias - checkpoint
    bias|), changed (top-k changed share), load (rank load max/mean), agree (greedy tokens equal to
    rate 0's, share), identical (sequences equal to rate 0's, share); {rate: wall seconds [reps]})."""
    cfg = a.cfg
    backend = get_backend("numpy", "float32")
    engine = Engine(cfg, a.weights, backend, ctx)
    base = [backend.to_numpy(b.bias).copy() for b in engine.model.moe_blocks()]
    held_out = prompts(cfg, a.seed, ctx.rank, 0, a.prompts, a.prompt_len)
    rows, tokens0 = [], None
    learned = {r: learn(engine, base, r, a) for r in a.rates}
    for r in a.rates:
        changed, load, _ = audit(engine, base, learned[r], held_out)
        set_biases(engine, learned[r])
        toks = generate(engine.model, held_out, a.new_tokens, forward=engine.forward).tokens
        tokens0 = toks if tokens0 is None else tokens0
        same = np.array([(toks == tokens0).sum(), toks.size, (toks == tokens0).all(axis=1).sum(), len(toks)], np.int64)
        ctx.world.Allreduce(MPI.IN_PLACE, [same, MPI.INT64_T])
        drift = max(float(np.abs(b - b0).max()) for b, b0 in zip(learned[r], base))
        rows.append(dict(rate=r, changed=changed, load=load, agree=same[0] / same[1], identical=same[2] / same[3],
                         drift=drift))
    walls = {r: [] for r in a.rates}
    for rep in range(a.reps + 1):  # the first round warms caches and is dropped
        for r in a.rates:
            set_biases(engine, learned[r])
            w = timed(engine, held_out)
            if rep:
                walls[r].append(w)
    engine.close()
    return rows, walls


def main(argv=None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    ctx = ParallelContext.create(ranks_per_node=a.ranks_per_node)
    rows, walls = measure(a, ctx)
    if ctx.rank == 0:
        cfg = a.cfg
        tokens = ctx.size * a.prompts * a.prompt_len
        t0 = np.median(walls[0.0])
        print(f"{a.checkpoint or a.config + ' (synthetic weights, seed ' + str(a.seed) + ')'}: "
              f"{cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}, {ctx.size} ranks, "
              f"{cfg.num_moe_layers} MoE layers; "
              f"bias learned over {a.adapt_steps} prefill steps; {tokens} held-out tokens, {a.new_tokens} greedy "
              f"tokens per prompt; medians of {a.reps} interleaved steps\n")
        print("| `--bias-update-rate` | max bias drift | top-k changed | greedy tokens agreeing | sequences identical "
              "| rank load max/mean | step ms (median) | input tok/s | tok/s vs rate 0 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            t = np.median(walls[row["rate"]])
            print(f"| {row['rate']:g} | {row['drift']:.3f} | {100 * row['changed']:.1f} % | {100 * row['agree']:.1f} % "
                  f"| {100 * row['identical']:.0f} % | {row['load']:.2f} | {1e3 * t:.0f} | {tokens / t:,.0f} "
                  f"| {t0 / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
