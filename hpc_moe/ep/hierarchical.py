"""The two-stage (hierarchical) exchange: each token crosses to a node once, however many of its
experts live there, as DeepEP's internode kernels and Tutel's 2-D all-to-all do.

EP ranks form N nodes of L ranks, placed in any order (blocks of consecutive ranks, or round-robin
as ``srun -m cyclic`` places them: :class:`NodeMap`); rank (n, l) is the l-th rank of node n in rank
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

Legend: T tokens of this rank, K top-k, D hidden, N rows received in stage 1 (in NodeMap: N nodes,
L ranks per node), P EP ranks, R ranks sorted by node.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from hpc_moe.ep.exchange import Exchange, ExchangeTimes, ExpertFn, plan_rows
from hpc_moe.timing import Profiler


@dataclass(frozen=True, eq=False)
class NodeMap:
    """Which node each EP rank is on, nodes numbered 0..N-1 in the order of their ids (an EP group
    of a DP replica sees ids that need not start at 0). node_P int64 [P]: the node of each rank;
    local_P int64 [P]: its index among its node's ranks, in rank order; rank_at_NL int64 [N, L]:
    the rank of node n with local index l (None when nodes differ in size); unusable: why the
    two-stage exchange cannot run on this map (None: it can)."""

    node_P: np.ndarray
    local_P: np.ndarray
    rank_at_NL: np.ndarray | None
    unusable: str | None

    @classmethod
    def of(cls, node_of_rank) -> NodeMap:
        """From a node id per EP rank [P] (any integers)."""
        _, node_P = np.unique(np.asarray(node_of_rank, np.int64), return_inverse=True)
        size_N = np.bincount(node_P)
        rank_R = np.argsort(node_P, kind="stable")  # node by node, in rank order inside each
        local_P = np.empty_like(node_P)
        local_P[rank_R] = np.arange(len(node_P)) - np.repeat(np.cumsum(size_N) - size_N, size_N)
        equal = bool((size_N == size_N[0]).all())
        return cls(node_P, local_P, rank_R.reshape(len(size_N), -1) if equal else None,
                   None if equal else "nodes differ in size")

    @property
    def n_nodes(self) -> int:
        return int(self.node_P.max()) + 1


class HierarchicalExchange:
    """One MoE exchange in two stages (see the module docstring); the interface of Exchange that
    the executor uses: progress, run_experts, wait, and the accounting properties."""

    def __init__(self, d, layer, x_TD, topk_idx_TK, topk_weight_TK, prof: Profiler):
        """d: the hpc_moe.ep.dispatch.Dispatcher of the channel (hierarchical: its rail and node
        dispatchers, its NodeMap ``nodes``)."""
        self._d, self.layer, self._prof = d, layer, prof
        self.pairs = d.options.deterministic
        topk = np.asarray(d.backend.to_numpy(topk_idx_TK), dtype=np.int64)
        w_TK = np.asarray(d.backend.to_numpy(topk_weight_TK), dtype=np.float32)
        rank_TK, local_TK = d.route(layer, topk)  # expert_tp 1: a slot is a rank
        # A node id is a rank on the rail communicator and a local index one on the node's (the
        # Dispatcher's Split keys); rank -1 indexes the last rank here, and is masked.
        valid_TK = rank_TK >= 0
        node_TK = np.where(valid_TK, d.nodes.node_P[rank_TK], -1)
        in_node_TK = np.where(valid_TK, d.nodes.local_P[rank_TK], -1)
        self._codes = int(d.placement.local_index_table(layer).max()) + 1  # local expert ids per rank
        code_TK = np.where(valid_TK, in_node_TK * self._codes + local_TK, -1)
        plan1 = plan_rows(node_TK, code_TK, d.rail.size)
        plan1 = dataclasses.replace(plan1, nodes_T=np.bincount(plan1.token_M, minlength=len(topk)))
        self.stage1 = Exchange(d.rail, layer, x_TD, topk, w_TK, prof, plan=plan1)
        self.stage2: Exchange | None = None
        self.hidden, self.dtype = self.stage1.hidden, self.stage1.dtype

    def progress(self) -> bool:
        """Advance stage 1 in either direction; True once its combine has landed."""
        return self.stage1.progress()

    def run_experts(self, expert_fn: ExpertFn) -> None:
        """Wait for stage 1, forward inside the node, run the experts, bring their rows back to
        this rail rank, post the stage-1 combine."""
        d, rec1 = self._d, self.stage1.received()
        shape = (rec1.x_ND.shape[0], self.stage1.topk)
        dest_NK, local_NK = np.full(shape, -1, np.int64), np.full(shape, -1, np.int64)
        dest_NK[rec1.row_Q, rec1.k_Q], local_NK[rec1.row_Q, rec1.k_Q] = np.divmod(rec1.local_expert_Q, self._codes)
        w_NK = np.zeros(shape, np.float32)
        w_NK[rec1.row_Q, rec1.k_Q] = rec1.weight_Q
        plan2 = plan_rows(dest_NK, local_NK, d.node.size)
        self.stage2 = Exchange(d.node, self.layer, rec1.x_ND, dest_NK, w_NK, self._prof, plan=plan2)
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
