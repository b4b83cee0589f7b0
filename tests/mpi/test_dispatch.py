"""Dispatch/combine over MPI. Run at several sizes:

    for n in 1 2 4 8 16; do
      mpiexec -n $n python -m mpi4py -m pytest --with-mpi tests/mpi/test_dispatch.py; done

Every rank can regenerate every other rank's tokens (seeded by source rank), so a receiver checks
each row it gets against the row its source must have sent: misrouting shows as a wrong tag
(x[:, 0] = source rank, x[:, 1] = token). Every exchange of these tests is checked that way
(:func:`check_exchange`): the rows, pairs, local experts and weights each source must have sent,
and the rows and bytes of both directions.

The experts: f_e(x) = x * (1 + e) with e the global expert id; under expert TP each of the tp ranks
of a slot returns its 1/tp share. The combine has two forms: ``weighted`` (deterministic=False), where
the expert function returns one weighted row per received row, and ``pairs`` (deterministic=True),
where it returns one unweighted row per (row, local expert) pair in Received order.

Legend: T tokens, K top-k, D hidden, N received rows, Q pairs, P EP ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from mpi4py import MPI

from hpc_moe import backend as bk
from hpc_moe.backend import get_backend
from hpc_moe.comm import ParallelContext, ParallelError
from hpc_moe.ep.dispatch import Dispatcher, DispatchOptions
from hpc_moe.ep.exchange import Exchange, Received
from hpc_moe.ep.placement import ExpertPlacement
from hpc_moe.ep.transport import MpiTransport, NcclTransport, TransportError, make_transport
from hpc_moe.errors import InputError
from hpc_moe.fp8 import _e4m3_bits, fp8_dequantize, fp8_quantize
from hpc_moe.model.moe import combine_pairs, weigh_pairs

pytestmark = pytest.mark.mpi
D = 32
NUMPY = get_backend("numpy")
# The exchange kinds: the flat exchange on shared memory (what auto picks on one machine) and on
# host MPI's Ialltoallv, and per-peer messages.
ALGS = ["alltoallv", "alltoallv-host", "pipelined"]
FORMS = pytest.mark.parametrize("deterministic", [False, True], ids=["weighted", "pairs"])
POLL_LIMIT = 10_000_000


@pytest.fixture(scope="module")
def ctx():
    # Simulated nodes of 2; the tests of the flat wire layout ask for scheme="flat" (auto would
    # pick the two-stage exchange on more than one node: its own tests are at the end).
    c = ParallelContext.create(ranks_per_node=2)
    yield c
    c.free()


# ---- batches, experts, references --------------------------------------------------------------
def tokens(src: int, t: int, k: int, n_experts: int, seed: int = 0):
    """Rank ``src``'s batch: x[t] = [src, t, random...], distinct top-k ids, weights."""
    rng = np.random.default_rng(1000 * seed + src)
    x = rng.standard_normal((t, D)).astype(np.float32)
    x[:, 0], x[:, 1] = src, np.arange(t)
    k = min(k, n_experts)
    idx = np.argsort(rng.random((t, n_experts)), axis=1)[:, :k].astype(np.int64)
    w = rng.random((t, k)).astype(np.float32)
    return x, idx, w


def batches(n_experts: int, t_of_rank, k: int = 4, seed: int = 0, idx_of_rank=None):
    """src -> (x, idx, w): any rank's batch, regenerable on every rank."""
    def batch(src: int):
        x, idx, w = tokens(src, t_of_rank(src), k, n_experts, seed)
        return x, (idx if idx_of_rank is None else idx_of_rank(idx)), w
    return batch


def expert_fn_for(d: Dispatcher, layer=None, record: list | None = None):
    """The expert function of ``d``'s combine form: f_e(x) = x * (1 + e) / tp per pair, then (weighted
    form) weigh_pairs into one row per received row. record: gets a copy of every Received."""
    scale_L = (1 + np.array(d.local_experts(layer), dtype=np.float32)) / np.float32(d.tp)

    def fn(rec: Received):
        if record is not None:
            record.append(Received(np.array(rec.x_ND), rec.row_Q.copy(), rec.local_expert_Q.copy(),
                                   rec.weight_Q.copy()))
        out_QD = rec.x_ND[rec.row_Q] * scale_L[rec.local_expert_Q][:, None]
        if d.options.deterministic:
            return out_QD
        return weigh_pairs(out_QD, rec.row_Q, rec.weight_Q, rec.x_ND.shape[0], rec.x_ND.dtype)
    return fn


def reference(x, idx, w):
    """sum over valid k of w[t, k] * f_{idx[t, k]}(x[t]) (idx -1: nothing), float32."""
    y = np.zeros_like(x)
    for k in range(idx.shape[1]):
        valid = idx[:, k] >= 0
        f = x * (1 + np.maximum(idx[:, k], 0)).astype(np.float32)[:, None]
        y += np.where(valid, w[:, k], 0)[:, None] * f
    return y


def reference_pairs(x, idx, w):
    """The single-process pairs combine (combine_pairs over f per (t, k)): what the deterministic
    form must reproduce bitwise at any rank count and placement (without expert TP)."""
    T, K = idx.shape
    out = np.repeat(x, K, axis=0) * (1 + np.maximum(idx, 0)).reshape(-1, 1).astype(np.float32)
    out[idx.reshape(-1) < 0] = 0
    return combine_pairs(out, w, np.float32)


def assert_matches_reference(d: Dispatcher, x, idx, w, y, atol=1e-6):
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, reference(x, idx, w), rtol=1e-6, atol=atol)
    if d.options.deterministic and d.tp == 1 and d.options.payload == "native":
        np.testing.assert_array_equal(y, reference_pairs(x, idx, w))


# ---- what each source must send ----------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """The rows one source sends one destination: tokens [N], the destination's local expert per k
    [N, K] (-1: not there), and the pairs of those rows in (row, k) order."""

    token_N: np.ndarray
    local_NK: np.ndarray
    row_Q: np.ndarray
    local_expert_Q: np.ndarray
    weight_Q: np.ndarray


def expected_rows(pl: ExpertPlacement, src: int, dest: int, idx, w, layer=None) -> Rows:
    """Rows EP rank ``src`` (routing idx, w) must send EP rank ``dest``: each token once if any of
    its experts is routed to dest's slot (every rank of the slot gets it), in token order."""
    valid = idx >= 0
    slot_TK = np.where(valid, pl.route(np.where(valid, idx, 0), src, layer), -1)
    here_TK = slot_TK == dest // pl.expert_tp
    mine = pl.local_experts(dest, layer)
    token_N = np.nonzero(here_TK.any(axis=1))[0]
    local_NK = np.full((len(token_N), idx.shape[1]), -1, dtype=np.int32)
    for n, t in enumerate(token_N):
        for k in np.nonzero(here_TK[t])[0]:
            local_NK[n, k] = mine.index(int(idx[t, k]))  # ValueError: routed to a slot without it
    n_Q, k_Q = np.nonzero(local_NK >= 0)
    return Rows(token_N, local_NK, n_Q, local_NK[n_Q, k_Q], w[token_N[n_Q], k_Q])


def meta_width(k: int, fp8: bool) -> int:
    """Bytes of one metadata row: local ids int32 [K], weights float32 [K] (and the fp8 scales,
    one float32 per 128 values), each field 8-byte aligned."""
    def a8(n):
        return -(-n // 8) * 8
    return 2 * a8(4 * k) + (a8(4 * -(-D // 128)) if fp8 else 0)


def check_exchange(d: Dispatcher, batch, ex: Exchange, calls: list[Received], layer=None) -> None:
    """The rows this rank computed, against what every source must have sent; the row and byte
    counts of both directions. Collective."""
    pl, me, p = d.placement, d.rank, d.size
    pairs, fp8 = d.options.deterministic, d.options.payload == "fp8"
    want, want_x = {}, {}
    for src in range(p):
        xs, ids, ws = batch(src)
        r = want[src] = expected_rows(pl, src, me, ids, ws, layer)
        xs = fp8_dequantize(np, *fp8_quantize(np, xs), np.float32) if fp8 and len(xs) else xs
        want_x[src] = xs[r.token_N]

    def check_block(rec: Received, src: int, lo: int = 0):
        r = want[src]
        n = len(r.token_N)
        x = rec.x_ND[lo:lo + n]
        if not fp8:  # (source, token) tags: a misrouted row names where it came from
            assert x[:, :2].tolist() == want_x[src][:, :2].tolist()
        np.testing.assert_array_equal(x, want_x[src])
        q = (rec.row_Q >= lo) & (rec.row_Q < lo + n)
        np.testing.assert_array_equal(rec.row_Q[q] - lo, r.row_Q)
        np.testing.assert_array_equal(rec.local_expert_Q[q], r.local_expert_Q)
        np.testing.assert_array_equal(rec.weight_Q[q], r.weight_Q)

    for rec in calls:
        assert rec.row_Q.dtype == np.int64 and rec.local_expert_Q.dtype == np.int32
        assert rec.weight_Q.dtype == np.float32 and rec.x_ND.dtype == np.float32
        assert len(rec.row_Q) == len(rec.local_expert_Q) == len(rec.weight_Q)
        assert np.all(np.diff(rec.row_Q) >= 0)  # pairs in row-major order
    if d.options.algorithm == "alltoallv":  # one call: every source's rows, grouped in source order
        assert len(calls) == 1
        rec = calls[0]
        assert rec.x_ND.shape == (sum(len(r.token_N) for r in want.values()), D)
        assert len(rec.row_Q) == sum(len(r.row_Q) for r in want.values())
        lo = 0
        for src in range(p):
            check_block(rec, src, lo)
            lo += len(want[src].token_N)
    else:  # one call per source with rows, each with that source's rows alone, as they land
        sources = []
        for rec in calls:
            match = [s for s in range(p) if want_x[s].shape == rec.x_ND.shape and np.array_equal(want_x[s], rec.x_ND)]
            assert len(match) == 1, "a pipelined call holds rows of no single source"
            check_block(rec, match[0])
            assert len(rec.row_Q) == len(want[match[0]].row_Q)
            sources.append(match[0])
        assert sorted(sources) == [s for s in range(p) if len(want[s].token_N)]

    # Rows and bytes. Dispatch: rows sent to me equal what each peer planned for me.
    xs, ids, ws = batch(me)
    mine = [expected_rows(pl, me, q, ids, ws, layer) for q in range(p)]
    sent_P = np.array([len(r.token_N) for r in mine], dtype=np.int64)
    sent_pairs_P = np.array([len(r.row_Q) for r in mine], dtype=np.int64)
    recv_P = np.array([len(want[s].token_N) for s in range(p)], dtype=np.int64)
    recv_pairs_P = np.array([len(want[s].row_Q) for s in range(p)], dtype=np.int64)
    planned_for_me = np.empty(p, np.int64)
    d.comm.Alltoall([sent_P, MPI.INT64_T], [planned_for_me, MPI.INT64_T])
    np.testing.assert_array_equal(ex.recv_counts_P, recv_P)
    np.testing.assert_array_equal(ex.recv_counts_P, planned_for_me)
    # Combine: one row per received row (weighted) or per pair (pairs), back to its source.
    np.testing.assert_array_equal(ex.reply_counts_P, recv_pairs_P if pairs else recv_P)
    back_P = np.empty(p, np.int64)
    d.comm.Alltoall([np.ascontiguousarray(ex.reply_counts_P, np.int64), MPI.INT64_T], [back_P, MPI.INT64_T])
    np.testing.assert_array_equal(back_P, sent_pairs_P if pairs else sent_P)
    token_bytes = D if fp8 else D * 4
    row_bytes = token_bytes + meta_width(ids.shape[1], fp8)
    combine_P = ex.send_bytes_P - sent_P * row_bytes
    np.testing.assert_array_equal(combine_P, ex.reply_counts_P * D * 4)
    if not pairs and not fp8:  # weighted: combine bytes equal dispatch token bytes, per peer and in all
        np.testing.assert_array_equal(combine_P, ex.recv_counts_P * token_bytes)
        totals = np.array([combine_P.sum(), (sent_P * token_bytes).sum()], dtype=np.int64)
        d.comm.Allreduce(MPI.IN_PLACE, [totals, MPI.INT64_T])
        assert totals[0] == totals[1]


def options(alg: str, **kw) -> DispatchOptions:
    """The flat DispatchOptions of one of ALGS."""
    algorithm, _, transport = alg.partition("-")
    return DispatchOptions(scheme="flat", algorithm=algorithm, transport=transport or "auto", **kw)


def run_exchange(ctx, n_experts, batch, alg="alltoallv", payload="native", deterministic=False,
                 layer=None, placement=None):
    """One exchange of this rank's batch, checked by check_exchange -> (x, idx, w, y, exchange, dispatcher)."""
    pl = placement or ExpertPlacement.build(n_experts, ctx.ep_size, ctx.expert_tp, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, options(alg, payload=payload, deterministic=deterministic))
    x, idx, w = batch(ctx.ep_rank)
    calls: list[Received] = []
    ex = d.post(layer, x, idx, w)
    ex.run_experts(expert_fn_for(d, layer, calls))
    y = ex.wait()
    check_exchange(d, batch, ex, calls, layer)
    d.close()
    return x, idx, w, y, ex, d


SHAPES = {  # experts as a function of the EP size
    "one_per_rank": lambda p: p,
    "colocated": lambda p: 2 * p + 1,
    "replicated": lambda p: max(1, p // 2),
}


# ---- exchanges -------------------------------------------------------------------------------
@FORMS
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_exchange_matches_local_reference(ctx, alg, shape, deterministic):
    e = SHAPES[shape](ctx.ep_size)
    batch = batches(e, lambda r: 7 + 3 * r, k=min(4, e), seed=1)
    x, idx, w, y, _, d = run_exchange(ctx, e, batch, alg, deterministic=deterministic)
    assert_matches_reference(d, x, idx, w, y)


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_two_step_received_then_reply(ctx, alg, deterministic):
    """received() then reply() (what bench dispatch times apart) give the same result as
    run_experts(), for the pipelined exchange too: received() waits for every source."""
    e = 2 * ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, options(alg, deterministic=deterministic))
    x, idx, w = batches(e, lambda r: 5 + r, k=3, seed=11)(ctx.ep_rank)
    ex = d.post(None, x, idx, w)
    ex.reply(expert_fn_for(d)(ex.received()))
    assert_matches_reference(d, x, idx, w, ex.wait())
    d.close()


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_empty_ranks_take_part(ctx, alg, deterministic):
    e = 2 * ctx.ep_size
    batch = batches(e, lambda r: 0 if r % 2 else 5, seed=2)
    x, idx, w, y, ex, d = run_exchange(ctx, e, batch, alg, deterministic=deterministic)
    assert y.shape == (x.shape[0], D)
    assert_matches_reference(d, x, idx, w, y)
    if ctx.ep_rank % 2:  # sends no token rows: only combine rows for what it received
        np.testing.assert_array_equal(ex.send_bytes_P, ex.reply_counts_P * D * 4)


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_all_tokens_to_one_expert(ctx, alg, deterministic):
    e = ctx.ep_size
    batch = batches(e, lambda r: 6, k=1, seed=3, idx_of_rank=np.zeros_like)
    x, idx, w, y, ex, d = run_exchange(ctx, e, batch, alg, deterministic=deterministic)
    assert_matches_reference(d, x, idx, w, y)
    (owner,) = d.placement.owners(0)
    assert ex.recv_counts_P.sum() == (6 * ctx.ep_size if ctx.ep_rank == owner else 0)


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_rows_are_tagged_deduplicated_and_grouped(ctx, alg, deterministic):
    """Rows arrive grouped by source, once per (token, rank), with the right local experts and
    weights (derived here directly: no replicas, so each expert has one owner)."""
    e, k, p = 3 * ctx.ep_size, 5, ctx.ep_size
    pl = ExpertPlacement.build(e, p, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, options(alg, deterministic=deterministic))
    x, idx, w = tokens(ctx.ep_rank, 9, k, e, seed=4)
    mine = np.array(pl.local_experts(ctx.ep_rank))
    want = {}  # src -> (rows [N, D], pairs [(row, local expert, weight)])
    for src in range(p):
        xs, ids, ws = tokens(src, 9, k, e, seed=4)
        rows, pairs = [], []
        for t in range(9):
            here = [(int(np.nonzero(mine == ex)[0][0]), ws[t, j]) for j, ex in enumerate(ids[t]) if ex in mine]
            if here:
                rows.append(xs[t])
                pairs += [(len(rows) - 1, loc, wt) for loc, wt in here]
        want[src] = (np.array(rows).reshape(-1, D), pairs)
    calls = []

    def unit_fn(rec: Received):  # unit expert outputs: y = sum_k w
        calls.append(Received(np.array(rec.x_ND), rec.row_Q.copy(), rec.local_expert_Q.copy(), rec.weight_Q.copy()))
        ones = np.ones((len(rec.row_Q), D), np.float32)
        return ones if deterministic else weigh_pairs(ones, rec.row_Q, rec.weight_Q, len(rec.x_ND), np.float32)

    ex = d.post(None, x, idx, w)
    ex.run_experts(unit_fn)
    y = ex.wait()
    if alg != "pipelined":  # one call, every source's rows in source order
        (rec,) = calls
        assert rec.x_ND[:, :2].tolist() == [list(r[:2]) for src in range(p) for r in want[src][0]]
        starts = np.cumsum([0] + [len(want[src][0]) for src in range(p)])
        blocks = [(rec, src, int(starts[src])) for src in range(p)]
    else:  # one call per source with rows, each holding that source's rows alone
        assert all(len(c.x_ND) and (c.x_ND[:, 0] == c.x_ND[0, 0]).all() for c in calls)
        blocks = [(c, int(c.x_ND[0, 0]), 0) for c in calls]
        assert sorted(src for _, src, _ in blocks) == [s for s in range(p) if len(want[s][0])]
    for rec, src, lo in blocks:
        rows, pairs = want[src]
        got = rec.x_ND[lo:lo + len(rows)]
        assert got[:, :2].tolist() == rows[:, :2].tolist()  # (source, token) in token order
        np.testing.assert_array_equal(got, rows)
        q = (rec.row_Q >= lo) & (rec.row_Q < lo + len(rows))
        assert list(zip((rec.row_Q[q] - lo).tolist(), rec.local_expert_Q[q].tolist(),
                        rec.weight_Q[q].tolist())) == [(r, le, float(wt)) for r, le, wt in pairs]
    assert ex.recv_counts_P.tolist() == [len(want[src][0]) for src in range(p)]
    np.testing.assert_allclose(y, np.repeat(w.sum(1, keepdims=True), D, axis=1), rtol=1e-6)
    d.close()


@FORMS
def test_byte_accounting_balances_across_ranks(ctx, deterministic):
    e = 2 * ctx.ep_size
    k = min(4, e)
    _, idx, _, _, ex, _ = run_exchange(ctx, e, batches(e, lambda r: 4 + r, k=k, seed=5),
                                       deterministic=deterministic)
    row = D * 4 + meta_width(k, False)  # x, then int32 [K] local ids and float32 [K] weights
    combine_P = ex.reply_counts_P * D * 4
    sent_rows_P = (ex.send_bytes_P - combine_P) // row
    np.testing.assert_array_equal(ex.send_bytes_P, sent_rows_P * row + combine_P)
    sent = np.zeros(ctx.ep_size, dtype=np.int64)
    ctx.ep_comm.Allreduce(sent_rows_P, sent)  # rows all ranks sent each rank = what it received
    assert sent[ctx.ep_rank] == ex.recv_counts_P.sum()
    # rows coming back: every (token, rank) row (weighted) or (token, k) pair (pairs)
    back = np.zeros(ctx.ep_size, dtype=np.int64)
    ctx.ep_comm.Allreduce(np.ascontiguousarray(ex.reply_counts_P, np.int64), back)
    assert back[ctx.ep_rank] == ((idx >= 0).sum() if deterministic else sent_rows_P.sum())


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_fp8_payload(ctx, alg, deterministic):
    e = ctx.ep_size + 1
    x, idx, w, y, ex, d = run_exchange(ctx, e, batches(e, lambda r: 5 + r, seed=6), alg, payload="fp8",
                                       deterministic=deterministic)
    ref = reference(x, idx, w)
    # e4m3 keeps 3 mantissa bits: |error| <= 2^-4 of each value's block amax, summed over k.
    bound = 0.0625 * reference(np.abs(x).max(1, keepdims=True) * np.ones_like(x), idx, w)
    assert np.all(np.abs(y - ref) <= bound + 1e-6)
    assert np.any(y != ref)  # the payload really was quantized
    # e4m3 bytes, one float32 scale (aligned), then int32 [K] + float32 [K] metadata; combine float32
    width = D + 8 + 2 * (-(-4 * idx.shape[1] // 8) * 8)
    sent_P = np.array([len(expected_rows(d.placement, ctx.ep_rank, q, idx, w).token_N) for q in range(ctx.ep_size)])
    np.testing.assert_array_equal(ex.send_bytes_P, sent_P * width + ex.reply_counts_P * D * 4)


@FORMS
def test_expert_tp2(deterministic):
    if MPI.COMM_WORLD.Get_size() % 2:
        pytest.skip("expert_tp=2 needs an even world size")
    ctx2 = ParallelContext.create(expert_tp=2, ranks_per_node=4)
    try:
        for alg in ALGS:
            for e in sorted({ctx2.ep_size // 2, ctx2.ep_size}):  # one per slot, and colocated (or both)
                batch = batches(e, lambda r: 5, k=min(3, e), seed=7)
                x, idx, w, y, ex, d = run_exchange(ctx2, e, batch, alg, deterministic=deterministic)
                assert d.tp == 2
                assert_matches_reference(d, x, idx, w, y)
                # both ranks of a slot get the same rows
                dispatch_P = ex.send_bytes_P - ex.reply_counts_P * D * 4
                np.testing.assert_array_equal(dispatch_P[0::2], dispatch_P[1::2])
    finally:
        ctx2.free()


def poll(*exchanges, until) -> int:
    """Call progress() on every exchange until ``until()``: the number of rounds it took."""
    polls = 0
    while not until():
        for ex in exchanges:
            ex.progress()
        polls += 1
        assert polls < POLL_LIMIT
    return polls


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_exchanges_in_flight_with_polling(ctx, alg, deterministic):
    e = 2 * ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, options(alg, deterministic=deterministic))
    x, idx, w = tokens(ctx.ep_rank, 8, 3, e, seed=8)
    fn = expert_fn_for(d)

    # one exchange, phase by phase, polled in between
    ex = d.post(None, x, idx, w)
    poll(ex, until=lambda: ex.dispatch_times.t_done > 0)
    assert not ex.progress()  # the rows landed; the combine is not posted yet
    ex.run_experts(fn)
    poll(ex, until=ex.progress)
    assert ex.progress()  # stays done
    np.testing.assert_allclose(ex.wait(), reference(x, idx, w), rtol=1e-6, atol=1e-6)
    assert ex.progress()
    dt, ct = ex.dispatch_times, ex.combine_times
    assert 0 < dt.t_post <= dt.t_done and dt.t_post <= ct.t_post <= ct.t_done

    # two exchanges in flight at once (micro-batch overlap), polled together, finished out of order
    halves = {"a": slice(0, 4), "b": slice(4, 8)}
    calls = {"a": [], "b": []}
    exs = {h: d.post(None, x[s], idx[s], w[s]) for h, s in halves.items()}
    a, b = exs["a"], exs["b"]
    poll(a, b, until=lambda: a.dispatch_times.t_done > 0 and b.dispatch_times.t_done > 0)
    # Collectives of one communicator must start in the same order on every rank; the pipelined
    # exchange's messages need not, so there ranks finish them in different orders (tags keep apart).
    order = ("b", "a") if alg != "pipelined" or ctx.ep_rank % 2 == 0 else ("a", "b")
    for h in order:
        exs[h].run_experts(expert_fn_for(d, record=calls[h]))
    poll(a, b, until=lambda: a.progress() & b.progress())
    for h in ("b", "a"):
        s = halves[h]
        y = exs[h].wait()
        np.testing.assert_allclose(y, reference(x[s], idx[s], w[s]), rtol=1e-6, atol=1e-6)
        if deterministic:
            np.testing.assert_array_equal(y, reference_pairs(x[s], idx[s], w[s]))

        def half_batch(src, s=s):
            xs, ids, ws = tokens(src, 8, 3, e, seed=8)
            return xs[s], ids[s], ws[s]
        check_exchange(d, half_batch, exs[h], calls[h])
    d.close()


@FORMS
@pytest.mark.parametrize("alg", ALGS)
def test_per_layer_placement_and_masked_topk(ctx, alg, deterministic):
    e = 2 * ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank, layers=[3, 4])
    loads = np.arange(e, dtype=float) + 1
    pl = pl.from_loads(loads, layer=4)

    def mask(idx):
        idx = idx.copy()
        idx[::2, -1] = -1  # no expert: contributes nothing
        return idx
    batch = batches(e, lambda r: 6, k=3, seed=9, idx_of_rank=mask)
    ys = []
    for layer in (3, 4):
        x, idx, w, y, _, d = run_exchange(ctx, e, batch, alg, deterministic=deterministic, layer=layer, placement=pl)
        assert_matches_reference(d, x, idx, w, y)
        ys.append(y)
    # the convenience form: post -> run_experts -> wait
    d = Dispatcher(ctx, pl, NUMPY, options(alg, deterministic=deterministic))
    y = d.exchange(4, x, idx, w, expert_fn_for(d, 4))
    np.testing.assert_array_equal(y, ys[1])
    d.close()
    if deterministic:  # placement-independent: the two layers' maps give bitwise the same y
        np.testing.assert_array_equal(ys[0], ys[1])


# ---- codec, transports, context ---------------------------------------------------------------
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
    for kind, name in (("auto", "shm"), ("shm", "shm"), ("host", "host")):  # every rank on this machine
        t = make_transport(ctx.ep_comm, NUMPY, kind)
        assert t.name == name
        t.close()
    for kind in ("cuda-aware", "nccl", "bogus"):
        with pytest.raises(TransportError):
            make_transport(ctx.ep_comm, NUMPY, kind)
    with pytest.raises(ValueError):
        DispatchOptions(algorithm="ring")
    with pytest.raises(ValueError):
        DispatchOptions(payload="int4")
    with pytest.raises(ValueError):
        DispatchOptions(transport="bogus")


class _NotAnMpiRequest:
    """A request MPI's Testall/Waitall would refuse (as NCCL's CUDA-event requests are)."""

    def __init__(self, req: MPI.Request):
        self._req = req

    def Test(self) -> bool:
        return self._req.Test()

    def Wait(self) -> None:
        self._req.Wait()


class _ForeignRequests(MpiTransport):
    """Host MPI underneath, requests of its own kind on top, tested and waited for as NCCL's are."""

    test_all, wait_all = staticmethod(NcclTransport.test_all), staticmethod(NcclTransport.wait_all)

    def ialltoallv(self, *args):
        return _NotAnMpiRequest(super().ialltoallv(*args))


def test_exchanges_leave_their_requests_to_the_transport(ctx):
    """Exchange tests and waits through its transport, never with MPI.Request on what the
    transport returned (NCCL's requests are CUDA events)."""
    e = ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    d = Dispatcher(ctx, pl, NUMPY, DispatchOptions(scheme="flat", transport="host"))
    d.transport.close()
    d.transport = _ForeignRequests(d.comm, NUMPY, False)
    x, idx, w = tokens(ctx.ep_rank, 9, min(3, e), e, seed=4)
    ex = d.post(None, x, idx, w)
    ex.progress()  # polled while in flight
    ex.run_experts(expert_fn_for(d))
    y = ex.wait()
    assert_matches_reference(d, x, idx, w, y)
    d.close()


@pytest.mark.parametrize("failing", ["id on rank 0", "communicator on the last rank"])
def test_nccl_set_up_failing_on_one_rank_fails_on_every_rank(ctx, monkeypatch, failing):
    """Rank 0 failing to make the id, or one rank its communicator: a TransportError on every
    rank, never one rank in a collective the others left (the hang of a broadcast skipped)."""
    comm, last = ctx.ep_comm, ctx.ep_comm.Get_size() - 1

    def unique_id():
        if failing.startswith("id"):
            raise RuntimeError("no NCCL here")
        return bytes(range(128))

    def communicator(n, uid, rank):
        assert uid == bytes(range(128))  # the id crossed intact, as bytes
        if rank == last:
            raise RuntimeError("NCCL refuses two ranks on one GPU")
        return object()

    monkeypatch.setattr(bk, "nccl_unique_id", unique_id)
    monkeypatch.setattr(bk, "nccl_communicator", communicator)
    monkeypatch.setattr(bk, "comm_stream", lambda: None)
    with pytest.raises(TransportError, match="no NCCL here" if failing.startswith("id") else "two ranks on one GPU"):
        NcclTransport(comm, NUMPY)
    comm.Barrier()  # every rank got here: nobody is left in the id's broadcast


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["host", "cuda-aware", "nccl"])
def test_gpu_transports(ctx, transport):
    if bk.gpu_count() == 0:
        pytest.skip("no GPU visible to CuPy")
    be = get_backend("cupy", "float32", ctx.local_rank)
    e = ctx.ep_size
    pl = ExpertPlacement.build(e, ctx.ep_size, 1, ctx.node_of_ep_rank)
    x, idx, w = tokens(ctx.ep_rank, 8, 2, e, seed=10)
    for deterministic in (False, True):
        try:
            d = Dispatcher(ctx, pl, be, DispatchOptions(scheme="flat", transport=transport, deterministic=deterministic))
        except TransportError as err:
            pytest.skip(str(err))
        glob = be.xp.asarray(np.array(d.local_experts(), dtype=np.float32))

        def fn(rec: Received, d=d, glob=glob):
            out = rec.x_ND[be.xp.asarray(rec.row_Q)] * (1 + glob[be.xp.asarray(rec.local_expert_Q)])[:, None]
            if d.options.deterministic:
                return out
            return weigh_pairs(out, rec.row_Q, rec.weight_Q, rec.x_ND.shape[0], rec.x_ND.dtype)
        y = d.exchange(None, be.asarray(x), idx, be.xp.asarray(w), fn)
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


# ---- the two-stage exchange --------------------------------------------------------------------
def node_layouts(size: int) -> list[int]:
    """ranks_per_node values giving 2 and 4 equal nodes where the world allows."""
    return [size // n for n in (2, 4) if size % n == 0]


@FORMS
@pytest.mark.parametrize("shape", list(SHAPES))
def test_hierarchical_matches_flat_and_crosses_nodes_less(shape, deterministic):
    size = MPI.COMM_WORLD.Get_size()
    if size < 2:
        pytest.skip("one rank is one node")
    e = SHAPES[shape](size)
    batch = batches(e, lambda r: 0 if r == 1 else 6 + r, k=min(4, e), seed=13)  # rank 1: no tokens
    for k in node_layouts(size):
        c = ParallelContext.create(ranks_per_node=k)
        pl = ExpertPlacement.build(e, c.ep_size, 1, c.node_of_ep_rank)
        x, idx, w = batch(c.ep_rank)
        out, sent = {}, {}
        for scheme in ("flat", "hierarchical"):
            d = Dispatcher(c, pl, NUMPY, DispatchOptions(deterministic=deterministic, scheme=scheme))
            assert d.hierarchical == (scheme == "hierarchical")
            ex = d.post(None, x, idx, w)
            ex.run_experts(expert_fn_for(d))
            out[scheme] = ex.wait()
            other = np.asarray(c.node_of_ep_rank) != c.node_id
            sent[scheme] = int(ex.send_bytes_P[other].sum())
            assert (ex.nodes_per_token_T <= len(set(c.node_of_ep_rank))).all()
            d.close()
        assert_matches_reference(d, x, idx, w, out["hierarchical"])
        if deterministic:
            np.testing.assert_array_equal(out["hierarchical"], out["flat"])
        total = c.ep_comm.allreduce(np.array([sent["flat"], sent["hierarchical"]]))
        if k > 1:  # a token crosses to a node once, however many of the node's ranks it uses
            assert total[1] <= total[0]
        c.free()


def test_hierarchical_all_tokens_to_one_expert_and_bad_layouts():
    size = MPI.COMM_WORLD.Get_size()
    if size < 2 or size % 2:
        pytest.skip("needs 2 equal nodes")
    c = ParallelContext.create(ranks_per_node=size // 2)
    pl = ExpertPlacement.build(size, c.ep_size, 1, c.node_of_ep_rank)
    x, idx, w = batches(size, lambda r: 5, k=1, seed=14, idx_of_rank=lambda i: np.zeros_like(i))(c.ep_rank)
    d = Dispatcher(c, pl, NUMPY, DispatchOptions(scheme="hierarchical"))
    assert_matches_reference(d, x, idx, w, d.exchange(None, x, idx, w, expert_fn_for(d)))
    d.close()
    with pytest.raises(InputError, match="expert_tp > 1"):
        c2 = ParallelContext.create(expert_tp=2, ranks_per_node=size // 2)
        try:
            Dispatcher(c2, ExpertPlacement.build(size, size, 2, c2.node_of_ep_rank), NUMPY,
                       DispatchOptions(scheme="hierarchical"))
        finally:
            c2.free()
    c.free()


@FORMS
@pytest.mark.parametrize("shape", list(SHAPES))
def test_hierarchical_on_round_robin_nodes(ctx, shape, deterministic):
    """Ranks placed round-robin on 2 nodes (srun -m cyclic), while the context simulates blocks of
    2: the placement's map is the one the exchange follows. It matches the flat exchange, and each
    peer's rows and bytes are booked to the EP rank that sent or got them."""
    p, me = ctx.ep_size, ctx.ep_rank
    if p < 4 or p % 2:
        pytest.skip("needs 2 nodes of 2 ranks or more")
    node_P, local_P = np.arange(p) % 2, np.arange(p) // 2
    e = SHAPES[shape](p)
    pl = ExpertPlacement.build(e, p, 1, [int(n) for n in node_P])
    batch = batches(e, lambda r: 0 if r == 1 else 6 + r, k=min(4, e), seed=17)
    x, idx, w = batch(me)
    out, ex = {}, {}
    for scheme in ("flat", "hierarchical"):
        d = Dispatcher(ctx, pl, NUMPY, DispatchOptions(deterministic=deterministic, scheme=scheme))
        assert d.hierarchical == (scheme == "hierarchical")
        ex[scheme] = d.post(None, x, idx, w)
        ex[scheme].run_experts(expert_fn_for(d))
        out[scheme] = ex[scheme].wait()
        d.close()
    assert_matches_reference(d, x, idx, w, out["hierarchical"])
    if deterministic:
        np.testing.assert_array_equal(out["hierarchical"], out["flat"])
    h = ex["hierarchical"]
    # Source s's rows reach this rank from s's rail peer on this node: rank (node of me, local of s).
    want_P = np.zeros(p, np.int64)
    for s in range(p):
        _, idx_s, _ = batch(s)
        want_P[(node_P == node_P[me]) & (local_P == local_P[s])] += int((pl.route(idx_s, s) == me).any(axis=1).sum())
    np.testing.assert_array_equal(h.recv_counts_P, want_P)
    assert h.recv_counts_P.sum() == ex["flat"].recv_counts_P.sum()
    peers = (local_P == local_P[me]) | (node_P == node_P[me])  # the rail and the node
    assert not h.send_bytes_P[~peers].any()
    stages = [h.stage1.send_bytes_P.sum(), h.stage2.send_bytes_P.sum()]
    assert h.send_bytes_P.sum() == sum(stages)
