"""The straggler analysis on traces with known arrivals: a rank made late on purpose is named with
what it was doing; an even run names nobody; blocked time splits into skew and transfer."""
import numpy as np
import pytest
from test_trace import Dims, layout, meta, synthetic_step

from hpc_moe.trace.stragglers import straggler_stats, straggler_table
from hpc_moe.trace.writer import MemoryTrace

D = Dims()


def trace_with_arrivals(late_rank: int | None, late_s: float = 2e-3, seed: int = 0, often: float = 1.0) -> MemoryTrace:
    """6 steps; in each, every MoE layer's dispatch and combine on every rank, arrivals jittered by
    0.1 ms; late_rank arrives late_s late (in a share ``often`` of the exchanges) and computes that
    much longer in attention."""
    rng = np.random.default_rng(seed)
    tr = MemoryTrace(meta(), **layout(D))
    attn = D.phases.index("attention")
    for s in range(6):
        step = synthetic_step(D, s)
        if late_rank is not None:
            step["phase_time_s"][:, late_rank, attn] += late_s / D.num_layers
        step["wall_time_s"] += late_s
        tr.append_step(**step)
        rows = [(r, layer, kind) for layer in D.moe_layers for kind in (0, 1) for r in range(D.num_ranks)]
        r, layer, kind = (np.array(c) for c in zip(*rows))
        hit = (r == late_rank) & np.repeat(rng.random(len(rows) // D.num_ranks) < often, D.num_ranks)
        t0 = 1e-3 * (layer * 2 + kind) + rng.uniform(0, 1e-4, len(rows)) + np.where(hit, late_s, 0.0)
        last = np.array([t0[(layer == a) & (kind == b)].max() for a, b in zip(layer, kind)])
        done = last + 3e-4
        tr.append_exchanges(step=s, rank=r, layer=layer, micro_batch=0, kind=kind, t_start_s=t0, t_post_s=t0,
                            t_done_s=done, blocked_s=done - t0)
    return tr


def test_a_late_rank_is_named_with_what_it_was_doing():
    s = straggler_stats(trace_with_arrivals(2).trace())
    assert [g["rank"] for g in s["stragglers"]] == [2]
    g = s["stragglers"][0]
    assert g["last_share"] == 1.0 and g["lateness_ms"] == pytest.approx(2.0, abs=0.1)
    assert g["busy_phase"] == "attention" and g["busy_extra_ms"] == pytest.approx(2.0, rel=0.2)
    # the others waited for it (skew); it waited only for the transfer
    assert s["skew_ms"][2] < 0.1 * min(s["skew_ms"][r] for r in (0, 1, 3))
    transfer = 2 * len(D.moe_layers) * 0.3  # 0.3 ms after the last arrival, dispatch and combine of each layer
    assert s["transfer_ms"] == pytest.approx([transfer] * 4, rel=1e-6)
    assert "straggler: rank 2 (node 1" in straggler_table(trace_with_arrivals(2).trace())


def test_a_rank_that_stalls_now_and_then_is_named_by_the_waiting_it_causes():
    """Late in a third of the exchanges only (a rank descheduled now and then): rarely last by
    count, but the others' waiting is its doing."""
    s = straggler_stats(trace_with_arrivals(1, late_s=5e-3, often=1 / 3).trace())
    assert [g["rank"] for g in s["stragglers"]] == [1]
    assert s["stragglers"][0]["caused_share"] > 0.75 and s["last_share"][1] < 0.6


@pytest.mark.parametrize("seed", range(5))
def test_an_even_run_names_nobody(seed):
    tr = trace_with_arrivals(None, seed=seed).trace()
    assert straggler_stats(tr)["stragglers"] == []
    assert "no straggler" in straggler_table(tr)


def test_no_exchanges_no_table():
    tr = MemoryTrace(meta(), **layout(D))
    tr.append_step(**synthetic_step(D, 0))
    assert straggler_stats(tr.trace()) is None and straggler_table(tr.trace()) is None
