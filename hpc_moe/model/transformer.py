"""The DeepSeek-V3 transformer, readable top to bottom.

    embed -> [x + MLA(norm(x)); x + (dense MLP | MoE)(norm(x))] x layers -> norm -> lm_head

One class serves the single-process reference and every rank of the expert-parallel engine, and
runs the micro-batch schedule itself (one micro-batch is the plain case): the engine passes its
own expert executor and the subset of layers' weights each rank loads is the
same (attention, dense and shared experts are replicated; routed experts live in the executor).

Shape legend: T tokens of a packed ragged batch, D hidden, V vocabulary, B sequences.
"""
from __future__ import annotations

import numpy as np

from hpc_moe.backend import Backend
from hpc_moe.config import ModelConfig
from hpc_moe.model.kvcache import Batch, KVCache
from hpc_moe.model.layers import MLA, MLAWeights, Rope, linear, rms_norm
from hpc_moe.model.moe import ExpertExecutor, ExpertWeights, LocalExperts, MoEBlock
from hpc_moe.model.router import SyntheticRouting
from hpc_moe.timing import NullProfiler, Profiler
from hpc_moe.weights import names


def load_mla(cfg: ModelConfig, weights, backend: Backend, layer: int) -> MLAWeights:
    p = names.attention(layer)

    def get(name):
        return backend.asarray(weights.get(f"{p}.{name}.weight"))

    lora = cfg.q_lora_rank is not None
    kv_b = get("kv_b_proj")
    heads = kv_b.reshape(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    return MLAWeights(
        q_proj=None if lora else get("q_proj"),
        q_a_proj=get("q_a_proj") if lora else None,
        q_a_layernorm=get("q_a_layernorm") if lora else None,
        q_b_proj=get("q_b_proj") if lora else None,
        kv_a_proj_with_mqa=get("kv_a_proj_with_mqa"),
        kv_a_layernorm=get("kv_a_layernorm"),
        kv_b_proj=kv_b,
        o_proj=get("o_proj"),
        w_uk=heads[:, :cfg.qk_nope_head_dim].copy(),
        w_uv=heads[:, cfg.qk_nope_head_dim:].copy(),
    )


class Model:
    """DeepSeek-V3 forward over ragged batches with a latent KV cache.

    weights: any source with ``get(hf_name) -> float32 ndarray`` (a checkpoint or synthetic);
    experts: the routed-expert executor (default: all experts in this process);
    num_layers: run only the first N layers (then the final norm and head), for machines that
    cannot hold the model; profiler: where phase times go (default: nowhere); synthetic_routing:
    replaces the router's decisions (benchmarks of the dispatch path; changes the outputs);
    deterministic: row-independent GEMMs and per-sequence decode attention, so that a sequence's logits
    do not depend on which other sequences share its batch (bitwise, on the CPU).
    """

    def __init__(self, cfg: ModelConfig, weights, backend: Backend,
                 experts: ExpertExecutor | None = None, num_layers: int | None = None,
                 profiler: Profiler | None = None, synthetic_routing: SyntheticRouting | None = None,
                 deterministic: bool = False):
        self.cfg, self.backend, self.deterministic = cfg, backend, deterministic
        self.prof = profiler if profiler is not None else NullProfiler()
        self.num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 1 <= self.num_layers <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers must be in [1, {cfg.num_hidden_layers}] (got {self.num_layers})")
        layers = range(self.num_layers)
        self.experts = experts if experts is not None else LocalExperts(cfg, weights, backend, layers, deterministic)
        rope = Rope.from_config(cfg)
        self.rope = rope
        self.embed = backend.asarray(weights.get(names.EMBED))
        self.attn, self.ffn, self.input_norm, self.post_norm = [], [], [], []
        for i in layers:
            p = names.layer(i)
            self.input_norm.append(backend.asarray(weights.get(f"{p}.input_layernorm.weight")))
            self.post_norm.append(backend.asarray(weights.get(f"{p}.post_attention_layernorm.weight")))
            self.attn.append(MLA(cfg, load_mla(cfg, weights, backend, i), rope, deterministic))
            if cfg.is_moe_layer(i):
                self.ffn.append(MoEBlock(cfg, i, weights, backend, self.experts, synthetic_routing, deterministic))
            else:
                self.ffn.append(ExpertWeights.load(weights, backend, f"{p}.mlp", row_blocked=deterministic))
        self.norm = backend.asarray(weights.get(names.FINAL_NORM))
        self._inflight: list = []
        self.lm_head = self.embed if cfg.tie_word_embeddings else backend.asarray(weights.get(names.LM_HEAD))

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, self.num_layers, slots, max_len, self.backend)

    # ---- the layer, in two halves so that the engine can interleave micro-batches -------------
    def moe_blocks(self) -> list[MoEBlock]:
        return [f for f in self.ffn if isinstance(f, MoEBlock)]

    def attention(self, layer: int, h_TD, batch: Batch, cache: KVCache, rope_TR):
        """h + MLA(norm(h)): writes the batch's latents into the cache, attends, returns [T, D]."""
        with self.prof.phase(layer, "attention"):
            return self._attention(layer, h_TD, batch, cache, rope_TR)

    def _attention(self, layer: int, h_TD, batch: Batch, cache: KVCache, rope_TR):
        xp = self.backend.xp
        attn = self.attn[layer]
        x = rms_norm(h_TD, self.input_norm[layer], self.cfg.rms_norm_eps)
        q_nope, q_rot, latent = attn.project(x, *rope_TR)
        cache.write(layer, batch, latent)
        if batch.num_tokens == 0:
            return h_TD
        # Sequences adding one token attend in the absorbed form over their latents (decode);
        # the others expand their latents (prefill). A mixed batch does both.
        one = batch.new_B == 1
        if one.all():
            out = self._attend_absorbed(attn, q_nope, q_rot, batch, cache, layer)
        else:
            off = batch.offsets
            parts = [None] * len(batch.new_B)
            for b in np.nonzero(~one)[0]:
                self.poll()  # long prefills: let the exchanges in flight progress between sequences
                parts[b] = attn.attend_plain(q_nope[off[b]:off[b + 1]], q_rot[off[b]:off[b + 1]],
                                             cache.data[layer][batch.slots_B[b], :batch.start_B[b] + batch.new_B[b]],
                                             int(batch.start_B[b]))
            if one.any():
                rows = off[:-1][one]
                dec = Batch(batch.token_ids_T[rows], batch.slots_B[one], batch.start_B[one], batch.new_B[one])
                absorbed = self._attend_absorbed(attn, q_nope[xp.asarray(rows)], q_rot[xp.asarray(rows)], dec, cache, layer)
                for i, b in enumerate(np.nonzero(one)[0]):
                    parts[b] = absorbed[i:i + 1]
            out = xp.concatenate(parts)
        return h_TD + linear(out, attn.w.o_proj, self.deterministic)

    def _attend_absorbed(self, attn: MLA, q_nope, q_rot, batch: Batch, cache: KVCache, layer: int):
        xp = self.backend.xp
        if self.deterministic:  # the batch's longest context sets the GEMM shapes: one sequence at a time
            return xp.concatenate([attn.attend_absorbed(q_nope[b:b + 1], q_rot[b:b + 1],
                                                        cache.data[layer][batch.slots_B[b:b + 1], :batch.start_B[b] + 1],
                                                        batch.start_B[b:b + 1] + 1)
                                   for b in range(len(batch.slots_B))])
        slots = xp.asarray(batch.slots_B)
        length = int((batch.start_B + 1).max())
        return attn.attend_absorbed(q_nope, q_rot, cache.data[layer][slots, :length], batch.start_B + 1)

    def dense(self, layer: int, h_TD):
        """h + MLP(norm(h)) for a dense layer, [T, D]."""
        with self.prof.phase(layer, "dense_mlp"):
            return h_TD + self.ffn[layer](rms_norm(h_TD, self.post_norm[layer], self.cfg.rms_norm_eps))

    def rope_for(self, batch: Batch):
        return self.rope.cos_sin(batch.positions_T, self.backend.xp, self.backend.dtype)

    def embed_tokens(self, batch: Batch):
        return self.embed[self.backend.xp.asarray(batch.token_ids_T)]

    def head(self, h_TD):
        """Final norm and vocabulary projection: [T, D] -> float32 logits [T, V]."""
        x = rms_norm(h_TD, self.norm, self.cfg.rms_norm_eps)
        return linear(x, self.lm_head, self.deterministic).astype(self.backend.xp.float32)

    def forward(self, batch: Batch, cache: KVCache, micro_batches: int = 1, last_only: bool = False):
        """Token ids of a ragged batch -> float32 logits [T, V] (last_only: of each sequence's last
        position, [B, V], what serving needs: a prompt's other logits are a [T, V] GEMM thrown
        away); the cache gains the batch's tokens.

        micro_batches > 1 splits the batch's sequences and overlaps one part's MoE exchange with
        the other parts' compute (:meth:`forward_micro`). In the engine this is collective: every
        rank must call it with the same micro_batches, with or without tokens of its own.
        """
        if micro_batches <= 1:
            return self.forward_micro([batch], cache, last_only)[0]
        return self.backend.xp.concatenate(self.forward_micro(batch.split(micro_batches), cache, last_only), axis=0)

    def forward_micro(self, batches: list[Batch], cache: KVCache, last_only: bool = False) -> list:
        """The layer schedule over micro-batches -> float32 logits [T_i, V] (last_only: [B_i, V])
        per micro-batch.

        Per layer: for each micro-batch, finish its previous MoE layer (its combine has been in
        flight meanwhile), attention, then post its MoE exchange (the payload leaves before the
        next micro-batch's attention starts) and run its shared expert; then, for each micro-batch,
        the local experts of the rows that arrived, whose combine is posted at once and waited for
        only before that micro-batch's next attention. Between and inside compute phases every
        exchange in flight is polled, so that MPI progresses it. One micro-batch is the plain case.
        """
        hs = [self.embed_tokens(b) for b in batches]
        ropes = [self.rope_for(b) for b in batches]
        steps: list = [None] * len(batches)  # (MoE block, MoEStep, residual) in flight per micro-batch
        self._inflight = steps

        def settle(i: int) -> None:
            if steps[i] is not None:
                block, step, residual = steps[i]
                steps[i] = None
                hs[i] = residual + block.finish(step)

        for layer in range(self.num_layers):
            ffn = self.ffn[layer]
            for i, b in enumerate(batches):
                settle(i)
                hs[i] = self.attention(layer, hs[i], b, cache, ropes[i])
                self.poll()
                if isinstance(ffn, MoEBlock):
                    x = rms_norm(hs[i], self.post_norm[layer], self.cfg.rms_norm_eps)
                    steps[i] = (ffn, ffn.start(x, self.prof, micro_batch=i, poll=self.poll), hs[i])
                else:
                    hs[i] = self.dense(layer, hs[i])
                self.poll()
            if isinstance(ffn, MoEBlock):
                for i in range(len(batches)):
                    steps[i][1].pending.run_experts(poll=self.poll)
                    self.poll()
        for i in range(len(batches)):
            settle(i)
        self._inflight = []
        if last_only:
            hs = [h[self.backend.xp.asarray(b.offsets[1:] - 1)] for h, b in zip(hs, batches)]
        return [self.head(h) for h in hs]

    def poll(self) -> None:
        """Advance every exchange in flight without blocking (MPI progresses only inside calls)."""
        for s in self._inflight:
            if s is not None:
                s[1].pending.progress()
