"""The phase profiler: exclusive nested times, and a device clock resolved once at the step's end
(a stand-in for CUDA events: its marks are numbers, its seconds twice the host's)."""
import time

import numpy as np
import pytest

from hpc_moe.backend import get_backend, gpu_count
from hpc_moe.timing import PHASE_ID, Profiler


class FakeDeviceClock:
    """Marks a counter the test advances; a phase's device seconds are what the test says."""

    def __init__(self):
        self.now, self.settled = 0.0, 0

    def mark(self):
        return self.now

    def seconds(self, start, end) -> float:
        assert self.settled, "device marks read before the device was waited for"
        return end - start

    def settle(self) -> None:
        self.settled += 1


def test_device_clock_phases_resolve_once_and_nest():
    clock = FakeDeviceClock()
    prof = Profiler(2, clock)
    with prof.phase(1, "dispatch"):
        clock.now += 0.5  # device work of the dispatch phase
        with prof.phase(1, "wait"):  # host time: the host blocks, the device clock does not move
            time.sleep(0.02)
        clock.now += 0.25
    with prof.phase(0, "attention"):
        clock.now += 2.0
    assert clock.settled == 0  # nothing waited for the device while the step ran
    t = prof.times_LP
    assert clock.settled == 1
    assert t[0, PHASE_ID["attention"]] == pytest.approx(2.0)
    wait = t[1, PHASE_ID["wait"]]
    assert 0.02 <= wait < 0.5
    assert t[1, PHASE_ID["dispatch"]] == pytest.approx(0.75 - wait)  # exclusive of its inner wait
    ev = prof.events_array()
    assert ev.shape == (3, 4) and clock.settled == 1  # resolved once
    assert sorted(ev[:, 3] - ev[:, 2]) == pytest.approx(sorted([0.75, wait, 2.0]))
    prof.start_step()
    assert not prof.times_LP.any() and prof.events_array().shape == (0, 4)


def test_host_clock_phases_add_up():
    prof = Profiler(1)
    with prof.phase(0, "expert"):
        time.sleep(0.01)
        prof.add(0, "combine", time.perf_counter() - 0.004, time.perf_counter())
    t = prof.times_LP
    assert t[0, PHASE_ID["combine"]] == pytest.approx(0.004, abs=1e-4)
    assert t[0, PHASE_ID["expert"]] >= 0.01 - 0.0045
    ev = prof.events_array()  # the expert phase's event spans its inner combine too
    assert ev[0, 3] - ev[0, 2] == pytest.approx(t.sum())


def test_an_exchange_posted_after_a_host_phase_is_never_recorded_before_its_end(monkeypatch):
    """A rank may be descheduled between any two clock readings (here: 9 s after the phase's first)."""
    readings = iter([0.0, 1.0, 10.0, 11.0, 12.0, 13.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(readings))
    prof = Profiler(1)
    with prof.phase(0, "expert"):
        pass
    t_post = time.perf_counter()
    prof.exchange(0, 0, "combine", t_post, t_post, t_post, 0.0)
    monkeypatch.undo()
    (_, _, _, t_end), = prof.events
    assert t_end <= prof.exchanges[0][4]


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="needs a GPU (CuPy)")
def test_cuda_event_clock_times_device_work_without_synchronising():
    be = get_backend("cupy", "bfloat16")
    prof = Profiler(1, be.phase_clock())
    a = be.asarray(np.ones((4096, 4096), np.float32))
    t = time.perf_counter()
    with prof.phase(0, "expert"):
        for _ in range(20):
            a @ a
    queued = time.perf_counter() - t  # the host only queued the products
    device = prof.times_LP[0, PHASE_ID["expert"]]  # resolved here, after the device ran them
    assert device > 0 and queued < device


def test_a_host_wait_longer_than_its_device_parent_leaves_no_negative_time():
    clock = FakeDeviceClock()
    prof = Profiler(1, clock)
    with prof.phase(0, "dispatch"):
        clock.now += 0.001  # the device saw 1 ms of the dispatch phase ...
        with prof.phase(0, "wait"):
            time.sleep(0.02)  # ... while the host waited 20 ms in it
    t = prof.times_LP
    assert t[0, PHASE_ID["dispatch"]] == 0.0 and t[0, PHASE_ID["wait"]] >= 0.02
    assert (t >= 0).all()


class FakeRanges:
    """Stands in for NVTX: the ranges open now, and every label pushed."""

    def __init__(self):
        self.open, self.pushed = [], []

    def push(self, label):
        self.open.append(label)
        self.pushed.append(label)

    def pop(self):
        self.open.pop()


@pytest.mark.parametrize("enabled", [True, False])
def test_every_phase_is_a_named_range_nested_as_the_phases(enabled):
    ranges = FakeRanges()
    prof = Profiler(3, enabled=enabled, ranges=ranges)
    with prof.phase(2, "dispatch"):
        with prof.phase(2, "wait"):
            assert ranges.open == ["dispatch L2", "wait L2"]
    with pytest.raises(RuntimeError):  # a phase that fails still closes its range
        with prof.phase(0, "attention"):
            raise RuntimeError("boom")
    assert ranges.open == [] and ranges.pushed == ["dispatch L2", "wait L2", "attention L0"]


def test_phase_ranges_are_nvtx_on_a_gpu_and_none_on_a_cpu(monkeypatch):
    """Backend.phase_ranges() through a stand-in CuPy (this machine may have no GPU): NVTX pushes
    and pops in the order the profiler's phases open and close."""
    import types

    import hpc_moe.backend as backend
    assert get_backend("numpy").phase_ranges() is None
    calls = []
    nvtx = types.SimpleNamespace(available=True, RangePush=lambda label: calls.append(("push", label)),
                                 RangePop=lambda: calls.append(("pop",)))
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(nvtx=nvtx)))
    gpu = backend.Backend("cupy", None, np.dtype(np.float32), "stand-in GPU", 0)
    prof = Profiler(1, enabled=False, ranges=gpu.phase_ranges())
    with prof.phase(0, "expert"):
        pass
    assert calls == [("push", "expert L0"), ("pop",)]
    nvtx.available = False  # a CuPy built without NVTX: no ranges, no failure
    assert gpu.phase_ranges() is None


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU with CuPy")
def test_nvtx_ranges_on_the_gpu():
    be = get_backend("cupy", "bfloat16")
    prof = Profiler(1, be.phase_clock(), ranges=be.phase_ranges())
    with prof.phase(0, "expert"):
        be.xp.ones((64, 64), be.dtype).sum()
    assert prof.times_LP[0, PHASE_ID["expert"]] > 0
