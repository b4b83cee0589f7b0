"""Expert placement: which EP rank holds which routed expert, per MoE layer. Pure functions, no MPI.

An expert *slot* is ``expert_tp`` consecutive EP ranks that together run one expert (tensor
parallel inside it); there are S = ep_size / expert_tp slots. The rules, per layer:

* E == S: slot i owns exactly one expert (the principle: one expert per GPU per layer).
* E <  S: every expert owns one slot and the S - E spare slots hold replicas, given greedily as
  DeepSeek's EPLB does (the next replica goes to the expert with the highest load / replicas).
  A token's expert is served by one replica. Without loads: the source node's own replicas if it
  has some, else all, alike, by (token index + source rank). Placed by loads: by the shares that
  level the slots (hpc_moe.ep.packing.replica_shares: the own node's replicas first, another
  node's where that saves more than SPILL of a mean slot's load), so that the rows each rank
  receives are those the placement expects (``routed_loads``), not an even split's.
* E >  S: experts are colocated (``colocated`` is True, so that the run can say it breaks the
  principle), ceil/floor(E/S) per slot, balanced by load (longest-processing-time) when loads are
  given.

Policies (hpc_moe.ep.policies): EPLB's two, each optionally refined by swaps, and ``cut``, whose
cut experts' replicas take unequal shares (``demand``, followed by choose_replica through
hpc_moe.ep.packing.flow_shares). A re-placement (``from_loads``) lays the new map over the old so
that few experts move, or keeps the old one refined.

Topology: slots are filled node by node with contiguous runs of experts, node n receiving a share
of experts proportional to its slots, so the E / n_group experts of one routing group sit on one node
where the shapes allow and group-limited routing also limits the nodes a token reaches. With loads,
whole groups are first packed onto nodes by load (as EPLB's hierarchical policy), and replicas stay
on the node of their group.

Legend: E experts, S slots, R replicas of an expert (max over experts), N nodes, L layers, T tokens,
K top-k.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from hpc_moe.ep.choices import POLICIES
from hpc_moe.ep.packing import flow_shares, refine, replica_shares
from hpc_moe.ep.policies import match, permute, place_layer
from hpc_moe.errors import InputError

# A low-discrepancy sequence frac((t + 1) x golden ratio) picks replicas by their shares; ranks
# are offset by multiples of the plastic number's fraction, so they do not pick in lockstep.
_GOLDEN = (np.sqrt(5.0) - 1) / 2
_PLASTIC = 0.3247179572447460


class PlacementError(InputError):
    """The placement asked for is impossible (the message says why)."""


@dataclass(frozen=True, eq=False)
class ExpertPlacement:
    """Expert -> slot maps for one shared layer map or one map per MoE layer.

    slot_experts[l][s]: the experts slot s holds in map l (ascending; position = local expert id).
    layer_ids: the model layer of each map, or None when one map serves every layer; every method
    takes ``layer`` (a model layer id, ignored for a shared map). Slot s is EP ranks
    [s * expert_tp, (s + 1) * expert_tp). node_of_rank: node id of every EP rank [ep_size].
    policy: how loads place experts (POLICIES): EPLB's "hierarchical" (routing groups packed onto
    nodes by load, then replicas and packing inside each node) or "global" (replicas of the hot
    experts anywhere, packed over all slots), or either with "-refined" (its packing refined by
    swaps of replicas that lower the hottest slot's load, inside the nodes or anywhere), or "cut"
    (the loads laid end to end and cut into equal pieces: hpc_moe.ep.policies);
    redundant: replicas beyond one per expert when experts are colocated (E > slots), as
    DeepSeek's redundant experts; node_cost: float per node id, the relative cost of its links
    (hpc_moe.links.Links.node_cost), whose cheapest nodes take the heaviest nodes' experts, or
    None where the links are even; all three are kept for re-placement. loads: the tokens per
    expert each map was placed for (float [E] each), None without loads; demand: per map, float
    [E, S] the share of each expert's tokens each slot is meant to take (``cut``), or None where
    the router levels the replicas itself (replica_shares).
    """

    n_experts: int
    ep_size: int
    expert_tp: int
    node_of_rank: tuple[int, ...]
    n_group: int
    slot_experts: tuple[tuple[tuple[int, ...], ...], ...]
    layer_ids: tuple[int, ...] | None = None
    policy: str = "hierarchical"
    redundant: int = 0
    node_cost: tuple[float, ...] | None = None
    loads: tuple[np.ndarray, ...] | None = None
    demand: tuple[np.ndarray | None, ...] | None = None
    _tables: tuple = field(init=False, repr=False)

    def __post_init__(self):
        none = (None,) * len(self.slot_experts)
        object.__setattr__(self, "_tables", tuple(_tables(self, m, w, d) for m, w, d in
                                                  zip(self.slot_experts, self.loads or none, self.demand or none)))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def build(cls, n_experts: int, ep_size: int, expert_tp: int = 1, node_of_rank=None,
              n_group: int = 1, loads=None, layers=None, policy: str = "hierarchical",
              redundant: int = 0, node_cost=None) -> ExpertPlacement:
        """Place E experts on ep_size ranks in slots of expert_tp ranks.

        node_of_rank: node id per EP rank [ep_size] (default: one node); n_group: routing groups
        (E / n_group consecutive experts each); loads: expected tokens per expert, float [E] (one
        map) or [L, E] (one map per layer, needs ``layers``); layers: model layer ids for per-layer
        maps (default: one map shared by all layers); policy, redundant, node_cost: see the class.
        """
        _need(policy in POLICIES, f"policy must be one of {', '.join(POLICIES)} (got {policy!r})")
        _need(redundant >= 0, f"redundant must be >= 0 (got {redundant})")
        node_of_rank = tuple(int(n) for n in (node_of_rank if node_of_rank is not None
                                               else [0] * ep_size))
        _need(n_experts >= 1, f"n_experts must be >= 1 (got {n_experts})")
        _need(ep_size >= 1 and expert_tp >= 1 and ep_size % expert_tp == 0,
              f"ep_size {ep_size} must be a positive multiple of expert_tp {expert_tp}")
        _need(len(node_of_rank) == ep_size,
              f"node_of_rank has {len(node_of_rank)} entries for ep_size {ep_size}")
        _need(n_group >= 1 and n_experts % n_group == 0,
              f"n_experts {n_experts} must be divisible by n_group {n_group}")
        layer_ids = None if layers is None else tuple(int(x) for x in layers)
        _need(layer_ids is None or len(layer_ids) >= 1, "layers must not be empty")
        n_maps = 1 if layer_ids is None else len(layer_ids)
        loads_LE = _loads(loads, n_experts, n_maps)
        node_of_slot = node_of_rank[::expert_tp]
        cost = None if node_cost is None else tuple(float(c) for c in node_cost)
        _need(cost is None or len(cost) > max(node_of_rank), f"node_cost needs a cost for each of nodes 0..{max(node_of_rank)}")
        maps, demand = zip(*(place_layer(n_experts, node_of_slot, n_group, loads_LE[i], policy, redundant, cost)
                             for i in range(n_maps)))
        return cls(n_experts, ep_size, expert_tp, node_of_rank, n_group, maps, layer_ids, policy, redundant, cost,
                   None if loads is None else tuple(loads_LE), None if loads is None else demand)

    def from_loads(self, loads, layer: int | None = None, keep: bool = False) -> ExpertPlacement:
        """Re-place from measured tokens per expert: [E] for one layer (``layer`` given) or for all
        maps (``layer`` None), or [L, E] for every per-layer map.

        keep False: each map placed afresh by the policy, its slots' contents then laid over the
        current ones so that as many experts as possible stay (hpc_moe.ep.policies.match: the same
        cost, fewer bytes to move). keep True: the current maps kept, only refined by swaps of
        replicas under the new loads (inside the nodes, or anywhere for global; not for cut),
        their replicas' shares levelled for the new loads (replica_shares): few experts move."""
        loads = np.asarray(loads, dtype=np.float64)
        node_of_slot = self.node_of_rank[::self.expert_tp]
        n_maps = len(self.slot_experts)
        if layer is not None:
            _need(self.layer_ids is not None, "this placement has one shared map; build it "
                  "with layers=... to re-place layers one by one")
            _need(loads.shape == (self.n_experts,), f"loads must have shape ({self.n_experts},)")
            todo = [self._index(layer)]
        else:
            todo = list(range(n_maps))
        new_LE = _loads(loads, self.n_experts, len(todo))
        kept = list(self.loads or [np.ones(self.n_experts)] * n_maps)
        maps, demand = list(self.slot_experts), list(self.demand or [None] * n_maps)
        nodes = sorted(set(node_of_slot))
        within = [[s for s, n in enumerate(node_of_slot) if n == k] for k in nodes]
        for i, w in zip(todo, new_LE):
            kept[i] = w
            if keep:  # cut's map as it is: swaps under an even split would undo its uneven pieces
                groups = [list(range(len(node_of_slot)))] if self.policy.startswith("global") else within
                if self.policy != "cut":
                    maps[i] = tuple(tuple(sorted(h)) for h in refine(maps[i], w, groups))
                demand[i] = None
                continue
            new_map, new_demand = place_layer(self.n_experts, node_of_slot, self.n_group, w, self.policy,
                                              self.redundant, self.node_cost)
            maps[i], demand[i] = permute(new_map, new_demand,
                                         match(maps[i], new_map, node_of_slot, whole_nodes=self.node_cost is None))
        return dataclasses.replace(self, slot_experts=tuple(maps), loads=tuple(kept), demand=tuple(demand))

    # ---- queries ---------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return self.ep_size // self.expert_tp

    @property
    def colocated(self) -> bool:
        """True when some rank holds more than one expert of a layer (E > slots)."""
        return self.n_experts > self.n_slots

    @property
    def replicated(self) -> bool:
        return self.n_experts < self.n_slots

    def owners(self, e: int, layer: int | None = None) -> list[int]:
        """The slots holding expert ``e`` (one unless replicated)."""
        rep_ER, n_rep_E = self._tables[self._index(layer)][:2]
        return [int(s) for s in rep_ER[e, :n_rep_E[e]]]

    def slot_ranks(self, slot: int) -> list[int]:
        """The expert_tp EP ranks of ``slot``."""
        return list(range(slot * self.expert_tp, (slot + 1) * self.expert_tp))

    def local_experts(self, rank: int, layer: int | None = None) -> list[int]:
        """Global ids of the experts EP rank ``rank`` runs (its local expert i is list[i])."""
        return list(self.slot_experts[self._index(layer)][rank // self.expert_tp])

    def local_index_table(self, layer: int | None = None) -> np.ndarray:
        """int32 [S, E]: local expert id of expert e on slot s, -1 where s does not hold e."""
        return self._tables[self._index(layer)][4]

    def choose_replica(self, expert_ids, src_rank: int, token_idx, layer: int | None = None) -> np.ndarray:
        """Slot serving each (expert, token) of EP rank ``src_rank``; arrays broadcast together.

        Deterministic: among the replicas on the source's node if any, else all, by the shares
        that level the slots as the placement models them (route_shares): token t takes the
        replica whose interval of the cumulative shares holds the fraction of (t + 1) x the golden
        ratio (+ a per-rank offset), a sequence that fills every interval in proportion to its
        width; without loads, every replica alike, by (token_idx + src_rank) modulo their number.
        Returns int64 of the broadcast shape."""
        _, _, cand_NER, ncand_NE, _, cum_NER = self._tables[self._index(layer)]
        e = np.asarray(expert_ids, dtype=np.int64)
        node = self.node_of_rank[src_rank]
        t = np.asarray(token_idx, dtype=np.int64)
        if self.loads is None:
            j = (t + src_rank) % ncand_NE[node, e]
        else:
            u = np.modf((t + 1) * _GOLDEN + src_rank * _PLASTIC)[0]
            cum = cum_NER[node][e]  # [..., R]
            j = np.minimum((np.broadcast_to(u, e.shape)[..., None] >= cum).sum(axis=-1), ncand_NE[node, e] - 1)
        return cand_NER[node, e, j]
    def route(self, topk_idx_TK, src_rank: int, layer: int | None = None) -> np.ndarray:
        """int64 [T, K]: the slot each (token, k) of ``src_rank`` goes to (topk_idx int [T, K])."""
        topk = np.asarray(topk_idx_TK, dtype=np.int64)
        return self.choose_replica(topk, src_rank, np.arange(topk.shape[0])[:, None], layer)

    def slot_loads(self, loads_E, layer: int | None = None) -> np.ndarray:
        """float64 [S]: each slot's expected rows from tokens per expert (float [E]), an expert's
        load split evenly over its replicas (as EPLB models it)."""
        rep_ER, n_rep_E = self._tables[self._index(layer)][:2]
        share_E = np.asarray(loads_E, dtype=np.float64) / n_rep_E
        valid = rep_ER >= 0
        return np.bincount(rep_ER[valid], weights=np.broadcast_to(share_E[:, None], rep_ER.shape)[valid],
                           minlength=self.n_slots)

    def route_shares(self, layer: int | None = None) -> np.ndarray:
        """float64 [N, E, S]: the share of node n's tokens for expert e that choose_replica sends to
        slot s (among its replicas on node n, else among all)."""
        _, _, cand_NER, ncand_NE, _, cum_NER = self._tables[self._index(layer)]
        n_nodes, e_count, r = cand_NER.shape
        share_NER = np.diff(np.where(np.isfinite(cum_NER), cum_NER, 1.0), axis=-1, prepend=0.0)
        out = np.zeros((n_nodes, e_count, self.n_slots))
        n_i, e_i, j = np.nonzero(np.arange(r)[None, None, :] < ncand_NE[:, :, None])
        np.add.at(out, (n_i, e_i, cand_NER[n_i, e_i, j]), share_NER[n_i, e_i, j])
        return out

    def routed_loads(self, loads_E, layer: int | None = None) -> np.ndarray:
        """float64 [S]: each slot's expected rows from tokens per expert (float [E]) as
        choose_replica sends them, the tokens spread evenly over the nodes."""
        shares = self.route_shares(layer)
        return np.einsum("e,nes->s", np.asarray(loads_E, np.float64), shares) / len(shares)

    def to_array(self, layer: int | None = None) -> np.ndarray:
        """int32 [E, R] slots of each expert, -1 padded; [L, E, R] for all per-layer maps when
        ``layer`` is None and the placement has per-layer maps (the HDF5 trace form)."""
        if self.layer_ids is not None and layer is None:
            r = max(t[0].shape[1] for t in self._tables)
            out = np.full((len(self._tables), self.n_experts, r), -1, dtype=np.int32)
            for i, t in enumerate(self._tables):
                out[i, :, :t[0].shape[1]] = t[0]
            return out
        return self._tables[self._index(layer)][0].astype(np.int32)

    def _index(self, layer: int | None) -> int:
        if self.layer_ids is None:
            return 0
        if layer is None:
            _need(len(self.layer_ids) == 1, "this placement has per-layer maps: pass layer=")
            return 0
        try:
            return self.layer_ids.index(int(layer))
        except ValueError:
            raise PlacementError(f"layer {layer} has no placement (layers {self.layer_ids[0]}.."
                                 f"{self.layer_ids[-1]})") from None


# ---- algorithms (pure) -------------------------------------------------------------------------
def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise PlacementError(msg)


def _loads(loads, n_experts: int, n_maps: int) -> np.ndarray:
    if loads is None:
        return np.ones((n_maps, n_experts))
    a = np.asarray(loads, dtype=np.float64)
    if a.ndim == 1:
        a = np.broadcast_to(a, (n_maps, a.shape[0]))
    _need(a.shape == (n_maps, n_experts), f"loads must have shape ({n_experts},) or "
          f"({n_maps}, {n_experts}); got {a.shape}")
    _need(bool(np.all(np.isfinite(a)) and np.all(a >= 0)), "loads must be finite and >= 0")
    return a + 1e-9  # a zero-load expert still ranks, and load / replicas stays defined


def _tables(p: ExpertPlacement, slot_experts, loads_E, demand_ES):
    """Lookup tables of one map: replicas [E, R], replica counts [E], per-node candidates
    [N, E, R] and their counts [N, E] (for choose_replica), local index [S, E], and the
    cumulative shares of the candidates [N, E, R] (even without loads, levelled with them)."""
    e_count, s_count = p.n_experts, len(slot_experts)
    _need(s_count == p.n_slots, f"map has {s_count} slots, expected {p.n_slots}")
    owners: list[list[int]] = [[] for _ in range(e_count)]
    local_SE = np.full((s_count, e_count), -1, dtype=np.int32)
    for s, experts in enumerate(slot_experts):
        for i, e in enumerate(experts):
            owners[e].append(s)
            local_SE[s, e] = i
    _need(all(owners), "every expert needs at least one slot")
    r = max(len(o) for o in owners)
    rep_ER = np.full((e_count, r), -1, dtype=np.int64)
    for e, o in enumerate(owners):
        rep_ER[e, :len(o)] = o
    n_rep_E = np.array([len(o) for o in owners], dtype=np.int64)
    node_of_slot = np.asarray(p.node_of_rank[::p.expert_tp])
    n_nodes = max(p.node_of_rank) + 1
    cand_NER = np.zeros((n_nodes, e_count, r), dtype=np.int64)
    ncand_NE = np.zeros((n_nodes, e_count), dtype=np.int64)
    remote_NER = np.zeros((n_nodes, e_count, r), dtype=bool)
    for n in range(n_nodes):
        for e, o in enumerate(owners):
            near = [s for s in o if node_of_slot[s] == n]
            # Without loads a token stays on its node's replicas; with them, the others may take
            # some where that levels the slots (replica_shares).
            cand = (near + [s for s in o if node_of_slot[s] != n]) if loads_E is not None else (near or o)
            cand_NER[n, e, :len(cand)] = cand
            ncand_NE[n, e] = len(cand)
            remote_NER[n, e, :len(cand)] = [node_of_slot[s] != n for s in cand]
    share_NER = (flow_shares(demand_ES, cand_NER, ncand_NE, remote_NER) if demand_ES is not None
                 else replica_shares(cand_NER, ncand_NE, remote_NER, np.asarray(loads_E, np.float64), s_count)
                 if loads_E is not None else np.where(np.arange(r) < ncand_NE[:, :, None], 1.0 / ncand_NE[:, :, None], 0.0))
    cum_NER = np.cumsum(share_NER, axis=-1)
    cum_NER[np.arange(r) >= ncand_NE[:, :, None]] = np.inf  # past the last candidate: never chosen
    return rep_ER, n_rep_E, cand_NER, ncand_NE, local_SE, cum_NER
