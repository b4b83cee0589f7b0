"""Per-layer phase timers and a timeline of events, recorded on every rank for every step.

On a GPU, kernels are asynchronous: a phase is closed by synchronising the device so that its time
is the time of its work. That costs a little overlap inside a rank; `--profile off` skips it.

Shape legend: L layers, P phases.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

PHASES = ("attention", "dense_mlp", "gate", "dispatch", "expert", "combine", "shared", "wait")
PHASE_ID = {p: i for i, p in enumerate(PHASES)}
# "wait" is time blocked on an outstanding all-to-all: exposed communication, drawn with it.
COMM_PHASES = ("dispatch", "combine", "wait")


class Profiler:
    """Accumulates seconds per (layer, phase) and a list of events for the current step.

    times_LP: float64 [L, P]; events: list of (layer, phase id, t_start, t_end) in seconds from
    the step's start.
    """

    def __init__(self, num_layers: int, synchronize=None, enabled: bool = True):
        self.num_layers = num_layers
        self.synchronize = synchronize if synchronize is not None else (lambda: None)
        self.enabled = enabled
        self.start_step()

    def start_step(self) -> None:
        self.times_LP = np.zeros((self.num_layers, len(PHASES)))
        self.events: list[tuple[int, int, float, float]] = []
        self.t0 = time.perf_counter()

    @contextmanager
    def phase(self, layer: int, name: str):
        if not self.enabled:
            yield
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.add(layer, name, t, time.perf_counter())

    def add(self, layer: int, name: str, t_start: float, t_end: float) -> None:
        """Record a phase measured elsewhere (perf_counter seconds)."""
        if not self.enabled:
            return
        p = PHASE_ID[name]
        self.times_LP[layer, p] += t_end - t_start
        self.events.append((layer, p, t_start - self.t0, t_end - self.t0))

    def add_seconds(self, layer: int, name: str, seconds: float) -> None:
        """Book time that is not one interval (no timeline event)."""
        if self.enabled:
            self.times_LP[layer, PHASE_ID[name]] += seconds

    def events_array(self) -> np.ndarray:
        """float64 [n, 4]: layer, phase id, t_start, t_end."""
        return np.asarray(self.events, dtype=np.float64).reshape(-1, 4)


class NullProfiler(Profiler):
    """Records nothing: the reference path and `--profile off`."""

    def __init__(self, num_layers: int = 0):
        super().__init__(num_layers, enabled=False)
