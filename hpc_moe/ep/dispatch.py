"""MoE token dispatch and combine over MPI, as DeepEP does them: the Dispatcher of one EP channel.

The Dispatcher plans where rows go (each token's row once to every rank that runs one of its
experts, grouped by destination), packs them, and starts an :class:`~hpc_moe.ep.exchange.Exchange`
(one Ialltoallv per direction), a :class:`~hpc_moe.ep.pipelined.PipelinedExchange` (per-peer
messages) or, across nodes, a :class:`~hpc_moe.ep.hierarchical.HierarchicalExchange` (each token
crosses to a node once); hpc_moe.ep.exchange documents the phases of an exchange and the two
forms of the combine.

Legend: T tokens of this rank, K top-k, D hidden, P EP ranks, S expert slots, M rows sent,
C columns of a reduction table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.channel import Channel
from hpc_moe.ep.choices import ALGORITHMS, PAYLOADS, SCHEMES, TRANSPORTS
from hpc_moe.ep.exchange import Exchange, ExpertFn, MoEExchange
from hpc_moe.ep.hierarchical import HierarchicalExchange
from hpc_moe.ep.pipelined import PipelinedExchange
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.plan import NodeMap, Plan
from hpc_moe.ep.shm_exchange import ShmExchange
from hpc_moe.ep.transport import ShmTransport
from hpc_moe.ep.wire import RowLayout, as_bytes
from hpc_moe.errors import UsageError
from hpc_moe.fp8 import fp8_quantize
from hpc_moe.rowops import take_rows
from hpc_moe.timing import NullProfiler, Profiler


@dataclass(frozen=True)
class DispatchOptions:
    """algorithm: "alltoallv" (one Ialltoallv per direction) | "pipelined" (per-peer messages,
    experts run as sources land); transport: one of ep.choices.TRANSPORTS; payload:
    "native" (the compute dtype) | "fp8" (e4m3 + one float32 scale per 128 values; combine stays
    native); deterministic: combine in the placement-independent ``pairs`` form; scheme: "flat"
    (one exchange over the EP group), "hierarchical" (each token crosses to a node once:
    hpc_moe.ep.hierarchical) or "auto" (hierarchical when there is more than one node and the
    layout allows it)."""

    algorithm: str = "alltoallv"
    transport: str = "auto"
    payload: str = "native"
    deterministic: bool = False
    scheme: str = "auto"

    def __post_init__(self):
        for name, allowed in (("algorithm", ALGORITHMS), ("transport", TRANSPORTS), ("payload", PAYLOADS),
                              ("scheme", SCHEMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")


def _hierarchical(o: DispatchOptions, nodes: NodeMap, expert_tp: int) -> bool:
    """Whether to run the two-stage exchange; "hierarchical" asked for where it cannot run is an
    input error (every rank sees the same layout, so every rank raises alike)."""
    if o.scheme == "flat":
        return False
    why = ("there is one node" if nodes.n_nodes == 1 else
           nodes.unusable if nodes.unusable is not None else
           "expert_tp > 1" if expert_tp > 1 else
           "the pipelined algorithm is flat" if o.algorithm == "pipelined" else None)
    if why is not None and o.scheme == "hierarchical":
        raise UsageError(f"--dispatch hierarchical cannot run here: {why}")
    # With one rank per node there is nothing to forward inside a node: auto stays flat.
    return why is None and (o.scheme == "hierarchical" or len(nodes.node_P) > nodes.n_nodes)


class Dispatcher:
    """Dispatch/combine on one channel (hpc_moe.ep.channel): built once from (ctx, placement,
    backend, options); every exchange is collective over the channel's communicator. comm: the
    EP group's (default ``ctx.ep_comm``), duplicated when ``duplicate``; channel: an open channel
    to use instead (a stage of the two-stage exchange: its owner closes it)."""

    def __init__(self, ctx: ParallelContext, placement: ExpertPlacement, backend: Backend,
                 options: DispatchOptions | None = None, comm: MPI.Comm | None = None, logger=None, *,
                 duplicate: bool = False, channel: Channel | None = None):
        if placement.ep_size != ctx.ep_size or placement.expert_tp != ctx.expert_tp:
            raise ValueError(f"placement is for ep_size {placement.ep_size}, expert_tp "
                             f"{placement.expert_tp}; the context has {ctx.ep_size}, {ctx.expert_tp}")
        self.placement, self.backend = placement, backend
        self.options = options or DispatchOptions()
        self.tp = ctx.expert_tp
        # The placement's node map, not the context's: the placement is what routing follows.
        self.nodes = NodeMap.of(placement.node_of_rank)
        self.hierarchical = _hierarchical(self.options, self.nodes, ctx.expert_tp) if channel is None else False
        self._owns_channel = channel is None
        self.channel = channel or Channel.open(
            ctx.ep_comm if comm is None else comm, backend, self.options.transport,
            need_p2p=self.options.algorithm == "pipelined", duplicate=duplicate,
            nodes=self.nodes if self.hierarchical else None, logger=logger)
        self.comm, self.transport = self.channel.comm, self.channel.transport
        self.rank, self.size = self.channel.rank, self.channel.size
        self.rail = self.node = None
        if self.hierarchical:  # the stages: a rail (same local index, across nodes) and the node
            self.node_id, self.local_index = int(self.nodes.node_P[self.rank]), int(self.nodes.local_P[self.rank])
            flat = dataclasses.replace(self.options, scheme="flat")
            self.rail = Dispatcher(ctx, placement, backend, flat, channel=self.channel.rail)
            self.node = Dispatcher(ctx, placement, backend, flat, channel=self.channel.node)

    @property
    def transport_name(self) -> str:
        """The transport's name; with the two-stage exchange, the rails' and the nodes' when they
        differ (on a real cluster: host across nodes, shm inside)."""
        if self.hierarchical and self.rail.transport.name != self.node.transport.name:
            return f"{self.rail.transport.name} across nodes, {self.node.transport.name} inside"
        return (self.node if self.hierarchical else self).transport.name

    def next_tags(self) -> int:
        return self.channel.next_tags()

    def local_experts(self, layer: int | None = None) -> list[int]:
        return self.placement.local_experts(self.rank, layer)

    def post(self, layer: int | None, x_TD, topk_idx_TK, topk_weight_TK, prof: Profiler | None = None) -> MoEExchange:
        """Start an exchange: x [T, D] compute dtype, topk_idx_TK int [T, K] global expert ids
        (-1: none), topk_weight_TK float32 [T, K]. Collective over the channel. prof: where the
        time blocked in waits (phase "wait") and the combine's local work (phase "combine") go."""
        cls = HierarchicalExchange if self.hierarchical else self.flat_kind
        return cls.post(self, layer, x_TD, topk_idx_TK, topk_weight_TK, prof or NullProfiler())

    @property
    def flat_kind(self) -> type[Exchange]:
        """The one-stage exchange on this channel: per-peer messages (pipelined), rows written into
        shared memory (a shm transport), or one Ialltoallv per direction."""
        if self.options.algorithm == "pipelined":
            return PipelinedExchange
        return ShmExchange if isinstance(self.transport, ShmTransport) else Exchange

    def exchange(self, layer: int | None, x_TD, topk_idx_TK, topk_weight_TK, expert_fn: ExpertFn):
        """Blocking post -> run_experts(expert_fn) -> wait: y_TD [T, D]."""
        ex = self.post(layer, x_TD, topk_idx_TK, topk_weight_TK)
        ex.run_experts(expert_fn)
        return ex.wait()

    def close(self) -> None:
        """Close the channel this dispatcher opened (collectively); one it was given stays open."""
        if self._owns_channel:
            self.channel.close()

    def pack(self, plan: Plan, x_TD, weight_TK: np.ndarray, layout: RowLayout):
        """The send buffers: token rows [M, row bytes] by one contiguous take, and metadata rows
        [M, layout.width] (local expert id and weight per k, FP8 scales). Give both back with
        transport.release() once sent."""
        xp = self.backend.xp
        src_TW, scale_TB = self.payload(x_TD)
        tok = plan.token_M if xp is np else xp.asarray(plan.token_M)
        rows = take_rows(xp, src_TW, tok, self.transport.scratch(len(plan.token_M), src_TW.shape[1]))
        return rows, self.metadata(plan, weight_TK, layout, scale_TB)

    def payload(self, x_TD):
        """x [T, D] compute dtype -> (its rows as they travel: uint8 [T, row bytes], and with the
        FP8 payload the float32 scales [T, D / 128] that go in the metadata, else None)."""
        xp = self.backend.xp
        if self.options.payload == "fp8":
            q_TD, scale_TB = fp8_quantize(xp, x_TD)
            return q_TD.view(np.uint8), scale_TB
        return as_bytes(xp, x_TD), None

    def metadata(self, plan: Plan, weight_TK: np.ndarray, layout: RowLayout, scale_TB=None):
        """The metadata rows of the plan's sent rows, uint8 [M, layout.width] (a transport scratch
        buffer: give it back with transport.release())."""
        xp = self.backend.xp
        meta = self.transport.scratch(len(plan.token_M), layout.width)
        weight_MK = np.where(plan.local_MK >= 0, weight_TK[plan.token_M], 0).astype(np.float32)
        fields = {"local": xp.asarray(plan.local_MK), "weight": xp.asarray(weight_MK)}
        if scale_TB is not None:
            fields["scale"] = scale_TB[plan.token_M if xp is np else xp.asarray(plan.token_M)]
        layout.pack_into(xp, meta, **fields)
        return meta
