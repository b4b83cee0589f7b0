"""How each placement policy places one MoE layer's experts on the slots, and how a new map is laid
over the old one so that a re-placement moves few experts. Pure functions, no MPI; used by
hpc_moe.ep.placement.

Policies (hpc_moe.ep.choices.POLICIES): EPLB's ``hierarchical`` (routing groups packed onto nodes
by load, then replicas and packing inside each node) and ``global`` (replicas of the hot experts
anywhere, packed over all slots), each optionally ``-refined`` by swaps of replicas
(hpc_moe.ep.packing.refine), and ``cut``: the heavy experts' loads laid end to end over the slots
(the nodes in turn) and cut into pieces that bring every slot to the mean (hpc_moe.ep.packing.cut). EPLB splits an expert's load
evenly over its replicas, so its packings can only approach a level rank load; ``cut`` gives the
replicas of a cut expert unequal shares (``demand``), which the router then follows.

Legend: E experts, S slots.
"""
from __future__ import annotations

import itertools

import numpy as np

from hpc_moe.ep.packing import colocate, cut, pack, refine, replicate


def place_layer(n_experts: int, node_of_slot, n_group: int, loads_E: np.ndarray, policy: str = "hierarchical",
                redundant: int = 0, node_cost=None) -> tuple[tuple[tuple[int, ...], ...], np.ndarray | None]:
    """-> (the sorted experts of every slot, demand float64 [E, S] or None): demand[e, s] is the
    share of expert e's tokens slot s is meant to take (``cut``; None: the router levels the
    replicas' shares itself, hpc_moe.ep.packing.replica_shares). ``cut`` is global's placement
    where its pieces leave a slot no lower than global's even split does (one place a slot, or
    too few spare places)."""
    s_total = len(node_of_slot)
    base = policy.removesuffix("-refined")
    nodes = sorted(set(node_of_slot))
    slots_by_node = [[s for s in range(s_total) if node_of_slot[s] == n] for n in nodes]
    def global_held():
        counts = replicate(loads_E, max(s_total, n_experts + redundant), s_total)
        return pack(counts, loads_E, list(range(s_total)), node_of_slot)

    demand_ES, pieces = None, None
    if base == "cut":
        q, r = divmod(max(s_total, n_experts + redundant), s_total)
        # The nodes in turn: a heavy expert's consecutive pieces land on different nodes, where more
        # nodes' tokens find a replica at home (node after node, they would all cross to one node).
        order = [s for group in itertools.zip_longest(*slots_by_node) for s in group if s is not None]
        pieces = cut(loads_E, [q + (i * r // s_total != (i + 1) * r // s_total) for i in range(s_total)])
    if pieces is not None and pieces[1].sum(axis=0).max() >= _even_max(global_held(), loads_E):
        pieces = None  # too few spare places to cut well: global's placement, levelled by its shares
    if pieces is not None:
        held_o, piece_ES = pieces
        held = [[] for _ in range(s_total)]
        demand_ES = np.zeros((n_experts, s_total))
        for i, s in enumerate(order):
            held[s] = held_o[i]
            demand_ES[:, s] = piece_ES[:, i]
        demand_ES /= demand_ES.sum(axis=1, keepdims=True)
    elif base in ("global", "cut"):
        held = global_held()
    else:
        held = hierarchical(n_experts, node_of_slot, n_group, loads_E, redundant, slots_by_node)
    if base != policy:
        held = refine(held, loads_E, [list(range(s_total))] if base == "global" else slots_by_node)
    slot_map = tuple(tuple(sorted(x)) for x in held)
    perm = by_links(slot_map, node_of_slot, loads_E, node_cost)
    return permute(slot_map, demand_ES, perm)


def _even_max(held, loads_E: np.ndarray) -> float:
    """The hottest slot's load with each expert's load split evenly over its replicas."""
    counts = np.bincount([e for h in held for e in h], minlength=len(loads_E))
    return max(sum(loads_E[e] / counts[e] for e in h) for h in held)


def permute(slot_map, demand_ES, src_of_S):
    """The map (and demand's columns) with slot s taking what slot src_of_S[s] held."""
    return (tuple(slot_map[j] for j in src_of_S),
            None if demand_ES is None else demand_ES[:, list(src_of_S)])


def hierarchical(n_experts: int, node_of_slot, n_group: int, loads_E: np.ndarray, redundant: int,
                 slots_by_node: list[list[int]]) -> list[list[int]]:
    """EPLB's hierarchical policy: -> the experts of each slot."""
    s_total = len(node_of_slot)
    # Node n gets a contiguous share of the expert order proportional to its slots.
    cum = np.cumsum([0] + [len(x) for x in slots_by_node])
    bounds = (n_experts * cum) // s_total
    order = _group_order(n_experts, n_group, np.diff(bounds), loads_E)
    result: list[list[int]] = [[] for _ in range(s_total)]
    empty: list[int] = []
    for n, slots in enumerate(slots_by_node):
        ex = order[bounds[n]:bounds[n + 1]]
        if len(ex) == 0:
            empty.extend(slots)
        elif len(ex) <= len(slots):
            counts = replicate(loads_E[ex], len(slots))
            for s, e in zip(slots, np.repeat(ex, counts)):
                result[s] = [int(e)]
        elif redundant:  # colocated with spare replicas: this node's share of them
            counts = np.zeros(n_experts, np.int64)
            counts[ex] = replicate(loads_E[ex], len(ex) + redundant * len(slots) // s_total, len(slots))
            for s, held in zip(slots, pack(counts, loads_E, slots, node_of_slot)):
                result[s] = held
        else:
            for s, group in zip(slots, colocate(ex, loads_E, len(slots))):
                result[s] = group
    if empty:  # fewer experts than nodes: the expert-less nodes take global replicas
        counts = np.zeros(n_experts)
        for held in result:
            for e in held:
                counts[e] += 1
        for s in empty:
            e = int(np.argmax(loads_E / counts))
            counts[e] += 1
            result[s] = [e]
    return result


def by_links(slot_map, node_of_slot, loads_E: np.ndarray, node_cost) -> list[int]:
    """-> src_of_S: the nodes' contents exchanged whole (each node's slots keep their experts,
    groups and replicas together) so that the heavier a node's experts, the cheaper its links: the
    heaviest load on the node of least cost minimises the largest (load x cost). The identity
    without costs, with nodes of unequal size, or with equal loads."""
    nodes = sorted(set(node_of_slot))
    slots_of = [[s for s, n in enumerate(node_of_slot) if n == k] for k in nodes]
    out = list(range(len(slot_map)))
    if node_cost is None or len({len(x) for x in slots_of}) != 1:
        return out
    replicas = np.bincount([e for held in slot_map for e in held], minlength=len(loads_E))
    load_N = np.array([sum(loads_E[e] / replicas[e] for s in slots for e in slot_map[s]) for slots in slots_of])
    if np.ptp(load_N) <= 1e-6 * load_N.max():
        return out
    for heavy, node in zip(np.argsort(-load_N, kind="stable"), np.argsort([node_cost[k] for k in nodes], kind="stable")):
        for src, dst in zip(slots_of[heavy], slots_of[node]):
            out[dst] = src
    return out


def match(old_map, new_map, node_of_slot, whole_nodes: bool) -> list[int]:
    """-> src_of_S: new_map's slot contents laid over old_map's slots so that as many experts as
    possible stay where they are (greedily, the largest overlaps first): slots are exchanged inside
    a node, and whole nodes' contents between nodes of equal size where ``whole_nodes`` (links of
    equal cost). Neither changes what the placement costs: the nodes' slots are alike."""
    nodes = sorted(set(node_of_slot))
    slots_of = [[s for s, n in enumerate(node_of_slot) if n == k] for k in nodes]
    node_src = list(range(len(nodes)))
    if whole_nodes and len({len(x) for x in slots_of}) == 1:
        def held(k, m):
            return [e for s in slots_of[k] for e in m[s]]
        node_src = _greedy([[_overlap(held(a, old_map), held(b, new_map)) for b in range(len(nodes))]
                            for a in range(len(nodes))])
    out = list(range(len(new_map)))
    for a, slots in enumerate(slots_of):
        src_slots = slots_of[node_src[a]]
        pick = _greedy([[_overlap(old_map[d], new_map[s]) for s in src_slots] for d in slots])
        for d, j in zip(slots, pick):
            out[d] = src_slots[j]
    return out


def _overlap(a, b) -> int:
    return len(set(a) & set(b))


def _greedy(gain_AB) -> list[int]:
    """An assignment row -> column of a square gain matrix, the largest gains first (ties: the
    identity's pairs first, so that nothing moves without a gain)."""
    n = len(gain_AB)
    pairs = sorted((-gain_AB[a][b], a != b, a, b) for a in range(n) for b in range(n))
    row, col = [-1] * n, [False] * n
    for _, _, a, b in pairs:
        if row[a] < 0 and not col[b]:
            row[a], col[b] = b, True
    return row


def _group_order(n_experts: int, n_group: int, per_node, loads_E) -> np.ndarray:
    """Expert order to cut into node shares: whole routing groups packed onto nodes by load
    when every node's share is a whole number of groups, else the natural order."""
    gs = n_experts // n_group
    natural = np.arange(n_experts)
    if n_group == 1 or any(c % gs for c in per_node) or np.ptp(loads_E) == 0:
        return natural
    group_load = loads_E.reshape(n_group, gs).sum(1)
    cap = [c // gs for c in per_node]
    load = np.zeros(len(cap))
    members: list[list[int]] = [[] for _ in cap]
    for g in np.argsort(-group_load, kind="stable"):
        open_nodes = [n for n in range(len(cap)) if len(members[n]) < cap[n]]
        n = min(open_nodes, key=lambda i: (load[i], i))
        members[n].append(int(g))
        load[n] += group_load[g]
    return np.concatenate([natural[g * gs:(g + 1) * gs] for m in members for g in sorted(m)])
