"""The expert-parallel engine: the model on every rank, routed experts spread over the EP group.

:class:`Engine` owns what one rank runs: the model (attention, dense layers and shared experts,
data-parallel: each rank serves its own sequences), the expert-parallel executor (routed experts,
one per rank where the shapes allow), the parallel context and the profiler. The model runs the
micro-batch schedule; the engine builds it, accounts each step, re-places experts and closes.

Shape legend: T tokens, V vocabulary, M MoE layers, E experts, P EP ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.comm import ParallelContext
from hpc_moe.config import ModelConfig
from hpc_moe.ep.dispatch import DispatchOptions
from hpc_moe.ep.executor import ExpertParallelExecutor, StepRecord
from hpc_moe.ep.migration import ExpertFetch, FetchRecord
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.model.kvcache import Batch, KVCache
from hpc_moe.model.router import SyntheticRouting
from hpc_moe.model.transformer import Model
from hpc_moe.timing import NullProfiler, Profiler

log = logging.getLogger("hpc_moe")


@dataclass(frozen=True)
class EngineOptions:
    """micro_batches: a step's sequences in this many parts whose exchanges overlap each other's
    compute (1: no split); dispatch: algorithm / transport / payload / combine form / scheme;
    eplb: the placement policy for loads (hpc_moe.ep.choices.POLICIES) or "auto" (the engine's
    ``choose_policy`` picks one for each set of loads; without it, or without loads, DeepSeek's
    rule: hierarchical when the nodes divide the routing groups); redundant_experts: replicas
    beyond one per expert when experts are colocated."""

    micro_batches: int = 1
    dispatch: DispatchOptions = field(default_factory=DispatchOptions)
    eplb: str = "auto"
    redundant_experts: int = 0


@dataclass(frozen=True, eq=False)
class PendingPlacement:
    """A re-placement between Engine.post_replan and Engine.finish_replan."""

    placement: ExpertPlacement
    fetch: ExpertFetch


@dataclass(frozen=True, eq=False)
class StepStats:
    """One step's accounting: expert_tokens_ME int64 [M, E] tokens routed to each expert (all
    ranks, all replicas of the model: the same on every rank), and this rank's exchanges
    (hpc_moe.ep.executor.StepRecord: bytes to each EP peer, rows received, nodes reached)."""

    expert_tokens_ME: np.ndarray
    exchanges: StepRecord

    @property
    def bytes_sent_P(self) -> np.ndarray:
        return self.exchanges.bytes_sent_P


class Engine:
    """One rank of the expert-parallel engine. Construction and every method but ``forward``'s
    arguments are collective over the world: all ranks call them in the same order."""

    def __init__(self, cfg: ModelConfig, weights, backend: Backend, ctx: ParallelContext, *,
                 options: EngineOptions = EngineOptions(), num_layers: int | None = None, loads=None,
                 synthetic_routing: SyntheticRouting | None = None, profiler: Profiler | None = None,
                 node_cost=None, choose_policy=None):
        """loads: expected tokens per expert (float [E] or [M, E]) for the placement's replicas and
        colocation; None places experts evenly. node_cost: float per node, the relative cost of its
        links (hpc_moe.links.Links.node_cost), or None where the links are even. choose_policy:
        (loads float [M, E], current placement or None) -> the hpc_moe.perf.balance.Candidate to
        place them by (the same on every rank for the same loads; hpc_moe.apps.run prices the
        policies with the planner: every one with --eplb auto, the forced one otherwise): its
        policy places the first loads (with --eplb auto), its placement those of a re-placement
        (the current one kept and refined is a candidate too). Without it, a re-placement takes
        the policy's fresh placement."""
        n = cfg.num_hidden_layers if num_layers is None else num_layers
        self.cfg, self.backend, self.ctx, self.options = cfg, backend, ctx, options
        self.moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
        self._choose = choose_policy
        nodes = len(set(ctx.node_of_ep_rank))
        policy = options.eplb if options.eplb != "auto" else "hierarchical" if cfg.n_group % nodes == 0 else "global"
        if options.eplb == "auto" and choose_policy is not None and loads is not None and self.moe_layers:
            policy = choose_policy(np.broadcast_to(np.asarray(loads, np.float64),
                                                   (len(self.moe_layers), cfg.n_routed_experts)), None).policy
        placement = ExpertPlacement.build(cfg.n_routed_experts, ctx.ep_size, ctx.expert_tp, ctx.node_of_ep_rank,
                                          cfg.n_group, loads=loads, layers=self.moe_layers or None, policy=policy,
                                          redundant=options.redundant_experts, node_cost=node_cost)
        self.executor = ExpertParallelExecutor(cfg, weights, backend, ctx, placement, options.dispatch,
                                               self.moe_layers, channels=options.micro_batches)
        if placement.colocated and ctx.rank == 0 and placement.n_slots > 1:  # one process holds all: no news
            log.warning("%d experts on %d expert slots: ranks hold several experts per layer, which breaks "
                        "the one-expert-per-GPU principle", cfg.n_routed_experts, placement.n_slots)
        self.prof = profiler if profiler is not None else NullProfiler(n)
        self.model = Model(cfg, weights, backend, experts=self.executor, num_layers=n, profiler=self.prof,
                           synthetic_routing=synthetic_routing, deterministic=options.dispatch.deterministic)

    @property
    def placement(self) -> ExpertPlacement:
        return self.executor.placement

    @property
    def transport(self):
        """The first channel's transport (the others made the same choice): what the start-up
        self-test checks."""
        return self.executor.channels[0].transport

    @property
    def transport_name(self) -> str:
        """What moves the rows, as the trace names it (hpc_moe.ep.dispatch.Dispatcher.transport_name)."""
        return self.executor.transport_name

    def forward(self, batch: Batch, cache: KVCache, last_only: bool = False) -> np.ndarray:
        """One step on this rank's sequences -> float32 logits [T, V] (last_only: [B, V], each
        sequence's last position) on the host. Collective."""
        return self.backend.to_numpy(self.model.forward(batch, cache, self.options.micro_batches, last_only))

    def start_step(self, index: int | None = None) -> None:
        """Reset the per-step accounting (phase times, exchanges, expert counts, bytes). index:
        the step's place in the run's workload stream, which seeds its synthetic routing (so a
        resumed run routes step n as the first run did); None: continue from the last step."""
        self.prof.start_step()
        self.executor.start_step()
        for block in self.model.moe_blocks():
            block.reset_counts()
            if index is not None:  # a block routes once per micro-batch
                block.calls = index * self.options.micro_batches

    def step_stats(self) -> StepStats:
        """The accounting since start_step, reduced over the EP group and the model replicas."""
        counts = np.stack([b.counts_E for b in self.model.moe_blocks()]) if self.moe_layers \
            else np.zeros((0, self.cfg.n_routed_experts), np.int64)
        counts = np.ascontiguousarray(counts)
        self.ctx.world.Allreduce(MPI.IN_PLACE, [counts, MPI.INT64_T])
        return StepStats(counts, self.executor.step)

    def update_biases(self, expert_tokens_ME: np.ndarray, rate: float) -> None:
        """The aux-loss-free gating rule on every MoE layer from a step's global counts [M, E]."""
        for block, counts in zip(self.model.moe_blocks(), expert_tokens_ME):
            block.update_bias(counts, rate)

    def replan(self, loads_ME: np.ndarray) -> None:
        """Re-place experts from measured loads [M, E] (the same on every rank) now; outputs
        unchanged. With a chooser the placement is chosen again for these loads, the current one
        kept (refined) among the candidates."""
        self.finish_replan(self.post_replan(loads_ME))

    def post_replan(self, loads_ME: np.ndarray) -> PendingPlacement:
        """The placement for loads [M, E], its moved experts' transfers posted; the current one
        stays in force (run a step while they fly) until ``finish_replan``."""
        p, loads_ME = self.placement, np.asarray(loads_ME, np.float64)
        new = self._choose(loads_ME, p).placement if self._choose is not None else p.from_loads(loads_ME)
        return PendingPlacement(new, self.executor.post_placement(new))

    def finish_replan(self, pending: PendingPlacement) -> FetchRecord:
        """Wait for the transfers and adopt the placement; -> this rank's FetchRecord."""
        fetched, record = pending.fetch.wait()
        self.executor.set_placement(pending.placement, fetched)
        return record

    def close(self) -> None:
        self.executor.close()
