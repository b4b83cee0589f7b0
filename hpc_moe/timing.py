"""Per-layer phase timers, a timeline of events, and the record of every exchange, per rank and step.

Phases nest: time spent in an inner phase (a ``wait`` inside ``dispatch``) is booked to the inner one
only, so the columns of ``times_LP`` add up to the time the rank spent. A phase is timed by a
clock's marks at its start and end. On the CPU the clock is the host's. On a GPU, kernels are
asynchronous, so compute phases are timed by CUDA events recorded on the compute stream
(hpc_moe.backend.DeviceClock) and resolved once, when the step's figures are read: no phase
synchronises the device, and ``--profile on`` keeps the overlap of communication and compute. A
"wait" (the host blocked on an all-to-all) is host time on either.

On a GPU every phase is also an NVTX range named "PHASE L<layer>" (the backend's phase_ranges(),
nested as the phases nest), so an ``nsys profile`` of a run shows hpc_moe's phases over the
kernels and the MPI calls; on a CPU there are none.

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


class HostClock:
    """Marks are perf_counter seconds; nothing to resolve."""

    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def settle(self) -> None:
        pass


HOST_CLOCK = HostClock()


class Profiler:
    """Accumulates seconds per (layer, phase), a list of events, and the exchanges of the current step.

    times_LP: float64 [L, P] exclusive seconds; events: (layer, phase id, t_start, t_end) in seconds
    from the step's start; exchanges: (layer, micro_batch, kind id, t_start, t_post, t_done, blocked_s),
    times from the step's start; exchange_LK2: float64 [L, K, 2] seconds in flight (t_done - t_start)
    and blocked per kind. clock: what times the compute phases (HostClock, or the backend's
    phase_clock(): CUDA events on a GPU); times_LP and events resolve its marks when read.
    ranges: None, or what opens a named range around every phase (``push(label)``, ``pop()``: the
    backend's phase_ranges(), NVTX on a GPU), with phases on or off: a profiler outside sees them.
    """

    def __init__(self, num_layers: int, clock=None, enabled: bool = True, watchdog=None, ranges=None):
        """watchdog: a hpc_moe.watchdog.Watchdog told of every "wait" phase (with phases off too)."""
        self.num_layers = num_layers
        self.clock = clock if clock is not None else HOST_CLOCK
        self.enabled = enabled
        self.watchdog = watchdog
        self.ranges = ranges
        self.start_step()

    def start_step(self) -> None:
        self._times_LP = np.zeros((self.num_layers, len(PHASES)))
        self.exchange_LK2 = np.zeros((self.num_layers, len(EXCHANGE_KINDS), 2))
        self._events: list[tuple[int, int, float, float]] = []
        self.exchanges: list[tuple[int, int, int, float, float, float]] = []
        # Phases not yet resolved: [layer, phase id, clock, start mark, end mark, host start, children];
        # _open: the indices of the phases open now, innermost last.
        self._pending: list[list] = []
        self._open: list[int] = []
        self.t0 = time.perf_counter()

    @property
    def times_LP(self) -> np.ndarray:
        self._resolve()
        return self._times_LP

    @property
    def events(self) -> list:
        self._resolve()
        return self._events

    @contextmanager
    def phase(self, layer: int, name: str, what: str | None = None):
        """Time a phase of ``layer``; what: for a "wait", what it waits for (the watchdog says it)."""
        watched = self.watchdog is not None and name == "wait"
        with self.watchdog.waiting(f"{what or 'an exchange'} of layer {layer}") if watched else nullcontext(), \
                self._range(layer, name):
            if not self.enabled:
                yield
                return
            with self._timed(layer, name):
                yield

    @contextmanager
    def _range(self, layer: int, name: str):
        if self.ranges is None:
            yield
            return
        self.ranges.push(f"{name} L{layer}")
        try:
            yield
        finally:
            self.ranges.pop()

    @contextmanager
    def _timed(self, layer: int, name: str):
        clock = HOST_CLOCK if name == "wait" else self.clock  # a wait is the host's, not the device's
        start = clock.mark()
        i = self._push(layer, name, clock, start, start if clock is HOST_CLOCK else time.perf_counter())
        try:
            yield
        finally:
            self._pending[i][4] = clock.mark()
            self._open.pop()

    def _push(self, layer: int, name: str, clock, start, host_start: float) -> int:
        i = len(self._pending)
        self._pending.append([layer, PHASE_ID[name], clock, start, None, host_start, []])
        if self._open:
            self._pending[self._open[-1]][6].append(i)
        self._open.append(i)
        return i

    def add(self, layer: int, name: str, t_start: float, t_end: float) -> None:
        """Record a phase measured elsewhere (perf_counter seconds)."""
        if not self.enabled:
            return
        i = self._push(layer, name, HOST_CLOCK, t_start, t_start)
        self._pending[i][4] = t_end
        self._open.pop()

    def _resolve(self) -> None:
        """Turn the phases' marks into exclusive seconds and timeline events, once none is open
        (at the step's end): one wait for the device, if its clock has marks outstanding."""
        if not self._pending or self._open:
            return
        if any(p[2] is not HOST_CLOCK for p in self._pending):
            self.clock.settle()
        seconds = [clock.seconds(start, end) for _, _, clock, start, end, _, _ in self._pending]
        for i, (layer, pid, clock, _, end, host_start, children) in enumerate(self._pending):
            # A device-timed parent can hold a host-timed wait longer than the parent's own device
            # seconds (the device was idle, or its start mark queued behind earlier work while the
            # host waited): its exclusive time is then 0, not negative, and the wait keeps it all.
            self._times_LP[layer, pid] += max(0.0, seconds[i] - sum(seconds[c] for c in children))
            # A host phase ends at its own end reading, so that an exchange posted after it (read
            # from the same clock, minus the same t0) is never recorded before its end.
            t_end = end - self.t0 if clock is HOST_CLOCK else host_start - self.t0 + seconds[i]
            self._events.append((layer, pid, host_start - self.t0, t_end))
        self._pending = []

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
