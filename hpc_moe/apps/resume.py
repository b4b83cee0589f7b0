"""``hpc-moe run --resume TRACE.h5``: where a stopped or killed run continues, read from its trace.

A run's steps are a function of its seed, the step's index and the ranks it runs on (the workload
stream, every step's tokens and the synthetic context: hpc_moe.apps.batches), so a resumed run
draws for step n exactly what the first run would have drawn. The trace holds the options of
the first run (``run_config``); the resumed run takes them all but the few that say where and how
it runs on this allocation (``ANEW``), starts at the first step not written, and appends to the
same file as a new segment (hpc_moe.trace.segments).

Shape legend: M MoE layers, E experts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from hpc_moe.apps.options import LayoutOptions, RunOptions
from hpc_moe.errors import UsageError
from hpc_moe.trace.reader import SCHEMA_VERSION, read_trace

# What a resume may set anew: where and how this allocation runs it, not what it measures (what it
# leaves unset stays as the first run had it, --ranks-per-node's simulated nodes included).
ANEW = ("resume", "watchdog", "summary_json", "probe_links")
LAYOUT_ANEW = ("ranks_per_node", "allow_shared_gpu")


class ResumeError(UsageError):
    """The trace cannot be resumed as asked (the message says why, naming the file)."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues. options: the first run's, but for ANEW; first_step: the first
    measured step not in the trace; after: the state the trace ended in ("stopped", "failed" or
    "running": killed); previous_end_unix: when its last step ended (0: no step); duration_left:
    seconds of a --duration run still to measure; loads_ME float64 [M, E]: mean tokens per
    expert over the steps written (None: none written); total_ME int64 [M, E]: their sum (what
    --replan-every has accumulated); last_nodes: the node of each rank of the trace's last
    segment; placed_by_loads: whether the run placed its experts by loads (else evenly)."""

    path: str
    options: RunOptions
    first_step: int
    after: str
    previous_end_unix: float
    duration_left: float | None
    loads_ME: np.ndarray | None
    total_ME: np.ndarray
    last_nodes: tuple[int, ...]
    placed_by_loads: bool

    def same_world(self, node_of_rank) -> bool:
        """Whether these ranks (node id of each) are the ones the trace last ran on."""
        return tuple(int(n) for n in node_of_rank) == self.last_nodes

    def placement_loads(self, node_of_rank, original_loads):
        """The loads [M, E] to place experts by (None: evenly): on the ranks the trace last ran
        on (node id of each), as it did: evenly, or by the loads measured so far (as a
        re-placement would); on other ranks by the loads measured so far (replicas of the
        experts the lost ranks held, or colocation), or, with no step written, by what the
        first run placed by (``original_loads``)."""
        if self.same_world(node_of_rank) and not self.placed_by_loads:
            return None
        return self.loads_ME if self.loads_ME is not None else original_loads


def read_resume_point(given: RunOptions, world_size: int) -> ResumePoint:
    """Rank 0: check that ``given.resume`` names a trace this run can continue on ``world_size``
    ranks -> ResumePoint. Raises ResumeError (one line) and leaves the file untouched when not."""
    path = given.resume
    trace = read_trace(path)  # a TraceError (one line) for a missing, foreign or broken file
    version = int(trace.meta.get("schema_version", 0))
    if version != SCHEMA_VERSION:
        raise ResumeError(f"--resume {path}: written with trace schema version {version}; this hpc_moe resumes "
                          f"version {SCHEMA_VERSION} traces only (start a new run)")
    if trace.state == "completed":
        raise ResumeError(f"--resume {path}: the run completed ({trace.num_steps} steps): nothing to resume")
    first = _options(path, trace.meta.get("run_config") or {}, given)
    done = int(trace.step[-1]) + 1 if trace.num_steps else 0
    left = None
    if first.steps is not None and done >= first.steps:
        raise ResumeError(f"--resume {path}: it holds all {first.steps} steps: nothing to resume")
    if first.duration is not None:
        left = first.duration - float(trace.wall_time_s.sum())
        if left <= 0:
            raise ResumeError(f"--resume {path}: its --duration {first.duration:g} s is measured: nothing to resume")
    if first.bias_update_rate:
        raise ResumeError(f"--resume {path}: the run adjusted its gating biases (--bias-update-rate); they are not "
                          "in the trace, so its later steps cannot be reproduced")
    columns = trace.num_ranks
    if world_size > columns:
        raise ResumeError(f"--resume {path}: the trace has {columns} rank columns; resume it on at most {columns} "
                          f"ranks (got {world_size}), or start a new run")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.access(directory, os.W_OK):
        raise ResumeError(f"--resume {path}: cannot write in {directory} (the resumed trace is written beside it)")
    model = (trace.meta.get("extra") or {}).get("placement") or {}
    last = trace.segments[-1]
    return ResumePoint(path=path, options=first, first_step=done, after=trace.state,
                       previous_end_unix=float(trace.time_unix[-1]) if trace.num_steps else 0.0, duration_left=left,
                       loads_ME=trace.expert_tokens.mean(axis=0) if trace.num_steps else None,
                       total_ME=trace.expert_tokens.sum(axis=0),
                       last_nodes=tuple(int(n) for n in last.ranks["node"]),
                       placed_by_loads=model.get("modelled_rank_load") is not None or bool(first.replan_every))


def _options(path: str, recorded: dict, given: RunOptions) -> RunOptions:
    """The first run's RunOptions from the trace's run_config, but for the ANEW flags that
    ``given`` sets (to anything but their default); any other flag it sets is refused: a resumed
    run measures what the first one did."""
    names = {f.name for f in dataclasses.fields(RunOptions)} - {"layout"}
    layout_names = {f.name for f in dataclasses.fields(LayoutOptions)}
    if not names - {"resume"} <= recorded.keys() or not layout_names <= (recorded.get("layout") or {}).keys():
        raise ResumeError(f"--resume {path}: its run_config is not that of an hpc-moe run of this version")
    default, default_layout = RunOptions(), LayoutOptions()
    changed = [n for n in names - set(ANEW) if getattr(given, n) != getattr(default, n)]
    changed += [n for n in layout_names - set(LAYOUT_ANEW) if getattr(given.layout, n) != getattr(default_layout, n)]
    if changed:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(changed))
        raise ResumeError(f"--resume takes the run's options from the trace; {flags} cannot be given with it "
                          f"(only --{', --'.join(a.replace('_', '-') for a in (*ANEW[1:], *LAYOUT_ANEW))})")
    layout = {k: v for k, v in recorded["layout"].items() if k in layout_names}
    layout.update({k: getattr(given.layout, k) for k in LAYOUT_ANEW if getattr(given.layout, k) != getattr(default_layout, k)})
    kept = {k: v for k, v in recorded.items() if k in names}
    kept.update({k: getattr(given, k) for k in ANEW if getattr(given, k) != getattr(default, k)})
    kept["trace"] = path
    try:
        return RunOptions(**kept, layout=LayoutOptions(**layout))
    except (TypeError, ValueError) as e:
        raise ResumeError(f"--resume {path}: its run_config does not make a run: {e}") from None
