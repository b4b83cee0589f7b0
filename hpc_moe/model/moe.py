"""The MoE block: router, routed experts and shared experts, in two halves that overlap communication.

Where the routed experts run is a strategy behind a two-phase interface: ``executor.post(layer, x,
routing) -> pending``, then ``pending.run_experts()`` and ``pending.finish() -> y``. :class:`LocalExperts`
holds every expert in this process (the single-process reference) and returns a finished pending;
the expert-parallel executor (hpc_moe.ep.executor) sends tokens to the ranks owning their experts.
Both compute the same function; with ``--deterministic`` bitwise the same.

Shape legend: T tokens, D hidden, K experts per token, Q (row, expert) pairs, N rows, E experts,
I moe_intermediate_size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hpc_moe import fused
from hpc_moe.backend import Backend
from hpc_moe.config import ModelConfig
from hpc_moe.model.layers import array_module, linear, silu
from hpc_moe.model.router import Routing, SyntheticRouting, route, topk_changed, update_bias
from hpc_moe.rowops import segment_index, take_rows, to_float32, weighted_rows_sum
from hpc_moe.timing import NullProfiler, Profiler
from hpc_moe.weights import names

Poll = Callable[[], None]


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert (or dense MLP), backend arrays: gate and up fused [2I, D], down [D, I]."""

    gate_up: object
    down: object
    row_blocked: bool = False  # see hpc_moe.model.layers.linear

    @classmethod
    def load(cls, weights, backend: Backend, prefix: str, tp_rank: int = 0, tp: int = 1,
             row_blocked: bool = False) -> ExpertWeights:
        """prefix: e.g. ``model.layers.3.mlp.experts.7``. With tp > 1, the tensor-parallel shard
        tp_rank: rows tp_rank/tp of gate and up, the matching columns of down (the partial outputs
        of the shards sum to the expert's output)."""
        gate, up, down = (weights.get(f"{prefix}.{p}_proj.weight") for p in ("gate", "up", "down"))
        cut = slice(tp_rank * gate.shape[0] // tp, (tp_rank + 1) * gate.shape[0] // tp)
        return cls(backend.asarray(np.concatenate([gate[cut], up[cut]])),
                   backend.asarray(np.ascontiguousarray(down[:, cut])), row_blocked)

    def __call__(self, x_TD):
        """down(silu(gate(x)) * up(x)): [T, D] -> [T, D], one GEMM for gate and up."""
        h = linear(x_TD, self.gate_up, self.row_blocked)
        i = h.shape[1] // 2
        return linear(silu(h[:, :i]) * h[:, i:], self.down, self.row_blocked)


def apply_experts(experts, x_ND, expert_Q, row_Q=None, poll: Poll | None = None):
    """out[q] = experts[expert_Q[q]](x[row_Q[q]]): [Q, D] in pair order.

    experts: a sequence or mapping of ExpertWeights; expert_Q int [Q] and row_Q int [Q] host
    (row_Q None: row q). Each expert runs one GEMM over all its rows; when one expert takes every
    row in order (one expert per rank) it computes on x in place, without a gather.
    """
    xp = array_module(x_ND)
    ids = np.asarray(expert_Q)
    rows = np.arange(len(ids)) if row_Q is None else np.asarray(row_Q)
    if len(ids) and len(ids) == x_ND.shape[0] and (ids == ids[0]).all() and (rows == np.arange(len(rows))).all():
        return experts[int(ids[0])](x_ND)
    out = xp.empty((len(ids), x_ND.shape[1]), dtype=x_ND.dtype)
    order = np.argsort(ids, kind="stable")  # one sort, then each expert's pairs are contiguous
    experts_U, starts_U = np.unique(ids[order], return_index=True)
    for e, a, b in zip(experts_U, starts_U, np.append(starts_U[1:], len(ids))):
        q = order[a:b]
        out[q if xp is np else xp.asarray(q)] = experts[int(e)](take_rows(xp, x_ND, rows[q]))
        if poll is not None:
            poll()
    return out


def weigh_pairs(out_QD, row_Q, weight_Q, n_rows: int, dtype, out_ND=None):
    """y[n] = sum of weight[q] * out[q] over the pairs q of row n, in float32: [N, D] in dtype
    (into out_ND when given: the place a shared-memory exchange reads the reply rows from).

    One pair per row in order (one expert per rank) is one scaling pass: hpc_moe.fused's kernel
    where it applies, else in place on out_QD when it is float32 (the caller's expert output, not
    needed afterwards); both give the same bits.
    """
    xp = array_module(out_QD)
    w = xp.asarray(weight_Q, dtype=np.float32)
    if len(row_Q) == n_rows and (np.asarray(row_Q) == np.arange(n_rows)).all():
        if xp is np:
            y = fused.rows_sum(out_QD, np.arange(n_rows)[:, None], np.ones(n_rows, np.int64), w[:, None], dtype, out_ND)
            if y is not None:
                return y
        y = out_QD if out_QD.dtype == np.float32 else to_float32(xp, out_QD)
        y *= w[:, None]
    else:
        index = segment_index(np.asarray(row_Q), n_rows)
        rows = xp.concatenate([out_QD, xp.zeros((1, out_QD.shape[1]), out_QD.dtype)])
        y = weighted_rows_sum(xp, rows, index, np.append(np.asarray(weight_Q, np.float32), 0)[index], dtype)
    if out_ND is None:
        return y.astype(dtype, copy=False)
    out_ND[...] = y
    return out_ND


def combine_pairs(out_QD, weight_TK, dtype):
    """The reference combine: y[t] = sum_k w[t, k] * out[t * K + k] in k order, float32 -> dtype.

    The expert-parallel ``pairs`` combine reduces with the same table, so the two agree bitwise.
    """
    xp = array_module(out_QD)
    T, K = weight_TK.shape
    rows = xp.concatenate([out_QD, xp.zeros((1, out_QD.shape[1]), out_QD.dtype)])
    return weighted_rows_sum(xp, rows, np.arange(T * K, dtype=np.int64).reshape(T, K), weight_TK, dtype)


class PendingExperts(Protocol):
    """The routed half of one MoE layer of one micro-batch, in flight."""

    def progress(self) -> bool: ...
    def run_experts(self, poll: Poll | None = None) -> None: ...
    def finish(self): ...


class ExpertExecutor(Protocol):
    def post(self, layer: int, x_TD, routing: Routing, *, micro_batch: int = 0,
             prof: Profiler | None = None) -> PendingExperts: ...


class Finished:
    """A pending that is already done: the single-process executor's answer."""

    def __init__(self, y_TD):
        self._y = y_TD

    def progress(self) -> bool:
        return True

    def run_experts(self, poll: Poll | None = None) -> None:
        pass

    def finish(self):
        return self._y


class LocalExperts:
    """Every routed expert of every MoE layer in this process: the reference executor."""

    def __init__(self, cfg: ModelConfig, weights, backend: Backend, layers, row_blocked: bool = False):
        self.experts = {
            layer: [ExpertWeights.load(weights, backend, names.expert(layer, e),
                                       row_blocked=row_blocked)
                    for e in range(cfg.n_routed_experts)]
            for layer in layers if cfg.is_moe_layer(layer)
        }

    def post(self, layer: int, x_TD, routing: Routing, *, micro_batch: int = 0,
             prof: Profiler | None = None) -> Finished:
        """x [T, D] -> sum_k w[t, k] * expert_{idx[t, k]}(x[t]), [T, D], computed at once."""
        prof = prof or NullProfiler()
        T, K = routing.topk_idx_TK.shape
        with prof.phase(layer, "expert"):
            idx = np.asarray(routing.topk_idx_TK.get() if array_module(routing.topk_idx_TK) is not np
                             else routing.topk_idx_TK).reshape(-1)
            out = apply_experts(self.experts[layer], x_TD, idx, np.repeat(np.arange(T), K))
            return Finished(combine_pairs(out, routing.topk_weight_TK, x_TD.dtype))


@dataclass(frozen=True, eq=False)
class MoEStep:
    """One MoE layer of one micro-batch between start and finish: the routed half in flight and
    the shared experts' output (None without shared experts)."""

    pending: PendingExperts
    shared_TD: object


class MoEBlock:
    """One MoE layer: y = routed experts (via the executor) + shared experts.

    Holds the gating weights, the correction bias (float32 [E], updated by ``update_bias``) and the
    tokens routed to each expert since ``reset_counts`` (int64 [E], host, this rank's tokens).
    With ``reference_bias`` set (float32 [E]), routing also counts the tokens whose top-k would
    differ under that bias (``topk_changed``, ``topk_seen``: ints since ``reset_counts``): what a
    bias learned online changed against the checkpoint's, on the very tokens the model routed.
    """

    def __init__(self, cfg: ModelConfig, layer: int, weights, backend: Backend, experts: ExpertExecutor,
                 synthetic: SyntheticRouting | None = None, row_blocked: bool = False):
        p = names.mlp(layer)
        self.cfg, self.layer, self.experts, self.backend = cfg, layer, experts, backend
        self.synthetic, self.calls = synthetic, 0
        self.gate = backend.asarray(weights.get(f"{p}.gate.weight"), dtype=backend.xp.float32)
        self.bias = backend.asarray(weights.get(f"{p}.gate.e_score_correction_bias"), dtype=backend.xp.float32)
        self.row_blocked = row_blocked
        self.shared = ExpertWeights.load(weights, backend, f"{p}.shared_experts", row_blocked=row_blocked) \
            if cfg.n_shared_experts else None
        self.counts_E = np.zeros(cfg.n_routed_experts, np.int64)
        self.reference_bias = None  # None: no second routing, no cost
        self.topk_changed = self.topk_seen = 0

    def route(self, x_TD) -> Routing:
        """The router's top-k; with synthetic routing the gate still runs (its time is real) but
        the decision is replaced."""
        r = route(x_TD, self.gate, self.bias, self.cfg, self.row_blocked)
        if self.synthetic is not None:
            self.calls += 1
            return self.synthetic(x_TD, self.cfg, self.layer, self.calls)
        if self.reference_bias is not None:
            ref = route(x_TD, self.gate, self.reference_bias, self.cfg, self.row_blocked)
            self.topk_changed += int(topk_changed(r.topk_idx_TK, ref.topk_idx_TK).sum())
            self.topk_seen += int(x_TD.shape[0])
        return r

    def start(self, x_TD, prof: Profiler, micro_batch: int = 0, poll: Poll | None = None) -> MoEStep:
        """Route x [T, D] (post-attention-normed hidden states), post the routed half, and run the
        shared experts while it flies."""
        with prof.phase(self.layer, "gate"):
            routing = self.route(x_TD)
            idx = self.backend.to_numpy(routing.topk_idx_TK).reshape(-1)
            self.counts_E += np.bincount(idx[idx >= 0], minlength=self.cfg.n_routed_experts)
        pending = self.experts.post(self.layer, x_TD, routing, micro_batch=micro_batch, prof=prof)
        if poll is not None:
            poll()
        shared = None
        if self.shared is not None:
            with prof.phase(self.layer, "shared"):
                shared = self.shared(x_TD)
        return MoEStep(pending, shared)

    def finish(self, step: MoEStep):
        """-> routed + shared, [T, D]."""
        y = step.pending.finish()
        return y if step.shared_TD is None else y + step.shared_TD

    def reset_counts(self) -> None:
        self.counts_E[:] = 0
        self.topk_changed = self.topk_seen = 0

    def update_bias(self, counts_E: np.ndarray, rate: float) -> None:
        """The aux-loss-free rule, bias += rate * sign(mean load - load), from global counts [E]."""
        new = update_bias(self.backend.to_numpy(self.bias), counts_E, rate)
        self.bias = self.backend.asarray(new, dtype=np.float32)
