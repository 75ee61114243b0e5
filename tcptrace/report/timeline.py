"""Sampling open sockets per process and call site over time, for growth rates and plots.

The recorder is pure (no clock, no I/O): the tracer hands it the ledger's open
sockets at a fixed interval and passes `rows()` to write_report. Counts are kept
sparse per sample and expanded into a dense grid only when rows are asked for,
so an idle call site costs nothing while tracing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from tcptrace.report.summary import group_key
from tcptrace.sockets import Connection, is_leak

# One hour of 1 s samples. Past it, every other sample is dropped: a day-long trace
# keeps its shape (the slope of a leak survives thinning) in bounded memory.
DEFAULT_MAX_SAMPLES: Final = 3600

_Key = tuple[int, str]  # (pid, call site)


@dataclass(slots=True)
class _Cell:
    open_count: int = 0
    flagged_count: int = 0
    oldest_age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float
    cells: dict[_Key, _Cell]


class TimelineRecorder:
    """Open and flagged socket counts per (pid, call site), one sample per `sample()` call."""

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if max_samples < 2:
            raise ValueError("max_samples must be at least 2 (a first and a last sample)")
        self.max_samples = max_samples
        self._samples: list[_Sample] = []
        self._comms: dict[_Key, str] = {}

    @property
    def sample_count(self) -> int:
        return len(self._samples)

    def sample(self, now: float, open_sockets: Sequence[Connection], threshold_s: float) -> None:
        """Record the sockets open at `now` (epoch seconds); closed ones are ignored."""
        cells: dict[_Key, _Cell] = {}
        for conn in open_sockets:
            if not conn.is_open:
                continue
            key = (conn.pid, group_key(conn))
            cell = cells.get(key)
            if cell is None:
                cell = cells[key] = _Cell()
            cell.open_count += 1
            if is_leak(conn, now, threshold_s):
                cell.flagged_count += 1
            cell.oldest_age_s = max(cell.oldest_age_s, conn.age_s(now))
            self._comms[key] = conn.comm
        self._samples.append(_Sample(now, cells))
        if len(self._samples) > self.max_samples:
            self._thin()

    def _thin(self) -> None:
        # Keep the first and the last sample: the first anchors back-filled zeros,
        # the last is the final sample at stop, which must agree with open_sockets.
        kept = self._samples[::2]
        if kept[-1] is not self._samples[-1]:
            kept.append(self._samples[-1])
        self._samples = kept

    def rows(self) -> list[dict[str, object]]:
        """Rows of the `timeline` table: every sample x every (pid, call site) ever seen."""
        keys = sorted(self._comms)
        rows: list[dict[str, object]] = []
        for sample in self._samples:
            for key in keys:
                cell = sample.cells.get(key)
                rows.append(
                    {
                        "t": sample.t,
                        "pid": key[0],
                        "comm": self._comms[key],
                        "call_site": key[1],
                        "open_count": cell.open_count if cell else 0,
                        "flagged_count": cell.flagged_count if cell else 0,
                        "oldest_age_s": cell.oldest_age_s if cell else None,
                    }
                )
        return rows
