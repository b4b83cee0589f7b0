"""Rank 0's progress line: step, tokens/s so far, ETA. One updating line on a terminal, plain
lines (about every 10% of the run, or every 30 s) when the output is a file or a pipe."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, steps: int | None, duration: float | None, stream=None):
        self.steps, self.duration = steps, duration
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.done = self.tokens_in = self.tokens_out = 0
        self.busy = 0.0

    def update(self, step, wall_s: float) -> None:
        """After each measured step (a workload Step and its wall time)."""
        self.done += 1
        self.tokens_in += step.input_tokens
        self.tokens_out += step.output_tokens
        self.busy += wall_s
        now = time.perf_counter()
        every = max(1, (self.steps or 0) // 10)
        if self.tty or self.done % every == 0 or now - self.last >= 30:
            self.last = now
            end = "" if self.tty else "\n"
            self.stream.write(("\r" if self.tty else "") + self.line(now) + end)
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        if self.steps:
            left = (self.steps - self.done) * elapsed / self.done
            where = f"step {self.done}/{self.steps}"
        else:
            left = max(0.0, (self.duration or 0) - elapsed)
            where = f"step {self.done}"
        rates = [f"{n / self.busy:,.0f} {kind} tok/s" for n, kind in ((self.tokens_in, "input"), (self.tokens_out, "output"))
                 if n]  # a decode-only run has no input tokens to speak of
        return f"{where}  {'  '.join(rates)}  ETA {left:,.0f} s"

    def close(self) -> None:
        if self.tty and self.done:
            self.stream.write("\n")
            self.stream.flush()
