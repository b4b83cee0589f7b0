"""measure_links at every world size, on the real node and on simulated nodes of 2 ranks."""
import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe.comm import ParallelContext
from hpc_moe.links import measure_links

pytestmark = pytest.mark.mpi
WORLD = MPI.COMM_WORLD


@pytest.mark.parametrize("ranks_per_node", [None, 2, 3])
def test_every_link_measured_and_the_same_on_every_rank(ranks_per_node):
    ctx = ParallelContext.create(WORLD, ranks_per_node=ranks_per_node)
    lk = measure_links(ctx, message_bytes=1 << 16, reps=3)
    n = ctx.num_nodes
    assert lk.bytes_per_s_NN.shape == lk.latency_s_NN.shape == (n, n)
    alone = np.bincount(ctx.node_of_rank, minlength=n) == 1
    diag_bw, diag_lat = np.diag(lk.bytes_per_s_NN), np.diag(lk.latency_s_NN)
    assert np.all(np.isnan(diag_bw[alone]) & np.isnan(diag_lat[alone]))
    off = ~np.eye(n, dtype=bool)
    for a in (lk.bytes_per_s_NN[off], lk.latency_s_NN[off], diag_bw[~alone], diag_lat[~alone]):
        assert np.all(np.isfinite(a) & (a > 0))
    every = WORLD.allgather(lk.to_dict())
    assert all(d == every[0] for d in every)
    ctx.free()
