"""The options of the jobs, as frozen dataclasses built once by the command line (hpc_moe.cli).

Each is checked when built (an InputError on every rank alike, before any collective) and travels
explicitly; the trace stores RunOptions as its ``run_config``.
"""
from __future__ import annotations

from dataclasses import dataclass

from hpc_moe.ep.dispatch import DispatchOptions
from hpc_moe.ep.engine import EngineOptions
from hpc_moe.errors import UsageError


@dataclass(frozen=True)
class LayoutOptions:
    """Parallel layout, communication and arithmetic of run and generate.

    dp: model replicas; expert_tp: ranks per expert; algorithm / transport / payload: of the
    all-to-all; overlap "on" splits a step in micro_batches parts, "off" runs one; deterministic:
    logits independent of the layout (bitwise on the CPU); backend / dtype: the array module;
    ranks_per_node: simulate nodes of k consecutive ranks (None: the real nodes); dispatch: the
    exchange's scheme, "auto" | "flat" | "hierarchical" (hpc_moe.ep.dispatch.DispatchOptions);
    allow_shared_gpu: let ranks of a node share a GPU (the start-up self-test refuses it otherwise).
    """

    dp: int = 1
    expert_tp: int = 1
    algorithm: str = "alltoallv"
    transport: str = "auto"
    payload: str = "native"
    overlap: str = "off"
    micro_batches: int = 2
    deterministic: bool = False
    backend: str = "auto"
    dtype: str | None = None
    ranks_per_node: int | None = None
    dispatch: str = "auto"
    allow_shared_gpu: bool = False

    def engine_options(self) -> EngineOptions:
        return EngineOptions(micro_batches=self.micro_batches if self.overlap == "on" else 1,
                             dispatch=DispatchOptions(self.algorithm, self.transport, self.payload, self.deterministic,
                                                      self.dispatch))


@dataclass(frozen=True)
class RunOptions:
    """``hpc-moe run``: the model (config preset or checkpoint, layers, seed), the workload (mode,
    batch, seq_len, prefill_fraction, routing), the length (steps or duration, warmup), the
    outputs (trace or None, overwrite, events_every, profile, baseline, summary_json), load
    balancing (loads_from, replan_every, bias_update_rate, eplb, probe_links: time the links
    between nodes and place by them) and the layout."""

    layout: LayoutOptions = LayoutOptions()
    config: str = "tiny"
    checkpoint: str | None = None
    layers: int | None = None
    seed: int = 0
    mode: str = "prefill"
    batch: str = "8"
    seq_len: str = "64"
    prefill_fraction: float = 0.25
    routing: str = "model"
    steps: int | None = 20
    duration: float | None = None
    warmup: int = 2
    trace: str | None = "hpc-moe-trace.h5"
    overwrite: bool = False
    events_every: int = 10
    profile: str = "on"
    baseline: str | None = None
    summary_json: str | None = None
    loads_from: str | None = None
    replan_every: int = 0
    bias_update_rate: float = 0.0
    eplb: str = "auto"
    probe_links: str = "on"
    redundant_experts: int = 0
    watchdog: float = 600.0

    def __post_init__(self):
        if (self.steps is None) == (self.duration is None):
            raise UsageError("give one of --steps and --duration")
        if self.steps is not None and self.steps < 1 or self.duration is not None and self.duration <= 0:
            raise UsageError("--steps must be >= 1 and --duration > 0")
        for name in ("warmup", "events_every", "replan_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.watchdog < 0:
            raise UsageError(f"--watchdog must be >= 0 seconds (0: off; got {self.watchdog})")
        if self.redundant_experts < 0:
            raise UsageError(f"--redundant-experts must be >= 0 (got {self.redundant_experts})")
        if not 0.0 <= self.prefill_fraction <= 1.0:
            raise UsageError(f"--prefill-fraction must be in [0, 1] (got {self.prefill_fraction})")


@dataclass(frozen=True)
class GenerateOptions:
    """``hpc-moe generate``: weights (checkpoint, or config preset + seed), prompts (input_ids
    .npy), max_new_tokens, output .npz, and the layout."""

    input_ids: str
    output: str
    layout: LayoutOptions = LayoutOptions()
    checkpoint: str | None = None
    config: str | None = None
    seed: int = 0
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise UsageError("--max-new-tokens must be >= 0")
