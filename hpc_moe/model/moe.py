"""The MoE block: router, routed experts and shared experts.

Where the routed experts run is a strategy: :class:`LocalExperts` holds every expert in this
process (the single-process reference); the expert-parallel engine swaps in one that sends tokens
to the ranks owning their experts. Both compute the same function.

Shape legend: T tokens, D hidden, K experts per token, N (row, expert) pairs, I moe_intermediate_size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hpc_moe.backend import Backend
from hpc_moe.config import ModelConfig
from hpc_moe.model.layers import array_module, swiglu
from hpc_moe.model.router import Routing, SyntheticRouting, route
from hpc_moe.timing import Profiler


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's SwiGLU weights, backend arrays: gate/up [I, D], down [D, I]."""

    gate: object
    up: object
    down: object

    @classmethod
    def load(cls, weights, backend: Backend, prefix: str) -> "ExpertWeights":
        """prefix: e.g. ``model.layers.3.mlp.experts.7`` or ``model.layers.3.mlp.shared_experts``."""
        return cls(*(backend.asarray(weights.get(f"{prefix}.{p}_proj.weight")) for p in ("gate", "up", "down")))

    def __call__(self, x_TD):
        return swiglu(x_TD, self.gate, self.up, self.down)


def apply_experts(experts: dict, x_ND, expert_N):
    """Run each row through its expert: x [N, D], expert ids int [N] (keys of ``experts``) -> [N, D].

    Rows are grouped by expert so that each expert does one GEMM over all of its rows.
    """
    xp = array_module(x_ND)
    out = xp.empty_like(x_ND)
    # The ids may live on the host even when x is on the device (the engine's pair lists do).
    ids = expert_N.get() if array_module(expert_N) is not np else np.asarray(expert_N)
    order = np.argsort(ids, kind="stable")  # one sort, then each expert's rows are contiguous
    experts_U, starts_U = np.unique(ids[order], return_index=True)
    for e, a, b in zip(experts_U, starts_U, np.append(starts_U[1:], len(ids))):
        rows = xp.asarray(order[a:b])
        out[rows] = experts[int(e)](x_ND[rows])
    return out


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, x_TD, routing: Routing, prof: Profiler): ...


class LocalExperts:
    """Every routed expert of every MoE layer in this process: the reference executor."""

    def __init__(self, cfg: ModelConfig, weights, backend: Backend, layers):
        self.experts = {
            layer: {e: ExpertWeights.load(weights, backend, f"model.layers.{layer}.mlp.experts.{e}")
                    for e in range(cfg.n_routed_experts)}
            for layer in layers if cfg.is_moe_layer(layer)
        }

    def __call__(self, layer: int, x_TD, routing: Routing, prof: Profiler):
        """x [T, D] -> sum_k w[t, k] * expert_{idx[t, k]}(x[t]), [T, D]."""
        T, K = routing.topk_idx_TK.shape
        xp = array_module(x_TD)
        with prof.phase(layer, "expert"):
            pairs = apply_experts(self.experts[layer], xp.repeat(x_TD, K, axis=0), routing.topk_idx_TK.reshape(-1))
            return weighted_sum(pairs.reshape(T, K, x_TD.shape[1]), routing.topk_weight_TK)


def weighted_sum(out_TKD, weight_TK):
    """sum_k w[t, k] * out[t, k] in float32, returned in out's dtype: [T, K, D] -> [T, D]."""
    xp = array_module(out_TKD)
    y = (out_TKD.astype(xp.float32) * weight_TK[..., None]).sum(axis=1)
    return y.astype(out_TKD.dtype)


class MoEBlock:
    """One MoE layer: y = routed experts (via the executor) + shared experts."""

    def __init__(self, cfg: ModelConfig, layer: int, weights, backend: Backend, experts: ExpertExecutor,
                 synthetic: SyntheticRouting | None = None):
        p = f"model.layers.{layer}.mlp"
        self.cfg, self.layer, self.experts = cfg, layer, experts
        self.synthetic, self.calls = synthetic, 0
        self.gate = backend.asarray(weights.get(f"{p}.gate.weight"), dtype=backend.xp.float32)
        self.bias = backend.asarray(weights.get(f"{p}.gate.e_score_correction_bias"), dtype=backend.xp.float32)
        self.shared = ExpertWeights.load(weights, backend, f"{p}.shared_experts") if cfg.n_shared_experts else None

    def route(self, x_TD) -> Routing:
        """The router's top-k; with synthetic routing the gate still runs (its time is real) but
        the decision is replaced."""
        r = route(x_TD, self.gate, self.bias, self.cfg)
        if self.synthetic is not None:
            self.calls += 1
            return self.synthetic(x_TD, self.cfg, self.layer, self.calls)
        return r

    def __call__(self, x_TD, prof: Profiler):
        """x [T, D] (post-attention-normed hidden states) -> [T, D]."""
        with prof.phase(self.layer, "gate"):
            routing = self.route(x_TD)
        y = self.experts(self.layer, x_TD, routing, prof)
        if self.shared is not None:
            with prof.phase(self.layer, "shared"):
                y = y + self.shared(x_TD)
        return y
