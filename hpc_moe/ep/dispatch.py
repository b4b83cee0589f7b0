"""MoE token dispatch and combine over MPI, as DeepEP does them: the Dispatcher of one EP channel.

The Dispatcher plans where rows go (each token's row once to every rank that runs one of its
experts, grouped by destination), packs them, and starts an :class:`~hpc_moe.ep.exchange.Exchange`
(one Ialltoallv per direction) or a :class:`~hpc_moe.ep.pipelined.PipelinedExchange` (per-peer
messages); hpc_moe.ep.exchange documents the phases of an exchange and the two forms of the
combine.

Legend: T tokens of this rank, K top-k, D hidden, P EP ranks, S expert slots, M rows sent,
C columns of a reduction table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.exchange import Exchange, ExpertFn, Plan
from hpc_moe.ep.pipelined import PipelinedExchange
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.transport import TRANSPORTS, make_transport
from hpc_moe.ep.wire import RowLayout, as_bytes
from hpc_moe.fp8 import fp8_quantize
from hpc_moe.rowops import take_rows
from hpc_moe.timing import NullProfiler, Profiler

ALGORITHMS = ("alltoallv", "pipelined")
PAYLOADS = ("native", "fp8")


@dataclass(frozen=True)
class DispatchOptions:
    """algorithm: "alltoallv" (one Ialltoallv per direction) | "pipelined" (per-peer messages,
    experts run as sources land); transport: "auto" | "host" | "cuda-aware" | "nccl"; payload:
    "native" (the compute dtype) | "fp8" (e4m3 + one float32 scale per 128 values; combine stays
    native); deterministic: combine in the placement-independent ``pairs`` form."""

    algorithm: str = "alltoallv"
    transport: str = "auto"
    payload: str = "native"
    deterministic: bool = False

    def __post_init__(self):
        for name, allowed in (("algorithm", ALGORITHMS), ("transport", TRANSPORTS), ("payload", PAYLOADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")


class Dispatcher:
    """Dispatch/combine of one EP channel: built once from (ctx, placement, backend, options);
    every exchange is collective over ``comm`` (default ``ctx.ep_comm``)."""

    def __init__(self, ctx: ParallelContext, placement: ExpertPlacement, backend: Backend,
                 options: DispatchOptions | None = None, comm: MPI.Comm | None = None, logger=None):
        if placement.ep_size != ctx.ep_size or placement.expert_tp != ctx.expert_tp:
            raise ValueError(f"placement is for ep_size {placement.ep_size}, expert_tp "
                             f"{placement.expert_tp}; the context has {ctx.ep_size}, {ctx.expert_tp}")
        self.placement, self.backend = placement, backend
        self.options = options or DispatchOptions()
        self.comm = ctx.ep_comm if comm is None else comm
        self.rank, self.size, self.tp = ctx.ep_rank, ctx.ep_size, ctx.expert_tp
        self.transport = make_transport(self.comm, backend, self.options.transport,
                                        need_p2p=self.options.algorithm == "pipelined", logger=logger)
        self._seq = 0  # pipelined exchanges posted, for message tags: the same on every rank

    def next_tags(self) -> int:
        """The first of 4 message tags no exchange in flight on this channel uses (the same on
        every rank: exchanges are posted in the same order everywhere)."""
        self._seq += 1
        return 4 * (self._seq % 4096)

    def local_experts(self, layer: int | None = None) -> list[int]:
        return self.placement.local_experts(self.rank, layer)

    def meta_layout(self, hidden: int, topk: int) -> RowLayout:
        if self.options.payload == "fp8":
            return RowLayout.of(local=4 * topk, weight=4 * topk, scale=4 * -(-hidden // 128))
        return RowLayout.of(local=4 * topk, weight=4 * topk)

    def post(self, layer: int | None, x_TD, topk_idx_TK, topk_weight_TK, prof: Profiler | None = None) -> Exchange:
        """Start an exchange: x [T, D] compute dtype, topk_idx_TK int [T, K] global expert ids
        (-1: none), topk_weight_TK float32 [T, K]. Collective over the channel. prof: where the
        time blocked in waits (phase "wait") and the combine's local work (phase "combine") go."""
        cls = PipelinedExchange if self.options.algorithm == "pipelined" else Exchange
        return cls(self, layer, x_TD, topk_idx_TK, topk_weight_TK, prof or NullProfiler())

    def exchange(self, layer: int | None, x_TD, topk_idx_TK, topk_weight_TK, expert_fn: ExpertFn):
        """Blocking post -> run_experts(expert_fn) -> wait: y_TD [T, D]."""
        ex = self.post(layer, x_TD, topk_idx_TK, topk_weight_TK)
        ex.run_experts(expert_fn)
        return ex.wait()

    def close(self) -> None:
        self.transport.close()

    def pack(self, plan: Plan, x_TD, weight_TK: np.ndarray, layout: RowLayout):
        """The send buffers: token rows [M, row bytes] by one contiguous take, and metadata rows
        [M, layout.width] (local expert id and weight per k, FP8 scales). Give both back with
        transport.release() once sent."""
        xp, tr = self.backend.xp, self.transport
        m = len(plan.token_M)
        tok = plan.token_M if xp is np else xp.asarray(plan.token_M)
        meta = tr.scratch(m, layout.width)
        weight_MK = np.where(plan.local_MK >= 0, weight_TK[plan.token_M], 0).astype(np.float32)
        fields = {"local": xp.asarray(plan.local_MK), "weight": xp.asarray(weight_MK)}
        if self.options.payload == "fp8":
            q_TD, scale_TB = fp8_quantize(xp, x_TD)
            rows = take_rows(xp, q_TD.view(np.uint8), tok, tr.scratch(m, x_TD.shape[1]))
            fields["scale"] = scale_TB[tok]
        else:
            rows = take_rows(xp, as_bytes(xp, x_TD), tok, tr.scratch(m, x_TD.shape[1] * x_TD.itemsize))
        layout.pack_into(xp, meta, **fields)
        return rows, meta

    def plan(self, layer, topk_TK: np.ndarray) -> Plan:
        """Routing -> send layout (host, vectorised). Rows go to every rank of each slot a token
        uses, once per rank; pairs come back in (row, k) order."""
        t, k = topk_TK.shape
        p, tp = self.size, self.tp
        s = p // tp
        valid = topk_TK >= 0
        e_TK = np.where(valid, topk_TK, 0)
        slot_TK = np.where(valid, self.placement.route(e_TK, self.rank, layer), s)  # s: a dummy column
        local_TK = np.where(valid, self.placement.local_index_table(layer)[np.minimum(slot_TK, s - 1), e_TK], -1)
        in_slot_TS = np.zeros((t, s + 1), dtype=bool)
        in_slot_TS[np.arange(t)[:, None], slot_TK] = True
        dest_M, token_M = np.nonzero(np.repeat(in_slot_TS[:, :s], tp, axis=1).T)  # sorted by (dest, t)
        local_MK = np.where(slot_TK[token_M] == (dest_M // tp)[:, None], local_TK[token_M], -1).astype(np.int32)
        m_B, k_B = np.nonzero(local_MK >= 0)
        pair_index_TC = np.full((t, k * tp), len(m_B), dtype=np.int64)
        pair_index_TC[token_M[m_B], k_B * tp + dest_M[m_B] % tp] = np.arange(len(m_B))
        n_nodes = max(self.placement.node_of_rank) + 1
        token_node = np.unique(token_M * n_nodes + np.asarray(self.placement.node_of_rank, np.int64)[dest_M])
        nodes_T = np.bincount(token_node // n_nodes, minlength=t).astype(np.int64)
        return Plan(token_M.astype(np.int64), local_MK, np.bincount(dest_M, minlength=p).astype(np.int64),
                     np.bincount(dest_M[m_B], minlength=p).astype(np.int64), pair_index_TC, nodes_T)
