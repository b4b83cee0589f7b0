"""``hpc-moe bench layer``: one MoE layer forward over the EP group, phase by phase, next to the raw
Ialltoallv floor of the bytes it moves.

The layer is the engine's own code path (hpc_moe.model.moe.MoEBlock on the expert-parallel
executor): sigmoid gate and top-k, dispatch, SwiGLU experts (gate and up as one GEMM), combine; no
shared expert, random weights, routing by the gate. ``--experts`` equal to the rank count is one
expert per rank. Times are the max over ranks of one iteration, medians over iterations:
layer_ms is start to finish of the layer; the phases are the profiler's exclusive phase times
(``wait`` is time blocked on the network). With ``--ranks-per-node`` the layer runs on simulated
nodes (``--dispatch`` picks the scheme). With ``--micro-batches M`` the rank's tokens go in M parts
on M channels, as ``run --overlap on`` schedules them: every part's dispatch is posted before the
first part's experts run, so part i's exchanges fly under the experts of the others (polled between
them). Two floors, measured in the same run: floor_ms, a bare
Ialltoallv of the flat dispatch's bytes plus one of its combine's on the same transport; and
expert_floor_ms, this rank's expert GEMMs alone on the rows it received (all ranks at once, the
slowest sets it). layer_ms / (expert_floor_ms + floor_ms) is what the code adds to the machine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from hpc_moe.apps.bench_options import BenchLayerOptions
from hpc_moe.apps.benchkit import RawFloor, max_over_ranks, timed
from hpc_moe.apps.common import on_root
from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext, mpi_library
from hpc_moe.config import load_config
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.exchange import Received
from hpc_moe.ep.executor import ExpertParallelExecutor
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.errors import UsageError
from hpc_moe.model.moe import MoEBlock
from hpc_moe.outputs import check_output, write_json
from hpc_moe.timing import PHASES, Profiler
from hpc_moe.weights.synthetic import SyntheticWeights

LAYER_PHASES = ("gate", "dispatch", "expert", "combine", "wait")


def check(o: BenchLayerOptions) -> None:
    if min(o.tokens, o.hidden, o.inter, o.experts, o.topk, o.iters, o.micro_batches) < 1 or o.warmup < 0:
        raise UsageError("--tokens, --hidden, --inter, --experts, --topk, --micro-batches and --iters must be >= 1, "
                         "--warmup >= 0")
    if o.micro_batches > o.tokens:
        raise UsageError(f"--micro-batches {o.micro_batches} is more than --tokens {o.tokens}")
    if o.topk > o.experts:
        raise UsageError(f"--topk {o.topk} is more than --experts {o.experts}")
    if o.experts < 2:
        raise UsageError("--experts must be >= 2 (routing scores a group by its two best experts)")


def layer_config(o: BenchLayerOptions):
    """A one-layer model config of these shapes: one MoE layer, no shared expert, no group limit,
    weights normalised to sum 1 (scripts/torch_moe_layer.py builds its baseline from the same)."""
    return load_config("tiny").replace(
        hidden_size=o.hidden, moe_intermediate_size=o.inter, n_routed_experts=o.experts, num_experts_per_tok=o.topk,
        n_group=1, topk_group=1, n_shared_experts=0, norm_topk_prob=True, routed_scaling_factor=1.0,
        num_hidden_layers=1, first_k_dense_replace=0)


def run_bench_layer(o: BenchLayerOptions) -> int:
    check(o)
    ctx = ParallelContext.create(ranks_per_node=o.ranks_per_node)
    on_root(ctx, lambda: check_output(o.json, "--json"))
    be = get_backend(o.backend, o.dtype, ctx.local_rank)
    cfg = layer_config(o)
    weights = SyntheticWeights(cfg, o.seed)
    placement = ExpertPlacement.build(o.experts, ctx.ep_size, 1, ctx.node_of_ep_rank, layers=[0])
    options = DispatchOptions(transport=o.transport, payload=o.payload, deterministic=o.deterministic, scheme=o.dispatch)
    executor = ExpertParallelExecutor(cfg, weights, be, ctx, placement, options, [0], channels=o.micro_batches)
    flat = Dispatcher(ctx, placement, be, dataclasses.replace(options, scheme="flat"))
    block = MoEBlock(cfg, 0, weights, be, executor)
    x = be.asarray(np.random.default_rng([o.seed, ctx.rank]).standard_normal((o.tokens, o.hidden), np.float32))
    prof = Profiler(1, be.phase_clock(), ranges=be.phase_ranges())
    comm, sync = ctx.ep_comm, be.synchronize

    xs = [x[p[0]:p[-1] + 1] for p in np.array_split(np.arange(o.tokens), o.micro_batches)]
    inflight = []

    def poll():  # MPI progresses an exchange only inside a call
        for s in inflight:
            s.pending.progress()

    def layer():
        inflight[:] = []
        for i, x_m in enumerate(xs):
            inflight.append(block.start(x_m, prof, micro_batch=i, poll=poll))
        for s in inflight:
            s.pending.run_experts(poll=poll)
        return [block.finish(s) for s in inflight]

    if o.micro_batches > 1:  # once, untimed: the parts give the layer's answer for all the tokens
        whole = block.finish(block.start(x, prof))
        xp = be.xp
        got = xp.concatenate(layer())
        if not bool(xp.allclose(got, whole, rtol=1e-4, atol=1e-4 * float(xp.abs(whole).max()))):
            raise RuntimeError("bench layer: the micro-batched layer differs from the whole one")

    layer_s, phase_s, floor_s, expert_s, exchange = [], [], [], [], None
    for it in range(o.warmup + o.iters):
        prof.start_step()
        t, _ = timed(comm, sync, layer)
        if exchange is None:  # the bytes and rows of this routing, for the floors
            exchange = _last_exchange(executor, block, x, flat)
            floors = (RawFloor(exchange.transport, *exchange.dispatch),
                      RawFloor(exchange.transport, *exchange.combine))
        td, _ = timed(comm, sync, floors[0].run)
        tc, _ = timed(comm, sync, floors[1].run)
        te, _ = timed(comm, sync, lambda rec=exchange.received: executor.compute(0, rec, o.deterministic))
        if it >= o.warmup:
            layer_s.append(t)
            phase_s.append([prof.times_LP[0, PHASES.index(p)] for p in LAYER_PHASES])
            floor_s.append(td + tc)
            expert_s.append(te)
    layer_max = max_over_ranks(comm, layer_s)
    phase_max = max_over_ranks(comm, phase_s)
    floor_max = max_over_ranks(comm, floor_s)
    expert_max = max_over_ranks(comm, expert_s)
    result = {
        "impl": "hpc_moe (MoEBlock on the expert-parallel executor)",
        "config": {**o.__dict__, "world_size": ctx.size, "transport": executor.transport_name,
                   "mpi": mpi_library()},
        "layer_ms": 1e3 * float(np.median(layer_max)),
        "phases_ms": {p: 1e3 * float(np.median(phase_max[:, i])) for i, p in enumerate(LAYER_PHASES)},
        "floor_ms": 1e3 * float(np.median(floor_max)),
        "expert_floor_ms": 1e3 * float(np.median(expert_max)),
        "iters": o.iters,
    }
    if ctx.rank == 0:
        print(_table(result))
        if o.json:
            write_json(o.json, result)
    for f in floors:
        f.close()
    flat.close()
    executor.close()
    ctx.free()
    return 0


@dataclass(frozen=True)
class _Bytes:
    transport: object
    dispatch: tuple  # (send counts [P], recv counts [P], row bytes)
    combine: tuple
    received: Received  # a copy of the rows this rank computed


def _last_exchange(executor: ExpertParallelExecutor, block: MoEBlock, x, flat: Dispatcher) -> _Bytes:
    """The per-peer rows of this input's flat dispatch and combine and the rows this rank computes
    (one more exchange, outside timing, on a flat channel: the floor of either scheme)."""
    routing = block.route(x)
    ex = flat.post(0, x, routing.topk_idx_TK, routing.topk_weight_TK)
    rec = ex.received()
    rec = dataclasses.replace(rec, x_ND=rec.x_ND.copy())  # the receive buffer goes back to the pool
    ex.run_experts(lambda r: executor.compute(0, r, flat.options.deterministic))
    ex.wait()
    return _Bytes(flat.transport, (ex.send_counts_P, ex.recv_counts_P, ex.dispatch_row_bytes),
                  (ex.reply_counts_P, ex.back_counts_P, ex.hidden * ex.dtype.itemsize), rec)


def _table(r: dict) -> str:
    c = r["config"]
    lines = [(f"# hpc-moe bench layer: EP {c['world_size']}, {c['tokens']} tokens/rank, hidden {c['hidden']}, "
              f"inter {c['inter']}, top-{c['topk']} of {c['experts']}, {c['dtype']}, transport {c['transport']}, "
              f"dispatch {c['dispatch']}, {c['micro_batches']} micro-batch(es), "
              f"{c['iters']} iters (+{c['warmup']} warmup)"),
             f"{'phase':<12}{'median ms':>11}"]
    lines += [f"{p:<12}{v:>11.2f}" for p, v in r["phases_ms"].items()]
    lines.append(f"{'layer':<12}{r['layer_ms']:>11.2f}")
    lines.append(f"{'raw floor':<12}{r['floor_ms']:>11.2f}  (Ialltoallv of the dispatch + combine bytes)")
    lines.append(f"{'GEMM floor':<12}{r['expert_floor_ms']:>11.2f}  (the expert GEMMs alone on the received rows)")
    lines.append(f"layer / (GEMM floor + raw floor): {r['layer_ms'] / (r['expert_floor_ms'] + r['floor_ms']):.2f}")
    return "\n".join(lines)
