"""ep/migration.moves: which experts change owner at a re-placement and who sends each (pure; the
transfers themselves: tests/mpi/test_migration.py)."""
import numpy as np

from hpc_moe.ep.migration import moves
from hpc_moe.ep.placement import ExpertPlacement


def test_moves_name_every_new_owner_and_a_sender_of_the_same_shard():
    E, ep, tp = 8, 8, 2  # 4 slots of 2 ranks: each rank holds its shard of 2 experts
    old = ExpertPlacement.build(E, ep, tp, [0] * ep, 2, layers=[1], policy="global")
    new = old.from_loads(np.arange(E, dtype=np.float64)[None] ** 3)
    todo = moves(old, new, [1])
    assert todo == moves(old, new, [1])  # the same order every time: both sides post by it
    want = {(r, e) for r in range(ep) for e in new.local_experts(r, 1) if e not in old.local_experts(r, 1)}
    assert want and {(m.dst, m.expert) for m in todo} == want and len(todo) == len(want)
    for m in todo:
        assert m.expert in old.local_experts(m.src, 1) and m.src % tp == m.dst % tp


def test_no_moves_for_the_same_placement():
    p = ExpertPlacement.build(8, 4, 1, [0, 0, 1, 1], 2, layers=[1, 2])
    assert moves(p, p, [1, 2]) == []
