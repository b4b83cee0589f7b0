"""How hpc_moe.ep.placement packs experts onto slots: EPLB's replication and balanced packing,
the colocation of more experts than slots, the refinement of a packing by local search (the
``-refined`` policies), the ``cut`` policy's line of experts cut at the mean, and the shares of an
expert's tokens its replicas take. Pure functions, no MPI.

DeepSeek's EPLB packs replicas greedily, heaviest first onto the least loaded slot that has room;
with several replicas a slot, that greedy order can leave the hottest slot well above the mean
(a slot's last replica lands where the room is, not where the load is low). The refinement takes
the hottest slot and the best swap of one of its replicas with one of another slot's (or a move
of one to a slot that holds one fewer), as long as that lowers the larger of the two slots'
loads; a slot never holds two replicas of one expert, and every slot keeps its count (or the
floor/ceil spread of counts), so memory per rank is unchanged.

Also here: the shares of an expert's tokens its replicas take: ``replica_shares`` water-fills them
so as to level the slots where an even split would not; ``flow_shares`` gives each replica the
piece ``cut`` meant for it, each node's tokens on its own replicas first.

Legend: S slots, Q replicas a slot (most), E experts, q the hottest slot's replicas, N nodes, R
candidate replicas.
"""
from __future__ import annotations

import itertools

import numpy as np

# A replica on another node takes a token only where the token's own node's replicas would be this
# share of the mean slot load hotter: a crossing costs link time, a slightly hotter slot little.
# A hysteresis, not a price: the step's cost is the slowest rank's rows plus the busiest node's
# link time, two maxima, so a row's spill either pays (it comes off the hottest rank and the link
# has slack) or not; no level offset follows from the links. auto prices whole placements instead.
SPILL = 0.05


def replicate(loads_m: np.ndarray, n_physical: int, max_each: int | None = None) -> np.ndarray:
    """EPLB: one replica each, then each spare physical expert to the expert with the highest
    load / replicas (at most max_each replicas: one per slot)."""
    counts = np.ones(len(loads_m), dtype=np.int64)
    for _ in range(n_physical - len(loads_m)):
        per = np.where(counts < (max_each or n_physical), loads_m / counts, -1.0)
        if per.max() < 0:  # every expert has a replica on every slot
            break
        counts[int(np.argmax(per))] += 1
    return counts


def pack(counts_E: np.ndarray, loads_E: np.ndarray, slots: list[int], node_of_slot) -> list[list[int]]:
    """EPLB's balanced packing: the replicas (expert e counts_E[e] times, each carrying
    load / counts) onto ``slots``, floor/ceil(replicas / slots) each, heaviest first onto the least
    loaded slot that has room and does not hold that expert yet; ties go to a node that does not
    hold it, so that replicas spread over nodes (a token uses one on its own node)."""
    e_R = np.repeat(np.arange(len(counts_E)), counts_E)
    load_R = loads_E[e_R] / counts_E[e_R]
    q, r = divmod(len(e_R), len(slots))
    held: list[list[int]] = [[] for _ in slots]
    load = np.zeros(len(slots))
    big = 0
    for i in np.argsort(-load_R, kind="stable"):
        e = int(e_R[i])
        nodes_with_e = {node_of_slot[slots[j]] for j in range(len(slots)) if e in held[j]}
        ok = [j for j in range(len(slots)) if e not in held[j]
              and (len(held[j]) < q or (len(held[j]) == q and big < r))]
        # Late in the packing every slot with room may hold e already: then one slot takes one more.
        ok = ok or [j for j in range(len(slots)) if e not in held[j]]
        j = min(ok, key=lambda j: (load[j], node_of_slot[slots[j]] in nodes_with_e, len(held[j]), j))
        big += len(held[j]) == q
        held[j].append(e)
        load[j] += load_R[i]
    return held


def colocate(ex: np.ndarray, loads_E: np.ndarray, n_slots: int) -> list[list[int]]:
    """Experts ``ex`` on n_slots slots, floor/ceil(m / n_slots) each: contiguous blocks for equal
    loads, else longest-processing-time first onto the least loaded slot that may take one more."""
    q, r = divmod(len(ex), n_slots)
    loads = loads_E[ex]
    if np.ptp(loads) == 0:
        sizes = [q + 1] * r + [q] * (n_slots - r)
        starts = np.cumsum([0] + sizes)
        return [[int(e) for e in ex[starts[i]:starts[i + 1]]] for i in range(n_slots)]
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    load = np.zeros(n_slots)
    big = 0
    for i in np.argsort(-loads, kind="stable"):
        ok = [s for s in range(n_slots) if len(slots[s]) < q or (len(slots[s]) == q and big < r)]
        s = min(ok, key=lambda j: (load[j], len(slots[j]), j))
        big += len(slots[s]) == q
        slots[s].append(int(ex[i]))
        load[s] += loads[i]
    return slots


def refine(held: list[list[int]], load_E: np.ndarray, groups: list[list[int]], rounds: int = 10_000) -> list[list[int]]:
    """held[s]: the experts slot s holds (each replica carries load_E[e] / its replica count,
    float64 [E]); groups: lists of slot indices the replicas may move within (all slots, or one
    node's). -> the refined held lists (new lists; the replica counts are unchanged)."""
    held = [list(h) for h in held]
    counts_E = np.bincount([e for h in held for e in h], minlength=len(load_E))
    w_E = load_E / np.maximum(counts_E, 1)
    for group in groups:
        if len(group) > 1:
            _refine_group(held, w_E, group, rounds)
    return held


def _refine_group(held: list[list[int]], w_E: np.ndarray, group: list[int], rounds: int) -> None:
    n_exp = len(w_E)
    for _ in range(rounds):
        q = max(len(held[s]) for s in group)
        items_SQ = np.full((len(group), q), n_exp, dtype=np.int64)  # n_exp: an empty place
        for i, s in enumerate(group):
            items_SQ[i, :len(held[s])] = held[s]
        w_SQ = np.append(w_E, 0.0)[items_SQ]
        load_S = w_SQ.sum(axis=1)
        a = int(np.argmax(load_S))
        top = load_S[a]
        have_SE = np.zeros((len(group), n_exp + 1), dtype=bool)
        have_SE[np.arange(len(group))[:, None], items_SQ] = True
        have_SE[:, n_exp] = False
        mine = items_SQ[a, :len(held[group[a]])]
        wa = w_E[mine]
        # Swap mine[i] with slot b's item j (j may be an empty place: a move to a slot with room).
        new_a = top - wa[None, :, None] + w_SQ[:, None, :]
        new_b = load_S[:, None, None] - w_SQ[:, None, :] + wa[None, :, None]
        worst = np.maximum(new_a, new_b)
        ok = ~have_SE[:, mine][:, :, None] & ~have_SE[a][items_SQ][:, None, :]
        ok[a] = False
        lens = np.array([len(held[s]) for s in group])
        empty = items_SQ == n_exp
        ok &= ~empty[:, None, :] | (lens[:, None, None] < lens[a])  # a move only to a slot holding fewer
        worst = np.where(ok, worst, np.inf)
        b, i, j = np.unravel_index(int(np.argmin(worst)), worst.shape)
        if not worst[b, i, j] < top * (1 - 1e-9):
            return
        sa, sb = group[a], group[int(b)]
        e_out, e_in = int(mine[i]), int(items_SQ[b, j])
        held[sa].remove(e_out)
        held[sb].append(e_out)
        if e_in != n_exp:
            held[sb].remove(e_in)
            held[sa].append(e_in)


def replica_shares(cand_NER: np.ndarray, ncand_NE: np.ndarray, remote_NER: np.ndarray, load_E: np.ndarray,
                   n_slots: int, spill: float = SPILL, sweeps: int = 6) -> np.ndarray:
    """float64 [N, E, R]: the share of node n's tokens for expert e that goes to its candidate
    replica cand_NER[n, e, j] (j < ncand_NE[n, e]; remote_NER: the candidate is on another node).

    Tokens are taken as spread evenly over the nodes, and start on the replicas of their own
    node (all replicas alike where the node has none). Then each (node, expert) pours its tokens
    into its candidates' slots as water into vessels (the least loaded first, up to a common
    level), expert after expert, heaviest first, for a few sweeps, a replica on another node seen
    ``spill`` x the mean slot load higher: tokens stay on their node unless that leaves its
    replica that much hotter than a remote one, and an even split no longer leaves the slot that
    also holds a hot expert, or the one replica of a node, above the rest."""
    n_nodes, _, r = cand_NER.shape
    valid = np.arange(r)[None, None, :] < ncand_NE[:, :, None]
    home = valid & ~remote_NER
    start = np.where(home.any(axis=2, keepdims=True), home, valid)
    share = start / start.sum(axis=2, keepdims=True)
    mass_NE = np.broadcast_to(load_E[None, :] / n_nodes, ncand_NE.shape)
    slot_S = np.zeros(n_slots)
    np.add.at(slot_S, cand_NER, share * mass_NE[:, :, None])
    penalty = spill * load_E.sum() / n_slots
    pairs = [(n, e) for e in np.argsort(-load_E, kind="stable") for n in range(n_nodes) if ncand_NE[n, e] > 1]
    for _ in range(sweeps if pairs else 0):
        for n, e in pairs:
            k, m = ncand_NE[n, e], mass_NE[n, e]
            c = cand_NER[n, e, :k]
            lift = np.where(remote_NER[n, e, :k] & home[n, e].any(), penalty, 0.0)
            base = slot_S[c] - share[n, e, :k] * m
            new = np.maximum(_level(base + lift, m) - base - lift, 0.0)
            new *= m / new.sum() if new.sum() > 0 else 0.0
            slot_S[c] = base + new
            share[n, e, :k] = new / m if m > 0 else 1.0 / k
    return share


def _level(base: np.ndarray, mass: float) -> float:
    """The level t at which sum(max(0, t - base)) = mass."""
    b = np.sort(base)
    cum = np.cumsum(b)
    for k in range(1, len(b) + 1):
        t = (mass + cum[k - 1]) / k
        if k == len(b) or t <= b[k]:
            return float(t)
    return float(b[-1])


def cut(loads_E: np.ndarray, caps_S: list[int]) -> tuple[list[list[int]], np.ndarray] | None:
    """The experts (loads float [E]) on len(caps_S) slots, slot s holding at most caps_S[s] of them,
    the heaviest laid end to end and cut where a slot reaches the mean: -> (the experts of each
    slot, piece_ES float64 [E, S]: the load of expert e slot s takes), or None.

    The E - h lightest experts are spread whole over the slots (evenly by count, one or two places
    a slot kept for the line, heaviest first onto the least loaded), then the h heaviest, laid end
    to end, fill each slot's remaining places up to the mean load (or a little above it), an expert
    cut where a slot reaches it: its rest starts the next slot, so no slot holds an expert twice;
    a slot full below the mean gives a light expert's place to the line (the light one moves on).
    Every cut is one replica more, so the spare places bound the cuts. A sample of h from
    S - spare to E, both line widths and a few fill levels are tried, the lowest hottest slot kept
    (then the fewest replicas). A cut expert's replicas take unequal shares, its pieces: with
    about S - 1 spare places every slot reaches the mean, which an even split over replicas cannot.
    None where no slot holds two experts (a cut then only makes replicas, best split evenly:
    EPLB's global policy) or no construction fits the places."""
    loads = np.asarray(loads_E, np.float64)
    n_exp, n_slots = len(loads), len(caps_S)
    order = sorted(range(n_exp), key=lambda e: (-loads[e], e))  # heaviest first
    if max(caps_S) < 2:
        return None
    lo = max(1, n_exp - sum(c - 1 for c in caps_S))
    hs = sorted({int(h) for h in np.linspace(lo, n_exp, min(16, n_exp - lo + 1))})
    best = None
    for h, line_places, over in itertools.product(hs, (1, 2), (1.0, 1.02, 1.05, 1.1, 1.2)):
        got = _line(loads, caps_S, order[:h], order[h:], line_places, over)
        if got is not None:
            key = (round(got[1].sum(axis=0).max() / max(loads.sum() / n_slots, 1e-300), 9), (got[1] > 0).sum())
            if best is None or key < best[0]:
                best = (key, got)
    return None if best is None else best[1]


def _line(loads: np.ndarray, caps_S: list[int], heavy: list[int], light: list[int], line_places: int,
          over: float):
    """cut's construction for one split into heavy (laid on the line) and light (whole) experts,
    line_places of each slot's places kept from the light ones (2: room for the end of one heavy
    expert and the start of the next), each slot filled up to ``over`` x the mean (above 1 where
    too few places are spare to cut at every slot: fewer cuts, and the last slots not overfull);
    None where the places do not suffice."""
    n_slots = len(caps_S)
    held: list[list[int]] = [[] for _ in range(n_slots)]
    piece_ES = np.zeros((len(loads), n_slots))
    q, r = divmod(len(light), n_slots)
    room = [max(0, min(c - line_places, q + (s < r))) for s, c in enumerate(caps_S)]  # lights a slot may take
    if sum(room) < len(light):
        return None
    for e in light:  # heaviest first (light is in that order) onto the least loaded slot with room
        s = min((s for s in range(n_slots) if len(held[s]) < room[s]), key=lambda s: (piece_ES[:, s].sum(), s))
        held[s].append(e)
        piece_ES[e, s] = loads[e]
    target = over * loads.sum() / n_slots
    line = [[e, loads[e]] for e in heavy]
    lights, pool = set(light), []  # pool: lights evicted to make room for the line, for later slots
    for s in range(n_slots):
        while pool and len(held[s]) < caps_S[s] - (s < n_slots - 1):
            e = pool.pop()
            held[s].append(e)
            piece_ES[e, s] = loads[e]
        used = piece_ES[:, s].sum()
        while line and (used < target * (1 - 1e-12) or s == n_slots - 1):
            if len(held[s]) == caps_S[s]:  # full below the mean: a light expert gives its place to the line
                mine = [e for e in held[s] if e in lights]
                if not mine or s == n_slots - 1:
                    break
                e = min(mine, key=lambda e: (loads[e], e))
                held[s].remove(e)
                used -= piece_ES[e, s]
                piece_ES[e, s] = 0.0
                pool.append(e)
                continue
            e, rest = line[0]
            take = rest if s == n_slots - 1 else min(rest, target - used)
            held[s].append(e)
            piece_ES[e, s] += take
            used += take
            line[0][1] -= take
            if line[0][1] <= 1e-12 * max(loads[e], 1e-300):
                line.pop(0)
            elif s < n_slots - 1:
                break  # the slot is at the mean: e's rest starts the next slot
    if line or pool:
        return None
    return held, piece_ES


def flow_shares(frac_ES: np.ndarray, cand_NER: np.ndarray, ncand_NE: np.ndarray,
                remote_NER: np.ndarray) -> np.ndarray:
    """float64 [N, E, R]: the shares of node n's tokens for expert e over its candidates
    cand_NER[n, e, :ncand_NE[n, e]] (remote_NER: on another node) such that every replica slot s
    receives frac_ES[e, s] of e's tokens (float [E, S], rows summing to 1; tokens spread evenly
    over the nodes), as few crossing nodes as that allows: each node's tokens first fill its own
    replicas' demand, what is left of them goes to what is left of the demand, in proportion."""
    n_nodes, n_exp, r = cand_NER.shape
    share_NER = np.zeros(cand_NER.shape)
    for e in range(n_exp):
        slots = cand_NER[0, e, :ncand_NE[0, e]]  # every node has all of e's replicas as candidates
        want = frac_ES[e, slots].astype(np.float64)
        flow_NJ = np.zeros((n_nodes, len(slots)))
        supply = np.full(n_nodes, 1.0 / n_nodes)
        for n in range(n_nodes):
            mine = np.isin(slots, cand_NER[n, e, :ncand_NE[n, e]][~remote_NER[n, e, :ncand_NE[n, e]]])
            room = want[mine].sum()
            if room > 0:
                give = min(supply[n], room)
                flow_NJ[n, mine] = give * want[mine] / room
                want[mine] -= flow_NJ[n, mine]
                supply[n] -= give
        if want.sum() > 1e-15:
            flow_NJ += supply[:, None] * (want / want.sum())[None, :]
        pos = {int(s): j for j, s in enumerate(slots)}
        for n in range(n_nodes):
            k = ncand_NE[n, e]
            share_NER[n, e, :k] = [flow_NJ[n, pos[int(s)]] * n_nodes for s in cand_NER[n, e, :k]]
    return share_NER
