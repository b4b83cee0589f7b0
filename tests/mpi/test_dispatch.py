"""Dispatch/combine over MPI. Run at several sizes:

    for n in 1 2 4 8 16; do
      mpiexec -n $n python -m mpi4py -m pytest --with-mpi tests/mpi/test_dispatch.py; done

Every rank can regenerate every other rank's tokens (seeded by source rank), so a receiver checks
each row it gets against the row its source must have sent: misrouting shows as a wrong tag.
Legend: T tokens, K top-k, D hidden, N received rows, Q pairs.
"""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe import backend as bk
from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext, ParallelError
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.transport import TransportError, make_transport
from hpc_moe.fp8 import _e4m3_bits, fp8_dequantize, fp8_quantize

pytestmark = pytest.mark.mpi
D = 32
NUMPY = get_backend("numpy")


@pytest.fixture(scope="module")
def ctx():
    c = ParallelContext.create(ranks_per_node=2)
    yield c
    c.free()


def tokens(src: int, t: int, k: int, n_experts: int, seed: int = 0):
    """Rank ``src``'s batch: x[t] = [src, t, random...], distinct top-k ids, weights."""
    rng = np.random.default_rng(1000 * seed + src)
    x = rng.standard_normal((t, D)).astype(np.float32)
    x[:, 0], x[:, 1] = src, np.arange(t)
    k = min(k, n_experts)
    idx = np.argsort(rng.random((t, n_experts)), axis=1)[:, :k].astype(np.int64)
    w = rng.random((t, k)).astype(np.float32)
    return x, idx, w


def expert_fn_for(d: Dispatcher, layer=None):
    """f_e(x) = x * (1 + e); with expert TP each of the tp ranks returns its 1/tp share."""
    glob = np.array(d.local_experts(layer), dtype=np.float32)
    return lambda x_QD, local_Q: x_QD * ((1 + glob[local_Q]) / d.tp)[:, None]


def reference(x, idx, w):
    y = np.zeros_like(x)
    for k in range(idx.shape[1]):
        y += w[:, k, None] * (x * (1 + idx[:, k, None]).astype(np.float32))
    return y


def run_exchange(ctx, n_experts, t_of_rank, alg="alltoallv", payload="native", k=4, seed=0,
                 idx_of_rank=None, placement=None):
    pl = placement or ExpertPlacement.build(n_experts, ctx.ep_size, ctx.expert_tp, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, DispatchOptions(algorithm=alg, payload=payload))
    x, idx, w = tokens(ctx.ep_rank, t_of_rank(ctx.ep_rank), k, n_experts, seed)
    if idx_of_rank is not None:
        idx = idx_of_rank(idx)
    y = d.exchange(x, idx, w, expert_fn_for(d))
    stats = d.last_stats
    d.close()
    return x, idx, w, y, stats


SHAPES = {  # experts as a function of the EP size
    "one_per_rank": lambda p: p,
    "colocated": lambda p: 2 * p + 1,
    "replicated": lambda p: max(1, p // 2),
}


@pytest.mark.parametrize("alg", ["alltoallv", "pipelined"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_exchange_matches_local_reference(ctx, alg, shape):
    e = SHAPES[shape](ctx.ep_size)
    x, idx, w, y, _ = run_exchange(ctx, e, lambda r: 7 + 3 * r, alg, k=min(4, e), seed=1)
    np.testing.assert_allclose(y, reference(x, idx, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alg", ["alltoallv", "pipelined"])
def test_empty_ranks_take_part(ctx, alg):
    e = 2 * ctx.ep_size
    x, idx, w, y, stats = run_exchange(ctx, e, lambda r: 0 if r % 2 else 5, alg, seed=2)
    assert y.shape == (x.shape[0], D)
    np.testing.assert_allclose(y, reference(x, idx, w), rtol=1e-6, atol=1e-6)
    if ctx.ep_rank % 2:
        assert stats.send_rows_P.sum() == 0


@pytest.mark.parametrize("alg", ["alltoallv", "pipelined"])
def test_all_tokens_to_one_expert(ctx, alg):
    e = ctx.ep_size
    x, idx, w, y, stats = run_exchange(ctx, e, lambda r: 6, alg, k=1, seed=3,
                                       idx_of_rank=lambda i: np.zeros_like(i))
    np.testing.assert_allclose(y, reference(x, idx, w), rtol=1e-6, atol=1e-6)
    assert stats.recv_rows_P.sum() == (6 * ctx.ep_size if ctx.ep_rank == 0 else 0)


def test_rows_are_tagged_deduplicated_and_grouped(ctx):
    """Rows arrive grouped by source, once per (token, rank), with the right local experts."""
    e, k, p = 3 * ctx.ep_size, 5, ctx.ep_size
    pl = ExpertPlacement.build(e, p, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY)
    x, idx, w = tokens(ctx.ep_rank, 9, k, e, seed=4)
    recv_x, pairs, handle = d.dispatch(x, idx, w)
    mine = np.array(pl.local_experts(ctx.ep_rank))
    want_rows, want_pairs = [], []
    for src in range(p):
        xs, ids, _ = tokens(src, 9, k, e, seed=4)
        for t in range(9):
            local = [int(np.nonzero(mine == ex)[0][0]) for ex in ids[t] if ex in mine]
            if local:
                want_rows.append(xs[t])
                want_pairs += [(len(want_rows) - 1, loc) for loc in local]
    got_tags = recv_x[:, :2].tolist()
    assert got_tags == [list(r[:2]) for r in want_rows]  # (source, token) in source order
    np.testing.assert_array_equal(recv_x, np.array(want_rows).reshape(-1, D))
    assert list(zip(pairs.row_Q.tolist(), pairs.local_expert_Q.tolist())) == want_pairs
    assert handle.stats.recv_rows_P.sum() == len(want_rows)
    y = d.combine(pairs.gather(recv_x, NUMPY) * 0 + 1, handle)  # unit outputs: y = sum_k w
    np.testing.assert_allclose(y, np.repeat(w.sum(1, keepdims=True), D, axis=1), rtol=1e-6)
    d.close()


def test_stats_balance_across_ranks(ctx):
    e = 2 * ctx.ep_size
    *_, stats = run_exchange(ctx, e, lambda r: 4 + r, seed=5)
    sent = np.zeros((ctx.ep_size,), dtype=np.int64)
    ctx.ep_comm.Allreduce(stats.send_rows_P, sent)
    assert sent[ctx.ep_rank] == stats.recv_rows_P.sum()
    width = D * 4 + -(-4 * min(4, e) // 8) * 8  # x, then int32 [K] metadata, 8-byte aligned
    assert np.array_equal(stats.send_bytes_P, stats.send_rows_P * width)
    assert stats.pairs_per_local_expert_L.sum() == stats.combine_send_bytes_P.sum() // (D * 4)
    d = stats.as_dict()
    assert d["dispatch_send_bytes_remote"] <= int(stats.send_bytes_P.sum())


@pytest.mark.parametrize("alg", ["alltoallv", "pipelined"])
def test_fp8_payload(ctx, alg):
    e = ctx.ep_size + 1
    x, idx, w, y, stats = run_exchange(ctx, e, lambda r: 5 + r, alg, payload="fp8", seed=6)
    ref = reference(x, idx, w)
    # e4m3 keeps 3 mantissa bits: |error| <= 2^-4 of each value's block amax, summed over k.
    bound = 0.0625 * reference(np.abs(x).max(1, keepdims=True) * np.ones_like(x), idx, w)
    assert np.all(np.abs(y - ref) <= bound + 1e-6)
    width = D + 8 + -(-4 * min(4, e) // 8) * 8  # e4m3 bytes, one float32 scale (aligned), meta
    assert stats.send_bytes_P.sum() == stats.send_rows_P.sum() * width


def test_expert_tp2():
    if MPI.COMM_WORLD.Get_size() % 2:
        pytest.skip("expert_tp=2 needs an even world size")
    ctx2 = ParallelContext.create(expert_tp=2, ranks_per_node=4)
    try:
        for alg in ("alltoallv", "pipelined"):
            for e in {ctx2.ep_size // 2, ctx2.ep_size}:  # one per slot, and colocated (or both)
                x, idx, w, y, stats = run_exchange(ctx2, e, lambda r: 5, alg, k=min(3, e), seed=7)
                np.testing.assert_allclose(y, reference(x, idx, w), rtol=1e-6, atol=1e-6)
                # both ranks of a slot get the same rows
                assert np.array_equal(stats.send_rows_P[0::2], stats.send_rows_P[1::2])
    finally:
        ctx2.free()


def test_async_dispatch_and_combine_with_polling(ctx):
    e = 2 * ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY)
    x, idx, w = tokens(ctx.ep_rank, 8, 3, e, seed=8)
    pending = d.dispatch_async(x, idx, w)
    polls = 0
    while not pending.test():
        polls += 1
        assert polls < 10_000_000
    recv_x, pairs, handle = pending.wait()
    assert pending.test()  # stays done
    fn = expert_fn_for(d)
    pc = d.combine_async(fn(pairs.gather(recv_x, NUMPY), pairs.local_expert_Q), handle)
    while not pc.test():
        pass
    np.testing.assert_allclose(pc.wait(), reference(x, idx, w), rtol=1e-6, atol=1e-6)
    # two dispatches in flight at once (micro-batch overlap), polled together, finished out of order
    a = d.dispatch_async(x[:4], idx[:4], w[:4])
    b = d.dispatch_async(x[4:], idx[4:], w[4:])
    while not (a.test() & b.test()):
        pass
    for part, p in ((slice(4, 8), b), (slice(0, 4), a)):
        rx, pr, h = p.wait()
        y = d.combine(fn(pr.gather(rx, NUMPY), pr.local_expert_Q), h)
        np.testing.assert_allclose(y, reference(x[part], idx[part], w[part]), rtol=1e-6, atol=1e-6)
    d.close()


def test_per_layer_placement_and_masked_topk(ctx):
    e = 2 * ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank, layers=[3, 4])
    loads = np.arange(e, dtype=float) + 1
    pl = pl.from_loads(loads, layer=4)
    d = Dispatcher(ctx, pl, NUMPY)
    x, idx, w = tokens(ctx.ep_rank, 6, 3, e, seed=9)
    idx[::2, -1] = -1  # no expert: contributes nothing
    for layer in (3, 4):
        y = d.exchange(x, idx, w, expert_fn_for(d, layer), layer=layer)
        keep = idx >= 0
        ref = reference(x, np.where(keep, idx, 0), np.where(keep, w, 0))
        np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    d.close()


def test_fp8_codec_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.uniform(-448, 448, 20000), rng.uniform(-0.03, 0.03, 20000),
                        np.arange(-448, 448.1, 0.0625), [0.0, -0.0, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10,
                                                           3 * 2.0 ** -10, 17 * 2.0 ** -10]])
    v = v.astype(np.float32)
    want = v.astype(bk.float8_e4m3).view(np.uint8)
    np.testing.assert_array_equal(_e4m3_bits(np, v), want)
    x = rng.standard_normal((3, 200)).astype(np.float32)  # 200: a partial last block
    q, s = fp8_quantize(np, x)
    assert q.dtype == np.uint8 and s.shape == (3, 2)
    assert np.all(np.abs(fp8_dequantize(np, q, s, np.float32) - x) <= 0.0625 * np.abs(x).max())


def test_transport_choice_on_cpu(ctx):
    assert make_transport(ctx.ep_comm, NUMPY, "auto").name == "host"
    for kind in ("cuda-aware", "nccl", "bogus"):
        with pytest.raises(TransportError):
            make_transport(ctx.ep_comm, NUMPY, kind)
    with pytest.raises(ValueError):
        DispatchOptions(algorithm="ring")


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["host", "cuda-aware", "nccl"])
def test_gpu_transports(ctx, transport):
    if bk.gpu_count() == 0:
        pytest.skip("no GPU visible to CuPy")
    be = get_backend("cupy", "float32", ctx.local_rank)
    e = ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    try:
        d = Dispatcher(ctx, pl, be, DispatchOptions(transport=transport))
    except TransportError as err:
        pytest.skip(str(err))
    x, idx, w = tokens(ctx.ep_rank, 8, 2, e, seed=10)
    glob = be.xp.asarray(np.array(d.local_experts(), dtype=np.float32))
    fn = lambda xq, le: xq * (1 + glob[be.xp.asarray(le)])[:, None]
    y = d.exchange(be.asarray(x), idx, be.xp.asarray(w), fn)
    np.testing.assert_allclose(be.to_numpy(y), reference(x, idx, w), rtol=1e-6, atol=1e-6)
    d.close()


def test_context_layout():
    c = ParallelContext.create(ranks_per_node=3)
    try:
        assert c.node_id == c.rank // 3 and c.num_nodes == -(-c.size // 3)
        assert c.local_rank == c.rank % 3 and len(c.hostnames) == c.size
        assert c.node_of_ep_rank == c.node_of_rank and c.describe()["simulated_ranks_per_node"] == 3
    finally:
        c.free()
    size = MPI.COMM_WORLD.Get_size()
    if size % 2 == 0:
        c = ParallelContext.create(dp=2, ranks_per_node=2)
        try:
            assert c.ep_size == size // 2 and c.dp_size == 2
            assert c.ep_rank == c.rank % c.ep_size and c.dp_rank == c.rank // c.ep_size
            assert c.ep_comm.Get_size() == c.ep_size and c.dp_comm.Get_size() == 2
            assert c.node_of_ep_rank == c.node_of_rank[c.dp_rank * c.ep_size:][:c.ep_size]
        finally:
            c.free()
    with pytest.raises(ParallelError, match="not divisible by dp"):
        ParallelContext.create(dp=size + 1)
    with pytest.raises(ParallelError, match="expert_tp"):
        ParallelContext.create(expert_tp=size + 1)
