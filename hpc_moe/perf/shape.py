"""A trace's steps of one kind (prefill or decode) as a :class:`Shape`: what ``predict_step``
takes (the model, the layout, each rank's tokens, the context, the schedule) and what was
measured (medians over the steps), for hpc_moe.perf.calibrate to fit and to compare against.

Legend: S steps, L layers, M MoE layers, R ranks, P trace phases, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hpc_moe.config import ModelConfig
from hpc_moe.errors import InputError
from hpc_moe.perf.footprint import Layout
from hpc_moe.perf.hardware import DTYPE_BYTES
from hpc_moe.perf.predict import wire_row_bytes
from hpc_moe.trace.reader import Trace


class CalibrationError(InputError):
    """A trace that calibration cannot read as a shape."""


@dataclass(frozen=True)
class Shape:
    """One trace's steps of one kind: predict_step's inputs and the medians measured over them.

    tokens_R / sequences_R: each rank's own tokens and sequences; pairs_MR: (token, expert) rows
    through each rank's experts; rows_R: rows each rank sent per MoE layer (both directions' row
    sizes together: see wire_row_bytes); remote_R2: bytes a rank sent per MoE layer (the mean of
    its layers: the trace counts bytes per step) to other ranks inside and across nodes;
    experts_MR: its local experts that had rows; loads_ME: tokens per expert per MoE layer (mean
    over steps); phase_LRP: seconds per layer, rank and trace phase; step_s: wall time of a step;
    busy: the fraction of it a rank was not blocked in an exchange (mean over ranks); concurrency:
    the fraction of a rank's compute time another rank computed too (from the sampled timelines;
    None without them)."""

    name: str
    cfg: ModelConfig
    layout: Layout
    mode: str
    context: float
    payload: str
    dispatch: str
    micro_batches: int
    layers: int
    ranks_per_host: int
    dtype: str
    phases: tuple
    tokens_R: np.ndarray
    sequences_R: np.ndarray
    pairs_MR: np.ndarray
    rows_R: np.ndarray
    remote_R2: np.ndarray
    experts_MR: np.ndarray
    loads_ME: np.ndarray
    phase_LRP: np.ndarray
    step_s: float
    busy: float
    concurrency: float | None

    def exposed_s(self, layer: int) -> float:
        """The layer's time beyond its compute: the slowest rank's time in the layer, less each
        compute phase's slowest rank. It is the exchange no compute hid plus what the ranks waited
        for one another: ranks that share cores wait for a descheduled peer on every message."""
        P = self.phase_LRP[layer]
        compute = np.delete(P, self.phases.index("wait"), axis=1).max(axis=0).sum()
        return max(0.0, float(P.sum(axis=1).max() - compute))

    @property
    def label(self) -> str:
        return (f"{self.name}: {self.mode}, {self.layout.ep} ranks, {int(self.tokens_R.max())} tokens a rank, "
                f"context {self.context:g}")


def _mean(dist) -> float:
    kind, params = dist
    if kind in ("fixed", "file"):
        return float(np.mean(params))
    if kind == "uniform":
        return (params[0] + params[1]) / 2
    return float(params[0]) if kind == "normal" else math.exp(params[0] + params[1] ** 2 / 2)


def shapes_of(tr: Trace) -> list[Shape]:
    """The trace's prefill steps and its decode steps as shapes (mixed steps are left out)."""
    run, par = tr.meta["run_config"], tr.meta["parallel_config"]
    why = ("it has no steps" if tr.num_steps == 0 else
           "it ran data-parallel replicas (--dp > 1)" if par["dp_size"] != 1 else
           "it ran expert tensor parallelism (--expert-tp > 1)" if par["expert_tp"] != 1 else
           "it has no MoE layers" if len(tr.moe_layers) == 0 else None)
    if why:
        raise CalibrationError(f"{tr.path}: calibration cannot use this trace: {why}")
    cfg = ModelConfig.from_dict(tr.meta["model_config"])
    computed = tr.meta["array_backend"].split("(")[-1].strip(")")  # "numpy (float32)", "cupy (bfloat16)"
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(computed)
    if dtype is None:
        raise CalibrationError(f"{tr.path}: calibration cannot use this trace: it computed in {computed!r}")
    R, ep, M = tr.num_ranks, int(par["ep_size"]), len(tr.moe_layers)
    rpn = int(par["simulated_ranks_per_node"] or max(par["ranks_per_node"]))
    lay = run["layout"]
    per_machine = np.unique(tr.rank_machine, return_counts=True)[1]  # ranks that share a machine's devices
    nodes = int(tr.rank_node.max()) + 1
    dispatch = lay["dispatch"] if lay["dispatch"] != "auto" else ("hierarchical" if nodes > 1 and rpn > 1 else "flat")
    m = int(lay["micro_batches"]) if lay["overlap"] == "on" else 1
    row = sum(wire_row_bytes(cfg, DTYPE_BYTES[dtype], lay["payload"]))
    same_RR = tr.rank_node[:, None] == tr.rank_node[None, :]
    out = []
    for mode in ("prefill", "decode"):
        s = np.flatnonzero(tr.kind == mode)
        if not len(s):
            continue
        med = lambda a, s=s: np.median(a[s], axis=0)  # noqa: E731
        tokens_R = med(tr.nodes_reached[:, 0, :, 0]).astype(float)
        context = float(np.median(tr.input_tokens[s] / tr.num_sequences[s])) if mode == "prefill" \
            else _mean(run["workload"]["seq_len"])
        holders = tr.placement  # [M1, E, K] ranks, -1 pads
        share_MER = np.stack([[(holders[min(i, len(holders) - 1), e][:, None] == np.arange(R)).sum(0)
                               for e in range(tr.num_experts)] for i in range(M)]).astype(float)
        share_MER /= np.maximum(share_MER.sum(axis=2, keepdims=True), 1)  # tokens split across replicas
        pairs_SMR = np.einsum("sme,mer->smr", tr.expert_tokens[s].astype(float), share_MER)
        sent_SRR = tr.bytes_sent[s].astype(float) / M
        off = ~np.eye(R, dtype=bool)
        remote = np.stack([(sent_SRR * (same_RR & off)).sum(2), (sent_SRR * ~same_RR).sum(2)], -1)
        out.append(Shape(
            name=tr.name, cfg=cfg, layout=Layout(ep, 1, 1, rpn), mode=mode, context=context, payload=lay["payload"],
            dispatch=dispatch, micro_batches=m, layers=tr.num_layers, ranks_per_host=int(per_machine.max()), dtype=dtype,
            phases=tr.phases, tokens_R=tokens_R,
            sequences_R=tokens_R if mode == "decode" else tokens_R / context,
            pairs_MR=np.median(pairs_SMR, axis=0), rows_R=med(tr.bytes_sent.sum(axis=2)) / M / row,
            remote_R2=np.median(remote, axis=0),
            experts_MR=np.einsum("me,mer->mr", (tr.expert_tokens[s].mean(0) > 0).astype(float), (share_MER > 0).astype(float)),
            loads_ME=tr.expert_tokens[s].mean(axis=0).astype(float),
            phase_LRP=med(tr.phase_time_s),
            step_s=float(np.median(tr.wall_time_s[s])),
            busy=float(1 - np.median(tr.phase_time_s[s][..., tr.phases.index("wait")].sum(axis=1).mean(axis=1)
                                     / tr.wall_time_s[s])),
            concurrency=_concurrency(tr, s)))
    if not out:
        raise CalibrationError(f"{tr.path}: calibration needs prefill or decode steps (this trace has only mixed ones)")
    return out


def _cover(bins: np.ndarray, ev: np.ndarray) -> np.ndarray:
    """bool [bins]: the time bins some interval of ``ev`` covers."""
    edge = np.zeros(len(bins) + 1)
    np.add.at(edge, np.searchsorted(bins, ev["t_start_s"]), 1)
    np.add.at(edge, np.searchsorted(bins, ev["t_end_s"]), -1)
    return np.cumsum(edge)[:-1] > 0


def _concurrency(tr: Trace, steps: np.ndarray, resolution_s: float = 1e-4) -> float | None:
    """Median over the sampled steps of: for each rank's computing instants (in a phase, not
    blocked in "wait"), the fraction of the other ranks computing too. Each rank's clock starts
    at the step's barrier, so ranks line up to within its skew."""
    wait = tr.phases.index("wait")
    ev = tr.events[np.isin(tr.events["step"], tr.step[steps])]
    if tr.num_ranks < 2 or not len(ev):
        return None
    per_step = []
    for s in np.unique(ev["step"]):
        e = ev[ev["step"] == s]
        bins = np.arange(0.0, e["t_end_s"].max(), resolution_s)
        busy = np.stack([_cover(bins, e[(e["rank"] == r) & (e["phase"] != wait)])
                         & ~_cover(bins, e[(e["rank"] == r) & (e["phase"] == wait)]) for r in range(tr.num_ranks)])
        n = busy.sum(axis=0)
        if busy.any():
            per_step.append(float((busy * (n - 1)).sum() / busy.sum() / (tr.num_ranks - 1)))
    return float(np.median(per_step)) if per_step else None
