"""scripts/gating_bias.py on the engine: rate 0 changes nothing against itself, a strong rate
changes top-k choices, and every rank reports the same global figures.

Run: mpiexec -n R python -m mpi4py -m pytest --with-mpi tests/mpi/test_gating_bias.py (R = 1..8).
"""
import importlib.util
import os

import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe.comm import ParallelContext

pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("gating_bias", os.path.join(ROOT, "scripts", "gating_bias.py"))
gating_bias = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gating_bias)


def test_rate_zero_is_the_reference_and_a_strong_rate_moves_topk():
    a = gating_bias.parse(["--config", "tiny", "--rates", "0.05", "--adapt-steps", "3", "--prompts", "2",
                           "--prompt-len", "8", "--new-tokens", "3", "--reps", "2"])
    rows, walls = gating_bias.measure(a, ParallelContext.create())
    assert [r["rate"] for r in rows] == [0.0, 0.05]
    zero, strong = rows
    assert (zero["drift"], zero["changed"], zero["agree"], zero["identical"]) == (0.0, 0.0, 1.0, 1.0)
    assert strong["drift"] > 0 and strong["changed"] > 0
    assert all(len(w) == 2 for w in walls.values())
    # The figures are global (reduced over ranks): every rank holds the same.
    mine = np.array([[r["changed"], r["load"], r["agree"], r["identical"]] for r in rows])
    assert np.array_equal(mine, WORLD.bcast(mine, root=0))
