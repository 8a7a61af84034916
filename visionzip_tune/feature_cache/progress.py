"""A line of progress with the rate and the time left, for work that takes minutes (hashing the media, building
the cache): printed at most every few seconds and once at the end, on rank 0, so logs stay short and nothing waits
without a word."""

from __future__ import annotations

import time
from datetime import timedelta

from visionzip_tune.distributed import print0

EVERY_S = 10.0


class Progress:
    """Counts ``done`` of ``total`` ``unit``s of the work named ``what``; :meth:`advance` as they finish."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = EVERY_S):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.started = self.shown = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.shown >= self.every_s and self.done < self.total:
            self.shown = now
            print0(f"[cache] {self.line(now)}")

    def finish(self) -> float:
        """Print the last line; returns the seconds the work took."""
        now = time.monotonic()
        print0(f"[cache] {self.line(now)}")
        return now - self.started

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "done" if self.done >= self.total else f"ETA {_clock(left)}" if left != float("inf") else "ETA unknown"
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} in {_clock(elapsed)} ({rate:.1f} {self.unit}/s), {eta}"
        )


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
