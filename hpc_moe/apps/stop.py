"""The job's stop request: Slurm's --signal before the time limit, or a user's kill."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager


class StopRequest:
    """SIGTERM or SIGUSR1 (Slurm's --signal before the time limit): the first asks the job to stop
    after the step in flight, every rank together; a second ends this process at once."""

    def __init__(self):
        self.signal: signal.Signals | None = None

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # the second signal: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signal.Signals(signum)
