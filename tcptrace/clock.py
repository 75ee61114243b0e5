"""Kernel timestamps (CLOCK_MONOTONIC, from bpf_ktime_get_ns) to wall-clock time."""

from __future__ import annotations

import time


class MonotonicClock:
    """Converts monotonic nanoseconds to epoch seconds with one offset taken at start."""

    def __init__(self) -> None:
        # Take both readings back to back; their skew is far below a millisecond.
        self._offset = time.time() - time.monotonic_ns() / 1e9

    def to_epoch(self, monotonic_ns: int) -> float:
        return self._offset + monotonic_ns / 1e9

    def now(self) -> float:
        return time.time()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()
