"""The expert-parallel executor: this rank runs its placement's experts for every rank of the EP group.

``post(layer, x, routing)`` starts a dispatch on the micro-batch's channel and returns a pending whose
``run_experts`` computes the rows that arrived (local expert GEMMs, weighted per row unless the
combine is in the ``pairs`` form) and posts the combine, and whose ``finish`` waits for it. Each
micro-batch has its own channel: a duplicate of the EP communicator, because micro-batches' exchanges
are in flight at once and non-blocking collectives of one communicator must be started in the same
order on every rank (those of different communicators need not).

Shape legend: T tokens, D hidden, Q (row, local expert) pairs, N rows received, E experts, P EP ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hpc_moe.backend import Backend
from hpc_moe.comm import ParallelContext
from hpc_moe.config import ModelConfig
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.exchange import ExchangeRecord, MoEExchange, Received
from hpc_moe.ep.migration import ExpertFetch, moves
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.errors import UsageError
from hpc_moe.model.moe import ExpertWeights, Poll, apply_experts, weigh_pairs
from hpc_moe.model.router import Routing
from hpc_moe.timing import NullProfiler, Profiler
from hpc_moe.weights import names

log = logging.getLogger("hpc_moe")


@dataclass(frozen=True, eq=False)
class StepRecord:
    """A step's exchanges on this rank, folded from their ExchangeRecords: bytes_sent_P int64 [P]
    bytes to each EP peer (dispatch + combine); received_M int64 [M] token rows its experts
    received per MoE layer; nodes_M3 int64 [M, 3] per MoE layer its tokens, the nodes they
    reached in all and the most one reached."""

    bytes_sent_P: np.ndarray
    received_M: np.ndarray
    nodes_M3: np.ndarray

    @classmethod
    def empty(cls, moe_layers: int, ep_size: int) -> StepRecord:
        return cls(np.zeros(ep_size, np.int64), np.zeros(moe_layers, np.int64), np.zeros((moe_layers, 3), np.int64))

    def add(self, m: int, r: ExchangeRecord) -> None:
        """Fold in an exchange of MoE layer index m."""
        self.bytes_sent_P[:] += r.send_bytes_P  # the arrays accumulate; the record is frozen
        self.received_M[m] += r.rows_received
        self.nodes_M3[m, :2] += (r.tokens, r.nodes_reached)
        self.nodes_M3[m, 2] = max(self.nodes_M3[m, 2], r.most_nodes)


class ExpertParallelExecutor:
    """Routed experts over MPI; ``step``: the StepRecord of the exchanges since ``start_step``."""

    def __init__(self, cfg: ModelConfig, weights, backend: Backend, ctx: ParallelContext,
                 placement: ExpertPlacement, options: DispatchOptions, moe_layers: list[int], channels: int = 1):
        if cfg.moe_intermediate_size % ctx.expert_tp:
            raise UsageError(f"moe_intermediate_size {cfg.moe_intermediate_size} is not divisible by "
                             f"expert_tp {ctx.expert_tp}")
        self.cfg, self.weights, self.backend, self.ctx = cfg, weights, backend, ctx
        self.moe_layers = moe_layers
        self.channels = [Dispatcher(ctx, placement, backend, options, logger=log if i == 0 else log.getChild("channel"),
                                    duplicate=i > 0) for i in range(channels)]
        self._fetch_comm = ctx.ep_comm.Dup()  # experts' weights at re-placements, apart from the exchanges
        self.experts: dict[int, list[ExpertWeights]] = {}
        self.expert_ids: dict[int, list[int]] = {}
        self.set_placement(placement)
        self.start_step()

    @property
    def placement(self) -> ExpertPlacement:
        return self.channels[0].placement

    @property
    def transport_name(self) -> str:
        return self.channels[0].transport_name

    def close(self) -> None:
        """Close the channels (transports, duplicated and split communicators). Collective."""
        for d in self.channels:
            d.close()
        self._fetch_comm.Free()

    def post_placement(self, placement: ExpertPlacement) -> ExpertFetch:
        """Post the transfers of the experts that change owner under ``placement`` (the same on
        every rank); the current placement stays in force until ``set_placement(placement,
        fetch.wait()[0])``. Collective in effect: every EP rank must post the same re-placement."""
        held = {(layer, e): w for layer, ws in self.experts.items() for e, w in zip(self.expert_ids[layer], ws)}
        inter = self.cfg.moe_intermediate_size // self.ctx.expert_tp
        shapes = ((2 * inter, self.cfg.hidden_size), (self.cfg.hidden_size, inter))
        return ExpertFetch(self._fetch_comm, self.backend, held, moves(self.placement, placement, self.moe_layers),
                           shapes, self.channels[0].options.deterministic)

    def set_placement(self, placement: ExpertPlacement, fetched: dict | None = None) -> None:
        """Adopt a new placement (every rank must adopt the same one); of the experts this rank
        newly owns, those in ``fetched`` ((layer, expert) -> ExpertWeights, from post_placement)
        are taken as they are and the others loaded from the weights. Outputs do not change."""
        tp, tp_rank = self.ctx.expert_tp, self.ctx.ep_rank % self.ctx.expert_tp
        for d in self.channels:
            d.placement = placement
        held = {(layer, e): w for layer, ws in self.experts.items() for e, w in zip(self.expert_ids[layer], ws)}
        held.update(fetched or {})
        self.expert_ids = {layer: placement.local_experts(self.ctx.ep_rank, layer) for layer in self.moe_layers}
        self.experts = {
            layer: [held.get((layer, e)) or ExpertWeights.load(
                self.weights, self.backend, names.expert(layer, e), tp_rank, tp,
                self.channels[0].options.deterministic) for e in ids]
            for layer, ids in self.expert_ids.items()}

    def start_step(self) -> None:
        self.step = StepRecord.empty(len(self.moe_layers), self.ctx.ep_size)

    def post(self, layer: int, x_TD, routing: Routing, *, micro_batch: int = 0,
             prof: Profiler | None = None) -> PendingExchange:
        """Start the routed half of ``layer`` for x [T, D] on the micro-batch's channel. Collective."""
        if micro_batch >= len(self.channels):
            raise ValueError(f"micro-batch {micro_batch} but {len(self.channels)} dispatch channels")
        prof = prof or NullProfiler()
        with prof.phase(layer, "dispatch"):
            ex = self.channels[micro_batch].post(layer, x_TD, routing.topk_idx_TK, routing.topk_weight_TK, prof=prof)
        return PendingExchange(self, ex, micro_batch, prof)

    def compute(self, layer: int, rec: Received, pairs: bool, poll: Poll | None = None):
        """The reply rows of what arrived: weighted sum per row [N, D], or one row per pair [Q, D]."""
        out = apply_experts(self.experts[layer], rec.x_ND, rec.local_expert_Q, rec.row_Q, poll)
        return out if pairs else weigh_pairs(out, rec.row_Q, rec.weight_Q, rec.x_ND.shape[0], rec.x_ND.dtype, rec.out_ND)


class PendingExchange:
    """The routed half of one MoE layer of one micro-batch, in flight over MPI."""

    def __init__(self, executor: ExpertParallelExecutor, ex: MoEExchange, micro_batch: int, prof: Profiler):
        self._executor, self.exchange, self._mb, self._prof = executor, ex, micro_batch, prof
        self._ran = False

    def progress(self) -> bool:
        return self.exchange.progress()

    def run_experts(self, poll: Poll | None = None) -> None:
        """Wait for the rows, compute them, post the combine."""
        if self._ran:
            return
        self._ran = True
        ex, prof, layer = self.exchange, self._prof, self.exchange.layer

        def expert_fn(rec: Received):
            with prof.phase(layer, "expert"):
                return self._executor.compute(layer, rec, ex.pairs, poll)

        ex.run_experts(expert_fn)

    def finish(self):
        """-> the routed experts' weighted sum y_TD [T, D]."""
        self.run_experts()
        ex, prof, layer = self.exchange, self._prof, self.exchange.layer
        with prof.phase(layer, "combine"):
            y = ex.wait()
        e, rec = self._executor, ex.record()
        e.step.add(e.moe_layers.index(layer), rec)
        for kind, t in (("dispatch", rec.dispatch), ("combine", rec.combine)):
            prof.exchange(layer, self._mb, kind, t.t_start, t.t_post, t.t_done, t.blocked)
        return y
