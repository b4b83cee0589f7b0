"""The two-stage (hierarchical) exchange: each token crosses to a node once, however many of its
experts live there, as DeepEP's internode kernels and Tutel's 2-D all-to-all do.

EP ranks form N nodes of L ranks, placed in any order (blocks of consecutive ranks, or round-robin
as ``srun -m cyclic`` places them: hpc_moe.ep.plan.NodeMap); rank (n, l) is the l-th rank of node n in rank
order, and talks across nodes only on its rail, the ranks with the same local index l. One
exchange is two plain Exchanges:

* stage 1 (rail communicator, across nodes): the token's row goes once to the rail peer of every
  node it needs, with each k's rank in that node and local expert id there, as one code in the
  metadata's local field (-1: not there), so that its rows are no wider than flat ones;
* stage 2 (node communicator, inside the node): that rail rank forwards each row it received to
  the ranks of its node that run one of the row's experts, once per rank;
* the experts compute; the combine goes back the same way: inside the node the rail rank sums
  the rows of each stage-1 row (weighted form) or passes the (row, k) rows on unreduced (pairs
  form, ``--deterministic``), and one row per (token, node) crosses back to the source, which
  sums them (or weights its pairs in k order: bitwise the flat result).

Stage 1 is posted with the exchange and its combine is posted when stage 2 is done, so the
cross-node transfers overlap compute as the flat ones do; stage 2 and the experts run in
run_experts. Needs expert_tp 1 and nodes of equal size (Dispatcher checks).

The plans of both stages (the node codes included) are hpc_moe.ep.plan's.

Legend: T tokens of this rank, K top-k, D hidden, N rows received in stage 1, P EP ranks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hpc_moe.ep.exchange import Exchange, ExchangeRecord, ExchangeTimes, ExpertFn
from hpc_moe.ep.plan import node_codes, node_plan, rail_plan
from hpc_moe.timing import Profiler


class HierarchicalExchange:
    """One MoE exchange in two stages (see the module docstring); the interface of Exchange that
    the executor uses: progress, run_experts, wait, and the accounting properties."""

    @classmethod
    def post(cls, d, layer, x_TD, topk_idx_TK, topk_weight_TK, prof: Profiler) -> HierarchicalExchange:
        """Start stage 1: the exchange, its cross-node payload in flight. Collective over d's
        channel. d: the hpc_moe.ep.dispatch.Dispatcher of the channel (hierarchical: its rail and
        node dispatchers, its NodeMap ``nodes``)."""
        topk = np.asarray(d.backend.to_numpy(topk_idx_TK), dtype=np.int64)
        w_TK = np.asarray(d.backend.to_numpy(topk_weight_TK), dtype=np.float32)
        # A node id is a rank on the rail communicator and a local index one on the node's (the
        # channel's Split keys).
        plan1 = rail_plan(d.placement, d.nodes, d.rank, layer, topk)
        return cls(d, layer, prof, d.rail.flat_kind.post(d.rail, layer, x_TD, topk, w_TK, prof, plan=plan1))

    def __init__(self, d, layer, prof: Profiler, stage1: Exchange):
        self._d, self.layer, self._prof, self.stage1 = d, layer, prof, stage1
        self.pairs = d.options.deterministic
        self._codes = node_codes(d.placement, layer)
        self.stage2: Exchange | None = None
        self.hidden, self.dtype = stage1.hidden, stage1.dtype

    def progress(self) -> bool:
        """Advance stage 1 in either direction; True once its combine has landed."""
        return self.stage1.progress()

    def run_experts(self, expert_fn: ExpertFn) -> None:
        """Wait for stage 1, forward inside the node, run the experts, bring their rows back to
        this rail rank, post the stage-1 combine."""
        d, rec1 = self._d, self.stage1.received()
        plan2, dest_NK, w_NK = node_plan(self._codes, rec1.x_ND.shape[0], self.stage1.topk, rec1.row_Q, rec1.k_Q,
                                         rec1.local_expert_Q, rec1.weight_Q, d.node.size)
        self.stage2 = d.node.flat_kind.post(d.node, self.layer, rec1.x_ND, dest_NK, w_NK, self._prof, plan=plan2)
        self.stage2.run_experts(expert_fn)
        out = self.stage2.wait(pair_rows=self.pairs)  # per stage-1 row, or its (row, k) rows
        with self._prof.phase(self.layer, "combine"):
            self.stage1.reply(out)

    def wait(self):
        """Wait for the stage-1 combine -> y_TD [T, D]."""
        if self.stage2 is None:
            raise RuntimeError("wait() before run_experts() on a hierarchical exchange")
        return self.stage1.wait()

    # ---- accounting, in EP ranks ---------------------------------------------------------------
    def record(self) -> ExchangeRecord:
        return ExchangeRecord.of(self)

    def _ep(self, rail_P, node_P) -> np.ndarray:
        d = self._d
        out = np.zeros(d.size, np.int64)
        out[d.nodes.rank_at_NL[:, d.local_index]] += rail_P
        if node_P is not None:
            out[d.nodes.rank_at_NL[d.node_id]] += node_P
        return out

    @property
    def send_bytes_P(self) -> np.ndarray:
        """Bytes this rank sends to each EP peer [P], both stages, both directions."""
        return self._ep(self.stage1.send_bytes_P, None if self.stage2 is None else self.stage2.send_bytes_P)

    @property
    def recv_counts_P(self) -> np.ndarray:
        """Token rows this rank's experts received from each EP peer [P] (stage 2)."""
        return self._ep(np.zeros(self._d.rail.size, np.int64), None if self.stage2 is None else self.stage2.recv_counts_P)

    @property
    def nodes_per_token_T(self) -> np.ndarray:
        return self.stage1.nodes_per_token_T

    @property
    def dispatch_times(self) -> ExchangeTimes:
        """Stage 1's (the cross-node transfer), blocked time of both stages."""
        t = dataclasses.replace(self.stage1.dispatch_times)
        t.blocked += 0.0 if self.stage2 is None else self.stage2.dispatch_times.blocked
        return t

    @property
    def combine_times(self) -> ExchangeTimes:
        t = dataclasses.replace(self.stage1.combine_times)
        t.blocked += 0.0 if self.stage2 is None else self.stage2.combine_times.blocked
        return t
