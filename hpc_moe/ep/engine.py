"""The expert-parallel engine: the model on every rank, routed experts spread over the EP group.

Attention, dense layers and shared experts are data-parallel (each rank serves its own
sequences); each MoE layer sends every token to the ranks that own its experts and back
(dispatch.py). With ``micro_batches > 1`` a rank splits its sequences and overlaps one
micro-batch's all-to-all with another's attention, expert and shared-expert compute.

Shape legend: T tokens, D hidden, K top-k, Q (row, local expert) pairs computed here, E experts,
P EP ranks, M MoE layers.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from hpc_moe.backend import Backend
from hpc_moe.comm import ParallelContext
from hpc_moe.config import ModelConfig
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.model.kvcache import Batch, KVCache
from hpc_moe.model.layers import rms_norm
from hpc_moe.model.moe import ExpertWeights, MoEBlock, apply_experts
from hpc_moe.model.router import Routing, SyntheticRouting, update_bias
from hpc_moe.model.transformer import Model
from hpc_moe.timing import NullProfiler, Profiler

log = logging.getLogger("hpc_moe")


@dataclass(frozen=True)
class EngineOptions:
    """micro_batches: sequences of a step split in this many parts, overlapped when > 1;
    bias_update_rate: aux-loss-free gating bias adjustment per step (0: off; changes outputs);
    dispatch: algorithm / transport / payload of the all-to-all."""

    micro_batches: int = 1
    bias_update_rate: float = 0.0
    dispatch: DispatchOptions = DispatchOptions()


def load_expert(weights, backend: Backend, layer: int, e: int, tp_rank: int, tp: int) -> ExpertWeights:
    """Expert e of ``layer``, or its tensor-parallel shard: rows tp_rank/tp of gate/up, the
    matching columns of down (partial outputs of the shards sum to the expert's output)."""
    p = f"model.layers.{layer}.mlp.experts.{e}"
    gate, up, down = (weights.get(f"{p}.{n}_proj.weight") for n in ("gate", "up", "down"))
    cut = slice(tp_rank * gate.shape[0] // tp, (tp_rank + 1) * gate.shape[0] // tp)
    return ExpertWeights(*(backend.asarray(np.ascontiguousarray(a)) for a in (gate[cut], up[cut], down[:, cut])))


class ExpertParallelExperts:
    """Routed-expert executor over MPI: this rank runs its placement's experts for every rank.

    Also measures, per step, the tokens routed to each expert ([M, E], this rank's tokens) and the
    bytes this rank sent to each peer ([P], dispatch + combine).
    """

    def __init__(self, cfg: ModelConfig, weights, backend: Backend, ctx: ParallelContext,
                 placement: ExpertPlacement, options: DispatchOptions, moe_layers: list[int],
                 channels: int = 1):
        if cfg.moe_intermediate_size % ctx.expert_tp:
            raise ValueError(f"moe_intermediate_size {cfg.moe_intermediate_size} is not divisible by "
                             f"expert_tp {ctx.expert_tp}")
        self.cfg, self.weights, self.backend, self.ctx = cfg, weights, backend, ctx
        self.moe_layers = moe_layers
        self.moe_index = {layer: i for i, layer in enumerate(moe_layers)}
        # One dispatcher per micro-batch, each on its own duplicate of the EP communicator: a
        # dispatch posts its payload Ialltoallv only when its count exchange completes, which
        # happens at different times on different ranks; non-blocking collectives of one
        # communicator must start in the same order everywhere, those of different ones need not.
        self.dispatchers = [Dispatcher(ctx if i == 0 else dataclasses.replace(ctx, ep_comm=ctx.ep_comm.Dup()),
                                       placement, backend, options, logger=log if i == 0 else log.getChild("channel"))
                            for i in range(channels)]
        self.experts: dict[int, list[ExpertWeights]] = {}
        self.expert_ids: dict[int, list[int]] = {}
        self.set_placement(placement)
        self.start_step()

    @property
    def dispatcher(self) -> Dispatcher:
        return self.dispatchers[0]

    @property
    def placement(self) -> ExpertPlacement:
        return self.dispatcher.placement

    def close(self) -> None:
        """Release transports and the duplicated communicators. Collective."""
        for i, d in enumerate(self.dispatchers):
            d.close()
            if i:
                d.comm.Free()

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Adopt a new placement (collective in effect: every rank must adopt the same one);
        loads the experts this rank now owns. Outputs do not change."""
        tp, tp_rank = self.ctx.expert_tp, self.ctx.ep_rank % self.ctx.expert_tp
        for d in self.dispatchers:
            d.placement = placement
        held = {(layer, e): w for layer, ws in self.experts.items()
                for e, w in zip(self.expert_ids[layer], ws)}  # experts that stay are not reloaded
        self.expert_ids = {layer: placement.local_experts(self.ctx.ep_rank, layer) for layer in self.moe_layers}
        self.experts = {
            layer: [held.get((layer, e)) or load_expert(self.weights, self.backend, layer, e, tp_rank, tp)
                    for e in ids]
            for layer, ids in self.expert_ids.items()}

    def start_step(self) -> None:
        self.expert_tokens_ME = np.zeros((len(self.moe_layers), self.cfg.n_routed_experts), np.int64)
        self.bytes_sent_P = np.zeros(self.ctx.ep_size, np.int64)

    def _count(self, layer: int, routing: Routing) -> None:
        idx = self.backend.to_numpy(routing.topk_idx_TK).reshape(-1)
        self.expert_tokens_ME[self.moe_index[layer]] += np.bincount(idx, minlength=self.cfg.n_routed_experts)

    def _account(self, stats) -> None:
        self.bytes_sent_P += stats.send_bytes_P + stats.combine_send_bytes_P

    def run_local(self, layer: int, x_QD, local_expert_Q):
        """The expert GEMMs of the pairs this rank computes: [Q, D] -> [Q, D]."""
        return apply_experts(dict(enumerate(self.experts[layer])), x_QD, local_expert_Q)

    def __call__(self, layer: int, x_TD, routing: Routing, prof: Profiler):
        """Blocking: dispatch -> local experts -> combine. x [T, D] -> weighted expert sum [T, D]."""
        self._count(layer, routing)
        d = self.dispatcher
        if d.options.algorithm == "pipelined":
            t_expert = [0.0]

            def expert_fn(x_QD, le_Q):
                t = time.perf_counter()
                out = self.run_local(layer, x_QD, le_Q)
                self.backend.synchronize()
                prof.add(layer, "expert", t, time.perf_counter())
                t_expert[0] += time.perf_counter() - t
                return out

            t = time.perf_counter()
            y = d.exchange(x_TD, routing.topk_idx_TK, routing.topk_weight_TK, expert_fn, layer)
            # The pipelined exchange interleaves both directions: what is not expert work is
            # communication, booked as dispatch.
            prof.add_seconds(layer, "dispatch", max(0.0, time.perf_counter() - t - t_expert[0]))
            self._account(d.last_stats)
            return y
        with prof.phase(layer, "dispatch"):
            recv_x, pairs, handle = d.dispatch(x_TD, routing.topk_idx_TK, routing.topk_weight_TK, layer)
        with prof.phase(layer, "expert"):
            out = self.run_local(layer, pairs.gather(recv_x, self.backend), pairs.local_expert_Q)
        with prof.phase(layer, "combine"):
            y = d.combine(out, handle)
        self._account(handle.stats)
        return y

    def global_expert_tokens(self, comm: MPI.Comm) -> np.ndarray:
        """This step's tokens per expert summed over ``comm`` (the EP group): int64 [M, E] on
        every rank. Collective."""
        counts = np.zeros_like(self.expert_tokens_ME)
        comm.Allreduce([self.expert_tokens_ME, MPI.INT64_T], [counts, MPI.INT64_T])
        return counts

    def update_biases(self, model: Model, counts_ME: np.ndarray, rate: float) -> None:
        """The aux-loss-free rule on every MoE layer from this step's global counts."""
        for layer, m in self.moe_index.items():
            block = model.ffn[layer]
            new = update_bias(self.backend.to_numpy(block.bias), counts_ME[m], rate)
            block.bias = self.backend.asarray(new, dtype=np.float32)

    # ---- the overlapped schedule --------------------------------------------------------------
    def forward_overlapped(self, model: Model, batches: list[Batch], cache: KVCache):
        """Forward of micro-batches whose all-to-alls overlap each other's compute.

        Per MoE layer: attention(0), post dispatch(0), attention(1), post dispatch(1), ...; then
        per micro-batch: wait for its tokens, run the experts, post the combine and compute the
        shared expert while it flies. A combine is waited for only when that micro-batch's next
        attention needs it, so it overlaps the other micro-batches' work. Every rank runs the
        same number of micro-batches (some may be empty), so collectives match. -> logits per
        micro-batch, float32 [T_i, V].
        """
        prof = model.prof
        if len(batches) > len(self.dispatchers):
            raise ValueError(f"{len(batches)} micro-batches but {len(self.dispatchers)} dispatch channels")
        hs = [model.embed_tokens(b) for b in batches]
        ropes = [model.rope_for(b) for b in batches]
        combines: list = [None] * len(batches)  # (pending combine, h + shared) per micro-batch

        def progress():
            for c in combines:
                if c is not None:
                    c[0].test()

        def settle(i: int, layer: int):
            if combines[i] is not None:
                pending, base = combines[i]
                with prof.phase(layer, "wait"):
                    y = pending.wait()
                hs[i] = base + y
                combines[i] = None

        for layer in range(model.num_layers):
            block = model.ffn[layer]
            posted = []
            for i, b in enumerate(batches):
                settle(i, max(layer - 1, 0))
                hs[i] = model.attention(layer, hs[i], b, cache, ropes[i])
                if not isinstance(block, MoEBlock):
                    hs[i] = model.feed_forward(layer, hs[i])
                    continue
                x = rms_norm(hs[i], model.post_norm[layer], self.cfg.rms_norm_eps)
                with prof.phase(layer, "gate"):
                    routing = block.route(x)
                self._count(layer, routing)
                with prof.phase(layer, "dispatch"):
                    posted.append((x, self.dispatchers[i].dispatch_async(
                        x, routing.topk_idx_TK, routing.topk_weight_TK, layer)))
                progress()
            for i, (x, pending) in enumerate(posted):
                with prof.phase(layer, "wait"):
                    recv_x, pairs, handle = pending.wait()
                with prof.phase(layer, "expert"):
                    out = self.run_local(layer, pairs.gather(recv_x, self.backend), pairs.local_expert_Q)
                with prof.phase(layer, "combine"):
                    pc = self.dispatchers[i].combine_async(out, handle)
                self._account(handle.stats)
                progress()
                base = hs[i]
                if block.shared is not None:
                    with prof.phase(layer, "shared"):
                        base = base + block.shared(x)
                combines[i] = (pc, base)
                for _, later in posted[i + 1:]:
                    later.test()
        for i in range(len(batches)):
            settle(i, model.num_layers - 1)
        return [model.head(h) for h in hs]


def build_model(cfg: ModelConfig, weights, backend: Backend, ctx: ParallelContext, *,
                options: EngineOptions = EngineOptions(), num_layers: int | None = None,
                loads=None, synthetic_routing: SyntheticRouting | None = None,
                profiler: Profiler | None = None) -> tuple[Model, ExpertParallelExperts]:
    """The model of this rank with its expert-parallel executor. Collective over ctx.ep_comm.

    loads: expected tokens per expert (float [E]) for the placement's replicas and colocation;
    None places experts evenly.
    """
    n = cfg.num_hidden_layers if num_layers is None else num_layers
    moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
    placement = ExpertPlacement.build(cfg.n_routed_experts, ctx.ep_size, ctx.expert_tp,
                                      ctx.node_of_ep_rank, cfg.n_group, loads=loads,
                                      layers=moe_layers or None)
    if placement.colocated and ctx.rank == 0:
        log.warning("%d experts on %d expert slots: ranks hold several experts per layer, which breaks "
                    "the one-expert-per-GPU principle", cfg.n_routed_experts, placement.n_slots)
    executor = ExpertParallelExperts(cfg, weights, backend, ctx, placement, options.dispatch, moe_layers,
                                     channels=options.micro_batches)
    model = Model(cfg, weights, backend, experts=executor, num_layers=n,
                  profiler=profiler if profiler is not None else NullProfiler(n),
                  synthetic_routing=synthetic_routing)
    return model, executor


def forward(model: Model, executor: ExpertParallelExperts, batch: Batch, cache: KVCache,
            micro_batches: int = 1):
    """One step on this rank's sequences -> float32 logits [T, V] (host). Collective."""
    if micro_batches <= 1:
        return model.backend.to_numpy(model.forward(batch, cache))
    parts = executor.forward_overlapped(model, batch.split(micro_batches), cache)
    xp = model.backend.xp
    return model.backend.to_numpy(xp.concatenate(parts, axis=0))
