"""Per-layer phase timers, a timeline of events, and the record of every exchange, per rank and step.

Phases nest: time spent in an inner phase (a ``wait`` inside ``dispatch``) is booked to the inner one
only, so the columns of ``times_LP`` add up to the time the rank spent. On a GPU, kernels are
asynchronous: a phase is closed by synchronising the device so that its time is the time of its
work. That costs a little overlap inside a rank; ``--profile off`` skips it.

Shape legend: L layers, P phases, X exchanges, K exchange kinds (dispatch, combine).
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import numpy as np

PHASES = ("attention", "dense_mlp", "gate", "dispatch", "expert", "combine", "shared", "wait")
PHASE_ID = {p: i for i, p in enumerate(PHASES)}
# "wait" is time blocked on an outstanding all-to-all: exposed communication, drawn with it.
COMM_PHASES = ("dispatch", "combine", "wait")
EXCHANGE_KINDS = ("dispatch", "combine")


class Profiler:
    """Accumulates seconds per (layer, phase), a list of events, and the exchanges of the current step.

    times_LP: float64 [L, P] exclusive seconds; events: (layer, phase id, t_start, t_end) in seconds
    from the step's start; exchanges: (layer, micro_batch, kind id, t_start, t_post, t_done, blocked_s),
    times from the step's start; exchange_LK2: float64 [L, K, 2] seconds in flight (t_done - t_start)
    and blocked per kind.
    """

    def __init__(self, num_layers: int, synchronize=None, enabled: bool = True, watchdog=None):
        """watchdog: a hpc_moe.watchdog.Watchdog told of every "wait" phase (with phases off too)."""
        self.num_layers = num_layers
        self.synchronize = synchronize if synchronize is not None else (lambda: None)
        self.enabled = enabled
        self.watchdog = watchdog
        self.start_step()

    def start_step(self) -> None:
        self.times_LP = np.zeros((self.num_layers, len(PHASES)))
        self.exchange_LK2 = np.zeros((self.num_layers, len(EXCHANGE_KINDS), 2))
        self.events: list[tuple[int, int, float, float]] = []
        self.exchanges: list[tuple[int, int, int, float, float, float]] = []
        self._inner: list[float] = []  # seconds of inner phases, one entry per open phase
        self.t0 = time.perf_counter()

    @contextmanager
    def phase(self, layer: int, name: str, what: str | None = None):
        """Time a phase of ``layer``; what: for a "wait", what it waits for (the watchdog says it)."""
        watched = self.watchdog is not None and name == "wait"
        with self.watchdog.waiting(f"{what or 'an exchange'} of layer {layer}") if watched else nullcontext():
            if not self.enabled:
                yield
                return
            with self._timed(layer, name):
                yield

    @contextmanager
    def _timed(self, layer: int, name: str):
        t = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            self.synchronize()
            t_end = time.perf_counter()
            inner = self._inner.pop()
            if self._inner:
                self._inner[-1] += t_end - t
            self.times_LP[layer, PHASE_ID[name]] += t_end - t - inner
            self.events.append((layer, PHASE_ID[name], t - self.t0, t_end - self.t0))

    def add(self, layer: int, name: str, t_start: float, t_end: float) -> None:
        """Record a phase measured elsewhere (perf_counter seconds)."""
        if not self.enabled:
            return
        self.times_LP[layer, PHASE_ID[name]] += t_end - t_start
        if self._inner:
            self._inner[-1] += t_end - t_start
        self.events.append((layer, PHASE_ID[name], t_start - self.t0, t_end - self.t0))

    def exchange(self, layer: int, micro_batch: int, kind: str, t_start: float, t_post: float, t_done: float,
                 blocked_s: float) -> None:
        """One direction of one exchange: started, payload posted and seen complete (perf_counter
        seconds), and the seconds this rank was blocked on it. Kept also with phases off (``--profile off``): it costs nothing."""
        k = EXCHANGE_KINDS.index(kind)
        self.exchange_LK2[layer, k] += (max(0.0, t_done - t_start), blocked_s)
        self.exchanges.append((layer, micro_batch, k, t_start - self.t0, t_post - self.t0, t_done - self.t0, blocked_s))

    def events_array(self) -> np.ndarray:
        """float64 [n, 4]: layer, phase id, t_start, t_end."""
        return np.asarray(self.events, dtype=np.float64).reshape(-1, 4)

    def exchanges_array(self) -> np.ndarray:
        """float64 [X, 7]: layer, micro_batch, kind id, t_start, t_post, t_done, blocked_s."""
        return np.asarray(self.exchanges, dtype=np.float64).reshape(-1, 7)


class NullProfiler(Profiler):
    """Records no phases: the reference path and `--profile off`."""

    def __init__(self, num_layers: int = 0):
        super().__init__(num_layers, enabled=False)

    def exchange(self, *args, **kwargs) -> None:
        pass
