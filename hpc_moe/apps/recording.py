"""What a run records (rank 0): its trace's metadata and layout, and each placement as the trace
stores it (the EP ranks of every replica, the policy and the rank load it expects)."""
from __future__ import annotations

import dataclasses

import numpy as np
from mpi4py import MPI

from hpc_moe.apps.options import RunOptions
from hpc_moe.ep.engine import Engine
from hpc_moe.timing import COMM_PHASES, PHASES


def placement_ranks(placement) -> np.ndarray:
    """The placement as EP ranks [M, E, K * expert_tp] (every rank of each replica's slot), -1 padded."""
    slots = placement.to_array()
    slots = slots[None] if slots.ndim == 2 else slots
    tp = placement.expert_tp
    ranks = np.repeat(slots * tp, tp, axis=-1) + np.tile(np.arange(tp), slots.shape[-1])
    return np.where(np.repeat(slots, tp, axis=-1) >= 0, ranks, -1).astype(np.int32)


def placement_model(p) -> dict:
    """The placement's policy and, placed by loads, the rank load (max/mean per MoE layer) it
    expects as choose_replica sends the tokens: the trace's figure to set against the measured."""
    if p.loads is None:
        return {"policy": p.policy, "modelled_rank_load": None}
    ids = p.layer_ids or [None] * len(p.loads)
    rows = [p.routed_loads(w, layer) for layer, w in zip(ids, p.loads)]
    return {"policy": p.policy, "modelled_rank_load": [float(r.max() / r.mean()) for r in rows]}


def open_recorder(o: RunOptions, cfg, layers, ctx, backend, engine: Engine, workload, rank_map, links, point=None):
    """Rank 0's recorder of the run: a TraceWriter on o.trace, or a MemoryTrace with --trace none
    (the summary reads it either way); resumed (``point``, hpc_moe.apps.resume.ResumePoint), the
    trace it continues, with this run's ranks and placement from its first step on."""
    from hpc_moe.ep.transport import mpi_cuda_support
    from hpc_moe.trace.writer import MemoryTrace, TraceWriter
    if point is not None:
        return TraceWriter.resume(point.path, steps=point.first_step, placement=placement_ranks(engine.placement),
                                  rank_map=rank_map, after=point.after, previous_end_unix=point.previous_end_unix)
    run_config = {**dataclasses.asdict(o), "workload": workload.describe()}
    meta = {"model_config": cfg.to_dict(), "run_config": run_config, "parallel_config": ctx.describe(),
            "mpi_library_version": MPI.Get_library_version(), "transport": engine.transport_name,
            "cuda_aware": mpi_cuda_support() == 1, "array_backend": f"{backend.name} ({backend.dtype})",
            "truncated": layers < cfg.num_hidden_layers, "links": links and links.to_dict(),
            "extra": {"placement": placement_model(engine.placement)}}
    layout = dict(num_layers=layers, moe_layers=engine.moe_layers, placement=placement_ranks(engine.placement),
                  rank_map=rank_map, phases=PHASES, comm_phases=COMM_PHASES)
    if o.trace is None:
        return MemoryTrace(meta, **layout)
    return TraceWriter(o.trace, meta, overwrite=o.overwrite, **layout)
