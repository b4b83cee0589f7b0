"""A trace as pandas DataFrames with named columns (``pip install 'hpc_moe[analysis]'``): one row
per step, per timeline event, per exchange; ranks with their node and host, phases and exchange
kinds by name (a resumed trace's rank ids are read with the ranks of the segment that ran
their step). Called through ``Trace.steps_frame()`` and its siblings (hpc_moe.trace.reader),
which import pandas when a frame is asked for and pass it in; ``tr`` is that Trace."""
from __future__ import annotations

import numpy as np

from hpc_moe.timing import EXCHANGE_KINDS
from hpc_moe.trace.segments import rank_column


def _ranks(tr, step: np.ndarray, rank: np.ndarray) -> dict:
    """Rows' rank, node and host columns: a rank id is that of the segment that ran its step."""
    return {"rank": rank, **{name: rank_column(tr, name, step, rank) for name in ("node", "host")}}


def steps_frame(tr, pd):
    """One row per measured step: Trace.steps_table()'s columns, and the slowest rank's own step
    time (``max_rank_time_s``) and the off-rank bytes of the step."""
    off = tr.bytes_sent.sum(axis=(1, 2)) - np.trace(tr.bytes_sent, axis1=1, axis2=2)
    return pd.DataFrame({**tr.steps_table(), "max_rank_time_s": tr.rank_time_s.max(axis=1, initial=0.0),
                                "offrank_bytes": off})


def events_frame(tr, pd):
    """One row per timeline event of the sampled steps: step, rank, node, host, layer, phase (its
    name), t_start_s, t_end_s (the rank's clock from the step's start) and duration_s."""
    e = tr.events
    return pd.DataFrame({"step": e["step"], **_ranks(tr, e["step"], e["rank"]), "layer": e["layer"],
                                "phase": np.array(tr.phases, dtype=object)[e["phase"]],
                                "t_start_s": e["t_start_s"], "t_end_s": e["t_end_s"],
                                "duration_s": e["t_end_s"] - e["t_start_s"]})


def exchanges_frame(tr, pd):
    """One row per exchange of the sampled steps: step, rank, node, host, layer, micro_batch, kind
    ("dispatch" | "combine"), t_start_s, t_post_s, t_done_s, blocked_s and in_flight_s."""
    x = tr.exchanges
    return pd.DataFrame({"step": x["step"], **_ranks(tr, x["step"], x["rank"]), "layer": x["layer"],
                                "micro_batch": x["micro_batch"],
                                "kind": np.array(EXCHANGE_KINDS, dtype=object)[x["kind"].astype(int)],
                                "t_start_s": x["t_start_s"], "t_post_s": x["t_post_s"], "t_done_s": x["t_done_s"],
                                "blocked_s": x["blocked_s"], "in_flight_s": x["t_done_s"] - x["t_start_s"]})
