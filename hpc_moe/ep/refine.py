"""A packing's refinement by local search: the direct rank-load minimiser behind the ``balanced``
placement policies (hpc_moe.ep.placement). Pure functions, no MPI.

DeepSeek's EPLB packs replicas greedily, heaviest first onto the least loaded slot that has room;
with several replicas a slot that greedy order can leave the hottest slot well above the mean
(a slot's last replica lands where the room is, not where the load is low). The refinement takes
the hottest slot and the best swap of one of its replicas with one of another slot's (or a move
of one to a slot that holds one fewer), as long as that lowers the larger of the two slots'
loads; a slot never holds two replicas of one expert, and every slot keeps its count (or the
floor/ceil spread of counts), so memory per rank is unchanged.

Legend: S slots, Q replicas a slot (most), E experts, q the hottest slot's replicas.
"""
from __future__ import annotations

import numpy as np


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
