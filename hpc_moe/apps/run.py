"""The main job, ``hpc-moe run``: throughput of a workload on the expert-parallel engine.

Rank 0 draws every step's requests, assigns sequences to ranks (data-parallel attention), and
after each step gathers the ranks' phase timings, expert loads and traffic, appends them to the
trace and shows progress. Every rank runs every step and every MoE exchange, with or without
sequences of its own; its inputs (hpc_moe.apps.batches) are a function of the seed and the step's
index, so ``--resume`` (hpc_moe.apps.resume) continues a stopped or killed run where it ended.

Shape legend: R world ranks, P EP ranks, L layers, M MoE layers, E experts, F phases.
"""
from __future__ import annotations

import itertools
import logging
import time

import numpy as np
from mpi4py import MPI

from hpc_moe.apps.batches import StepInputs
from hpc_moe.apps.common import (
    loads_from_trace,
    on_root,
    open_weights,
    quiet_other_ranks,
    root_only,
    warn_shared_cores,
)
from hpc_moe.apps.options import RunOptions
from hpc_moe.apps.progress import Progress
from hpc_moe.apps.recording import open_recorder, placement_model, placement_ranks
from hpc_moe.apps.resume import ResumePoint, read_resume_point
from hpc_moe.apps.selftest import run_checks
from hpc_moe.apps.stop import StopRequest
from hpc_moe.apps.workload import Step, Workload, assign
from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.engine import Engine
from hpc_moe.errors import EXIT_STOPPED, UsageError
from hpc_moe.links import measure_links
from hpc_moe.model.router import SyntheticRouting
from hpc_moe.outputs import check_output, write_json
from hpc_moe.perf.footprint import GpuLoad, Layout, memory_per_gpu
from hpc_moe.timing import Profiler
from hpc_moe.trace.reader import read_trace
from hpc_moe.watchdog import Watchdog

log = logging.getLogger("hpc_moe")


def run_job(o: RunOptions) -> int:
    """The run job on every rank. Every rank checks the same inputs, so a bad one ends the job
    with the same one-line InputError everywhere, before any rank waits in a collective."""
    point = None
    if o.resume:  # the trace's options, checked on rank 0 before anything else
        point = root_only(MPI.COMM_WORLD, lambda: read_resume_point(o, MPI.COMM_WORLD.Get_size()))
        o = point.options
    ctx = ParallelContext.create(dp=o.layout.dp, expert_tp=o.layout.expert_tp,
                                 ranks_per_node=o.layout.ranks_per_node)
    quiet_other_ranks(ctx)

    def files() -> None:  # rank 0's outputs and the baseline it reads at the end: checked before any work
        if point is None:
            check_output(o.trace, "--trace")
        check_output(o.summary_json, "--summary-json")
        if o.baseline:
            read_trace(o.baseline)

    on_root(ctx, files)
    cfg, weights = open_weights(o)
    layers = o.layers or cfg.num_hidden_layers
    if not 1 <= layers <= cfg.num_hidden_layers:
        raise UsageError(f"--layers must be in [1, {cfg.num_hidden_layers}] (got {layers})")
    workload = Workload.create(o.mode, o.batch, o.seq_len, o.prefill_fraction, o.seed, cfg.max_position_embeddings)
    synthetic = SyntheticRouting.parse(o.routing, seed=o.seed, stream=ctx.rank)
    loads = None
    if o.loads_from and (point is None or point.loads_ME is None):
        loads = on_root(ctx, lambda: loads_from_trace(o.loads_from, layers, cfg))
    if point is not None:
        loads = point.placement_loads(ctx.node_of_rank, loads)
    backend = get_backend(o.layout.backend, o.layout.dtype, ctx.local_rank)
    _check_fits(cfg, layers, workload, ctx, backend)
    warn_shared_cores(ctx, backend)
    watchdog = Watchdog(ctx.world, o.watchdog, hosts=ctx.hostnames)
    prof = Profiler(layers, backend.phase_clock(), enabled=o.profile == "on", watchdog=watchdog,
                    ranges=backend.phase_ranges())
    options = o.layout.engine_options()
    links = None
    if o.probe_links == "on" and ctx.num_nodes > 1:
        with watchdog.waiting("the link measurement (ping-pong between nodes)"):
            links = measure_links(ctx)
    engine = Engine(cfg, weights, backend, ctx, options=options, num_layers=layers, loads=loads,
                    synthetic_routing=synthetic, profiler=prof, node_cost=links and links.node_cost(),
                    choose_policy=_policy_chooser(cfg, ctx, layers, backend, links, workload, options,
                                                  group_limited=synthetic is None, replan_every=o.replan_every))
    for line in run_checks(ctx, backend, engine.transport, o.layout.allow_shared_gpu):
        log.debug("selftest: %s", line)
    rank_map = ctx.world.gather({"host": ctx.hostnames[ctx.rank], "node": ctx.node_id, "gpu": backend.device_id,
                                 "device": backend.device, "machine": ctx.machines[ctx.rank]}, root=0)
    recorder = on_root(ctx, lambda: open_recorder(o, cfg, layers, ctx, backend, engine,
                                                   workload, rank_map, links, point), share=False)
    if ctx.rank == 0:
        _announce(cfg, layers, ctx, engine, workload, o, links, point)
    stop = StopRequest()
    # Installed to the end: Slurm signals each node's ranks on its own, and a rank it reaches after
    # the others have agreed to stop must not die of the signal's default action.
    with stop.installed():
        try:
            steps, stopped = _loop(o, ctx, engine, workload, backend, prof, recorder, watchdog, stop, point)
        except BaseException:
            if recorder is not None:
                recorder.close(failed=True)
            raise
        engine.close()
        watchdog.close()
        if ctx.rank == 0:
            recorder.close(stopped=stopped)
            if stopped:
                log.warning("stopped by %s after %d measured steps: the trace holds them",
                            stop.signal.name if stop.signal else "a signal to another rank", steps)
            _finish(o, recorder, steps)
        ctx.world.Barrier()  # the ranks leave together, once rank 0 has closed the trace and printed the summary
    return EXIT_STOPPED if stopped else 0


def _check_fits(cfg, layers: int, workload: Workload, ctx: ParallelContext, backend) -> None:
    """Refuse, before allocating, a model and workload that cannot fit this rank's memory: the
    replicated weights, this rank's share of the experts and the latent KV cache of its sequences
    (the largest batch spread over the ranks), in the compute dtype, as hpc_moe.perf.footprint
    counts them for ``plan`` (every rank alike; buffers and activations are left to the headroom)."""
    itemsize = backend.dtype.itemsize
    seqs = -(-workload.batch.upper() // ctx.size) + 1
    mem = memory_per_gpu(cfg, Layout(ctx.ep_size, ctx.dp_size, ctx.expert_tp), GpuLoad(seqs, workload.seq_len.upper() + 1, 0),
                         expert_dtype="dense", dense_bytes=itemsize, act_bytes=itemsize, layers=layers)
    need = int(mem["replicated_weights"] + mem["routed_experts"] + mem["kv_cache"])
    have = backend.free_bytes() // (1 if backend.is_gpu else ctx.local_size)
    verdict = ctx.world.allreduce(int(need > have), op=MPI.MAX)
    if verdict:
        raise UsageError(f"the model and workload need about {need / 2**30:.1f} GiB per rank (weights and KV cache) "
                         f"but {have / 2**30:.1f} GiB are free: truncate with --layers, lower --batch or --seq-len, "
                         f"or use more ranks")


def _policy_chooser(cfg, ctx: ParallelContext, layers: int, backend, links, workload: Workload, options,
                    group_limited: bool, replan_every: int = 0):
    """(loads [M, E], current placement or None) -> the candidate (hpc_moe.perf.balance) the planner
    predicts the fastest step for: every policy with --eplb auto, else the forced one; at a
    re-placement also the current placement kept, each step carrying the weights it moves over
    replan_every steps. On this backend's hardware file with the links measured at the start when
    there are some; rank 0 logs every candidate. The same on every rank. group_limited: the
    model's router picks the experts (synthetic routing ignores groups)."""
    from hpc_moe.ep.choices import POLICIES
    from hpc_moe.perf.balance import best, candidates, format_candidates
    from hpc_moe.perf.footprint import Layout
    from hpc_moe.perf.hardware import load_hardware

    hw = load_hardware("h100-sxm" if backend.is_gpu else "cpu-2core")
    if links is not None:
        hw = hw.with_links(links, "this run")
    nodes = len(set(ctx.node_of_ep_rank))
    layout = Layout(ctx.ep_size, ctx.dp_size, ctx.expert_tp, ctx.ep_size // nodes)
    scheme = options.dispatch.scheme
    two_stage = scheme == "hierarchical" or (scheme == "auto" and 1 < nodes < ctx.ep_size and ctx.expert_tp == 1)
    moe = [i for i in range(layers) if cfg.is_moe_layer(i)]

    def choose(loads_ME: np.ndarray, current=None):
        tokens = float(loads_ME.sum(axis=1).mean()) / cfg.num_experts_per_tok / ctx.size  # a GPU's, a step
        cands = candidates(cfg, hw, layout, ctx.node_of_ep_rank, loads_ME, layers=moe, tokens=max(tokens, 1.0),
                           mode="decode" if workload.mode == "decode" else "prefill",
                           sequences=max(1.0, workload.batch.upper() / ctx.size), context=workload.seq_len.upper(),
                           dispatch="hierarchical" if two_stage else "flat", micro_batches=options.micro_batches,
                           model_layers=layers, redundant=options.redundant_experts,
                           node_cost=links and links.node_cost(), group_limited=group_limited,
                           policies=POLICIES if options.eplb == "auto" else (options.eplb,), current=current,
                           replan_every=replan_every)
        chosen = best(cands)
        if ctx.rank == 0:
            log.info("--eplb %s: placements priced on %s (rank load = hottest slot / mean):\n%s", options.eplb,
                     hw.name, format_candidates(cands, chosen))
        return chosen

    return choose


# ---- the step loop -----------------------------------------------------------------------------
def _loop(o: RunOptions, ctx: ParallelContext, engine: Engine, workload: Workload, backend, prof: Profiler,
          recorder, watchdog: Watchdog, stop: StopRequest, point: ResumePoint | None) -> tuple[int, bool]:
    """Warm-up steps, then measured steps until --steps, --duration or a stop request; returns
    the measured steps this run added and whether a stop signal (to any rank) ended it. Resumed
    (``point``): the first run's warm-up, then its measured steps from the first one the trace
    lacks."""
    first = point.first_step if point else 0
    duration = point.duration_left if point else o.duration
    draws = itertools.chain(itertools.islice(workload.stream(), o.warmup), workload.stream(o.warmup + first))
    inputs = StepInputs(engine.model, o.seed)
    cumulative = point.total_ME.copy() if point else np.zeros((len(engine.moe_layers), engine.cfg.n_routed_experts), np.int64)
    progress = Progress(o.steps and o.steps - first, duration) if ctx.rank == 0 else None
    measured, started, index, recording, pending, why = first, time.perf_counter(), 0, 0.0, None, 0
    while not o.steps or measured < o.steps:
        warm = index < o.warmup
        if index == o.warmup:
            started = time.perf_counter()
        # The step's place in the workload stream: its requests, tokens and synthetic routing.
        drawn = index if warm else o.warmup + measured
        over = ctx.rank == 0 and not warm and bool(duration) and time.perf_counter() - started >= duration
        # Every rank learns of a stop signal any rank got, and all leave after the same step.
        with watchdog.waiting("the step's start (an Allreduce)"):
            why = ctx.world.allreduce(int(over) | 2 * (stop.signal is not None), op=MPI.BOR)
            if why:
                break
        watchdog.step = measured
        with watchdog.waiting("the step's requests from rank 0"):
            step, owner = _broadcast_step(ctx, next(draws) if ctx.rank == 0 else None)
        batch, cache = inputs.batch(step, owner, ctx.rank, drawn)
        engine.start_step(drawn)
        with watchdog.waiting("the barrier before the step"):
            ctx.world.Barrier()
        t0 = time.perf_counter()
        engine.forward(batch, cache, last_only=True)
        with watchdog.waiting("the device's queued work (kernels, NCCL transfers)"):
            backend.synchronize()
        mine = time.perf_counter() - t0
        inputs.restore(batch)
        with watchdog.waiting("the barrier after the step"):
            ctx.world.Barrier()
        wall = time.perf_counter() - t0
        with watchdog.waiting("the step's accounting (Allreduce, Gathers)"):
            counts, times, sent, exchange, loads = _gather_step(ctx, engine, prof, mine)
        if o.bias_update_rate:
            engine.update_biases(counts, o.bias_update_rate)
        index += 1
        if warm:
            continue
        cumulative += counts  # loads of measured steps only
        if pending is not None:  # this step ran while the moved experts travelled: the next one uses them
            with watchdog.waiting("the moved experts' weights (Isend/Irecv of a re-placement)"):
                _adopt(ctx, engine, pending, recorder, measured + 1)
            pending = None
        if o.replan_every and (measured + 1) % o.replan_every == 0 and measured + 2 < (o.steps or measured + 3):
            pending = engine.post_replan(cumulative)  # not where no step would use it
        t_rec = time.perf_counter()
        # The timeline only goes to a trace file (--trace none keeps just the summary's numbers).
        sample = o.trace is not None and bool(o.events_every) and measured % o.events_every == 0
        with watchdog.waiting("the timeline gather"):
            events = _gather_rows(ctx, prof.events_array()) if sample else None
            exchanges = _gather_rows(ctx, prof.exchanges_array()) if sample else None
        if ctx.rank == 0:
            recorder.append_step(step=measured, kind=step.kind, wall_time_s=wall,
                                 input_tokens=step.input_tokens, output_tokens=step.output_tokens,
                                 num_sequences=step.num_sequences, phase_time_s=times,
                                 expert_tokens=counts, bytes_sent=sent, exchange_time_s=exchange, **loads)
            if events is not None and len(events):
                recorder.append_events(step=measured, rank=events[:, 0], layer=events[:, 1],
                                       phase=events[:, 2], t_start_s=events[:, 3], t_end_s=events[:, 4])
            if exchanges is not None and len(exchanges):
                recorder.append_exchanges(step=measured, rank=exchanges[:, 0], layer=exchanges[:, 1],
                                          micro_batch=exchanges[:, 2], kind=exchanges[:, 3], t_start_s=exchanges[:, 4],
                                          t_post_s=exchanges[:, 5], t_done_s=exchanges[:, 6], blocked_s=exchanges[:, 7])
            recording += time.perf_counter() - t_rec
            progress.update(step, wall)
        measured += 1
    if pending is not None:  # a --duration run ended with transfers in flight: complete them, adopt nothing
        pending.fetch.wait()
    if progress is not None:
        progress.close()
        loop = time.perf_counter() - started
        log.info("%d steps in %.2f s; recording them took %.3f s (%.2f%%)", measured - first, loop, recording,
                 100 * recording / max(loop, 1e-9))
    return measured - first, bool(why & 2)


def _adopt(ctx: ParallelContext, engine: Engine, pending, recorder, step: int) -> None:
    """Wait for a re-placement's transfers, adopt it from measured step ``step`` on, and record it
    with the bytes moved (all ranks), the seconds from posting to done and those spent blocked
    posting them and in the wait (the slowest rank's each). Collective."""
    rec = engine.finish_replan(pending)
    moved = np.array([rec.experts_received, rec.bytes_received], np.int64)
    ctx.world.Allreduce(MPI.IN_PLACE, [moved, MPI.INT64_T])
    secs = np.array([rec.fetch_s, rec.post_s, rec.wait_s])
    ctx.world.Allreduce(MPI.IN_PLACE, [secs, MPI.DOUBLE], op=MPI.MAX)
    if ctx.rank == 0:
        recorder.append_placement(step=step, placement=placement_ranks(engine.placement), experts_moved=int(moved[0]),
                                  bytes_moved=int(moved[1]), fetch_time_s=float(secs[0]), post_time_s=float(secs[1]),
                                  wait_time_s=float(secs[2]))
    model = placement_model(engine.placement)
    log.info("from measured step %d: experts re-placed from the loads measured before the step ahead (%s; "
             "expected rank load %.2f); %d experts (%.1f MB) fetched during that step in %.3f s, %.3f s of it "
             "posting before it and %.3f s waiting after it", step, model["policy"], np.mean(model["modelled_rank_load"]),
             moved[0], moved[1] / 1e6, *secs)


def _broadcast_step(ctx: ParallelContext, step: Step | None) -> tuple[Step, np.ndarray]:
    """Rank 0's step and its sequence -> rank assignment, on every rank (one small Bcast)."""
    if ctx.rank == 0:
        lens = np.concatenate([step.prefill_lens, step.decode_ctx])
        # A prefill weighs its prompt, a decode its context: attention over it dominates its cost.
        owner = assign(lens + np.concatenate([np.zeros(len(step.prefill_lens), np.int64),
                                              np.ones(len(step.decode_ctx), np.int64)]), ctx.size)
        msg = np.concatenate([[len(step.prefill_lens), len(step.decode_ctx)], lens, owner]).astype(np.int64)
        n = np.array([len(msg)], np.int64)
    else:
        n = np.zeros(1, np.int64)
    ctx.world.Bcast([n, MPI.INT64_T], root=0)
    if ctx.rank != 0:
        msg = np.empty(int(n[0]), np.int64)
    ctx.world.Bcast([msg, MPI.INT64_T], root=0)
    a, b = int(msg[0]), int(msg[1])
    return Step(msg[2:2 + a], msg[2 + a:2 + a + b]), msg[2 + a + b:]


def _gather_step(ctx: ParallelContext, engine: Engine, prof: Profiler, step_s: float):
    """-> (expert tokens int64 [M, E] on every rank; on rank 0: phase times float64 [L, R, F],
    bytes sent int64 [R, R], exchange times float64 [L, R, 2, 2], and the trace's rank_tokens
    [M, R], nodes_reached [M, R, 3] and rank_time_s [R] (each rank's step_s) by name). Collective."""
    stats = engine.step_stats()
    counts, ex = stats.expert_tokens_ME, stats.exchanges
    times = np.empty((ctx.size,) + prof.times_LP.shape) if ctx.rank == 0 else None
    ctx.world.Gather([np.ascontiguousarray(prof.times_LP), MPI.DOUBLE], [times, MPI.DOUBLE], root=0)
    row = np.zeros(ctx.size, np.int64)  # this rank's EP peers sit at world ranks first + p
    first = ctx.dp_rank * ctx.ep_size
    row[first:first + ctx.ep_size] = ex.bytes_sent_P
    sent = np.empty((ctx.size, ctx.size), np.int64) if ctx.rank == 0 else None
    ctx.world.Gather([row, MPI.INT64_T], [sent, MPI.INT64_T], root=0)
    exchange = np.empty((ctx.size,) + prof.exchange_LK2.shape) if ctx.rank == 0 else None
    ctx.world.Gather([np.ascontiguousarray(prof.exchange_LK2), MPI.DOUBLE], [exchange, MPI.DOUBLE], root=0)
    received = np.empty((ctx.size, len(ex.received_M)), np.int64) if ctx.rank == 0 else None
    ctx.world.Gather([ex.received_M, MPI.INT64_T], [received, MPI.INT64_T], root=0)
    nodes = np.empty((ctx.size,) + ex.nodes_M3.shape, np.int64) if ctx.rank == 0 else None
    ctx.world.Gather([ex.nodes_M3, MPI.INT64_T], [nodes, MPI.INT64_T], root=0)
    own = np.empty(ctx.size) if ctx.rank == 0 else None
    ctx.world.Gather([np.array([step_s]), MPI.DOUBLE], [own, MPI.DOUBLE], root=0)
    if ctx.rank != 0:
        return counts, None, sent, None, None
    return (counts, times.transpose(1, 0, 2), sent, exchange.transpose(1, 0, 2, 3),
            {"rank_tokens": received.T, "nodes_reached": nodes.transpose(1, 0, 2), "rank_time_s": own})


def _gather_rows(ctx: ParallelContext, rows_NC: np.ndarray):
    """Every rank's records of this step (float64 [n, C], e.g. Profiler.events_array) -> float64
    [N, 1 + C] on rank 0 with the rank in column 0 (None elsewhere). Collective."""
    mine = np.concatenate([np.full((len(rows_NC), 1), ctx.rank, np.float64), rows_NC], axis=1)
    sizes = np.array(ctx.world.gather(mine.size, root=0) or [], np.int64)
    out = np.empty(int(sizes.sum()), np.float64) if ctx.rank == 0 else None
    ctx.world.Gatherv([mine.reshape(-1), MPI.DOUBLE], [out, (sizes, None), MPI.DOUBLE] if ctx.rank == 0 else None,
                      root=0)
    return out.reshape(-1, mine.shape[1]) if ctx.rank == 0 else None


# ---- rank 0: announcement, summary ------------------------------------------------------------
def _announce(cfg, layers, ctx, engine: Engine, workload, o: RunOptions, links, point: ResumePoint | None) -> None:
    if point is not None:
        log.info("resuming %s (%s) at measured step %d on %d ranks; experts placed %s", point.path,
                 {"running": "killed", "failed": "failed"}.get(point.after, "stopped"), point.first_step, ctx.size,
                 "evenly" if engine.placement.loads is None else "by the loads measured so far")
    log.info("%s: %d of %d layers%s, %d experts, top-%d; %d ranks on %s (EP %d x DP %d, expert TP %d)",
             o.checkpoint or o.config, layers, cfg.num_hidden_layers,
             " (truncated with --layers)" if layers < cfg.num_hidden_layers else "", cfg.n_routed_experts,
             cfg.num_experts_per_tok, ctx.size, _plural(ctx.num_nodes, "node"), ctx.ep_size, ctx.dp_size, ctx.expert_tp)
    if links is not None:
        cost = links.node_cost()
        log.info("links %s%s", links.describe(), "" if cost is None else
                 "; uneven: the heaviest experts on the nodes of cheapest links (cost " +
                 " ".join(f"{c:.2f}" for c in cost) + ")")
    if engine.placement.replicated:
        p = engine.placement
        log.info("%d expert slots for %d experts: %d replicas of the hottest experts",
                 p.n_slots, cfg.n_routed_experts, p.n_slots - cfg.n_routed_experts)
    log.info("workload %s; routing %s; %s, then %s", workload.label(), o.routing, _plural(o.warmup, "warm-up step"),
             _plural(o.steps, "step") if o.steps else f"{o.duration:g} s")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _finish(o: RunOptions, recorder, steps: int) -> None:
    from hpc_moe.trace.report import scaling_table, summary_json, summary_table
    trace = recorder.trace()
    print(summary_table(trace), flush=True)
    if o.summary_json:
        write_json(o.summary_json, summary_json(trace))
    if o.baseline:
        print("\n" + scaling_table([read_trace(o.baseline), trace]), flush=True)
    if o.trace is not None:
        log.info("trace: %s (%d steps)", o.trace, steps)
