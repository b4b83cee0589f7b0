"""The shared-memory exchange (hpc_moe.ep.shm_exchange) under what can go wrong in shared memory:
peers that post late and in shuffled order, zero-row peers, every row to one rank, a slot that
must grow mid-run, two exchanges in flight on one channel; always bitwise the host transport's
result. Run at several sizes (mpiexec -n 1..16)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe.backend import bfloat16, get_backend
from hpc_moe.comm import ParallelContext
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.shm_exchange import ShmExchange

pytestmark = pytest.mark.mpi
NUMPY = get_backend("numpy", "bfloat16")
FORMS = pytest.mark.parametrize("deterministic", [False, True], ids=["weighted", "pairs"])


@pytest.fixture(scope="module")
def ctx():
    c = ParallelContext.create()
    yield c
    c.free()


def batch(rank: int, t: int, e: int, k: int, d: int, seed: int):
    rng = np.random.default_rng(1000 * seed + rank)
    k = min(k, e)
    x = rng.standard_normal((t, d)).astype(bfloat16)
    idx = np.argsort(rng.random((t, e)), axis=1)[:, :k]
    return x, idx, rng.random((t, k)).astype(np.float32)


def experts(d: Dispatcher):
    """f_e(x) = x * (1 + e) per pair, weighted into one row per received row unless pairs."""
    scale = 1 + np.array(d.local_experts(), np.float32)

    def fn(rec):
        out_Q = rec.x_ND[rec.row_Q].astype(np.float32) * scale[rec.local_expert_Q][:, None]
        if d.options.deterministic:
            return out_Q.astype(bfloat16)
        y = np.zeros((rec.x_ND.shape[0], rec.x_ND.shape[1]), np.float32)
        np.add.at(y, rec.row_Q, out_Q * rec.weight_Q[:, None])
        return y.astype(bfloat16)
    return fn


def both(ctx, e: int, deterministic: bool, steps, delay=None):
    """Run each (t, k, seed, idx_fn) of steps on host and shm dispatchers: [(y_host, y_shm, ex_shm)]."""
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    ds = {t: Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport=t, deterministic=deterministic, scheme="flat"))
          for t in ("host", "shm")}
    assert ds["shm"].flat_kind is ShmExchange
    out = []
    for i, (t, k, seed, idx_fn) in enumerate(steps):
        x, idx, w = batch(ctx.ep_rank, t, e, k, 64, seed)
        idx = idx_fn(idx) if idx_fn else idx
        ys = {}
        for name, d in ds.items():
            if delay is not None:
                time.sleep(delay(i, ctx.ep_rank))
            ex = d.post(None, x, idx, w)
            ex.run_experts(experts(d))
            ys[name] = (ex.wait(), ex)
        out.append((ys["host"][0], ys["shm"][0], ys["shm"][1]))
    for d in ds.values():
        d.close()
    return out


def assert_bitwise(y_host, y_shm):
    assert y_host.dtype == y_shm.dtype == bfloat16
    np.testing.assert_array_equal(y_host.view(np.uint16), y_shm.view(np.uint16))


@FORMS
def test_late_and_shuffled_arrivals_give_the_host_result(ctx, deterministic):
    """Each step a different rank posts last (sleeping up to 20 ms first): the flags, not the
    order of arrival, decide when rows are read."""
    rng = np.random.default_rng(5)
    delays = rng.random((6, ctx.ep_size)) * 0.02
    steps = [(5 + 3 * s, 2, s, None) for s in range(6)]
    for y_host, y_shm, _ in both(ctx, 2 * ctx.ep_size, deterministic, steps, delay=lambda i, r: delays[i, r]):
        assert_bitwise(y_host, y_shm)


@FORMS
def test_zero_row_peers_and_all_rows_to_one_rank(ctx, deterministic):
    """Odd ranks send nothing; then every token of every rank goes to expert 0 alone."""
    steps = [(0 if ctx.ep_rank % 2 else 7, 2, 1, None), (6, 1, 2, np.zeros_like)]
    (h0, s0, ex0), (h1, s1, ex1) = both(ctx, ctx.ep_size, deterministic, steps)
    assert_bitwise(h0, s0)
    assert_bitwise(h1, s1)
    owner = ex1._d.placement.owners(0)[0]
    assert ex1.recv_counts_P.sum() == (6 * ctx.ep_size if ctx.ep_rank == owner else 0)


@FORMS
def test_a_slot_that_must_grow(ctx, deterministic):
    """Batches 1, 4, 64 and 3 tokens: the windows are re-allocated (collectively) as they grow,
    and keep their size for the small batch after."""
    pl = ExpertPlacement.build(ctx.ep_size, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport="shm", deterministic=deterministic, scheme="flat"))
    host = Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport="host", deterministic=deterministic, scheme="flat"))
    slots, sizes = d.transport.slots, []
    for t in (1, 4, 64, 3):
        x, idx, w = batch(ctx.ep_rank, t, ctx.ep_size, min(2, ctx.ep_size), 64, t)
        assert_bitwise(host.exchange(None, x, idx, w, experts(host)), d.exchange(None, x, idx, w, experts(d)))
        sizes.append(slots.capacity())
    assert sizes[2] > sizes[1] >= sizes[0] > 0 and sizes[3] == sizes[2]
    d.close()
    host.close()


def test_two_in_flight_on_one_channel_and_no_third(ctx):
    """Two exchanges in flight on one channel, finished in reverse order; a third is refused
    (its rows would land where the first's are still read)."""
    pl = ExpertPlacement.build(ctx.ep_size, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport="shm", scheme="flat"))
    host = Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport="host", scheme="flat"))
    xs = [batch(ctx.ep_rank, 4 + i, ctx.ep_size, 1, 64, 10 + i) for i in range(2)]
    a, b = (d.post(None, *xb) for xb in xs)
    with pytest.raises(RuntimeError, match="at most 2 exchanges"):
        d.post(None, *xs[0])
    for ex in (b, a):
        ex.run_experts(experts(d))
    for ex, xb in zip((b, a), (xs[1], xs[0])):
        assert_bitwise(host.exchange(None, *xb, experts(host)), ex.wait())
    d.close()
    host.close()


def test_rows_are_written_into_the_receivers_memory(ctx):
    """The expert function gets its rows as a view of this rank's shared segment, and a place for
    its reply rows there (Received.out_ND) that the sources read without a copy."""
    pl = ExpertPlacement.build(ctx.ep_size, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport="shm", scheme="flat"))
    x, idx, w = batch(ctx.ep_rank, 8, ctx.ep_size, 1, 64, 3)
    ex = d.post(None, x, idx, w)
    rec = ex.received()
    window = ex._window
    assert np.shares_memory(rec.x_ND, window) and np.shares_memory(rec.out_ND, window)
    assert rec.out_ND.shape == rec.x_ND.shape and rec.out_ND.dtype == bfloat16
    np.multiply(rec.x_ND, w.dtype.type(1), out=rec.out_ND, casting="unsafe")  # identity, written in place
    ex.reply(rec.out_ND)
    y = ex.wait()
    host = Dispatcher(ctx, pl, NUMPY, DispatchOptions(transport="host", scheme="flat"))
    assert_bitwise(host.exchange(None, x, idx, w, lambda r: r.x_ND), y)
    host.close()
    d.close()
    MPI.COMM_WORLD.Barrier()
