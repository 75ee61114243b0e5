"""Sampling open sockets per process and call site over time, for growth rates and plots.

The recorder is pure (no clock, no I/O): the tracer hands it the ledger's open
sockets at a fixed interval and passes `frame()` to write_report. Counts are kept
sparse per sample and written sparse (schema version 2): a (pid, call site) has a
row while it has sockets open, and one row with 0 at the sample after its last one
closed. The dense grid of version 1 (every pair ever seen x every sample) grew with
every short-lived process: one hour of a service forking a child every 5 s made it
2.7 million rows and 1.4 GB while the report was written (issue 7, soak).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from tcptrace.report.summary import group_key
from tcptrace.sockets import Connection, is_leak

if TYPE_CHECKING:
    import pandas as pd

# One hour of 1 s samples. Past it, every other sample is dropped: a day-long trace
# keeps its shape (the slope of a leak survives thinning) in bounded memory.
DEFAULT_MAX_SAMPLES: Final = 3600

_Key = tuple[int, str]  # (pid, call site)


# One cell per (pid, call site) with sockets open at a sample: 20 bytes, not a Python
# object (an hour of samples of a busy service would hold ~150 bytes per cell).
_CELL: Final = np.dtype(
    [("pair", "<i4"), ("open_count", "<i4"), ("flagged_count", "<i4"), ("oldest_age_s", "<f8")]
)


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float
    cells: np.ndarray  # of _CELL, one per pair open at t


class TimelineRecorder:
    """Open and flagged socket counts per (pid, call site), one sample per `sample()` call."""

    def __init__(self, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if max_samples < 2:
            raise ValueError("max_samples must be at least 2 (a first and a last sample)")
        self.max_samples = max_samples
        self._samples: list[_Sample] = []
        self._pair_ids: dict[_Key, int] = {}
        self._pairs: list[_Key] = []
        self._comms: list[str] = []  # per pair: the name at the last sample that saw it

    @property
    def sample_count(self) -> int:
        return len(self._samples)

    def sample(self, now: float, open_sockets: Sequence[Connection], threshold_s: float) -> None:
        """Record the sockets open at `now` (epoch seconds); closed ones are ignored."""
        cells: dict[int, list[Any]] = {}
        for conn in open_sockets:
            if not conn.is_open:
                continue
            key = (conn.pid, group_key(conn))
            pair = self._pair_ids.get(key)
            if pair is None:
                pair = self._pair_ids[key] = len(self._pairs)
                self._pairs.append(key)
                self._comms.append(conn.comm)
            cell = cells.get(pair)
            if cell is None:
                cell = cells[pair] = [pair, 0, 0, 0.0]
            cell[1] += 1
            if is_leak(conn, now, threshold_s):
                cell[2] += 1
            cell[3] = max(cell[3], conn.age_s(now))
            self._comms[pair] = conn.comm
        packed = np.array([tuple(c) for c in cells.values()], dtype=_CELL)
        self._samples.append(_Sample(now, packed))
        if len(self._samples) > self.max_samples:
            self._thin()

    def _thin(self) -> None:
        # Keep the first and the last sample: the first anchors the run's start, the
        # last is the final sample at stop, which must agree with open_sockets.
        kept = self._samples[::2]
        if kept[-1] is not self._samples[-1]:
            kept.append(self._samples[-1])
        self._samples = kept

    def sample_times(self) -> list[float]:
        """Every sample kept (epoch seconds), for meta.json: a sample where nothing
        was open has no row in the sparse table, yet counts as a 0 for growth rates."""
        return [sample.t for sample in self._samples]

    def columns(self) -> dict[str, list[Any]]:
        """The `timeline` table, column-wise and sparse, ordered by (t, pid, call site).

        A pair has a row at every sample where it has sockets open, and a row with
        open_count 0 at the first sample after that (a plotted line falls to 0
        instead of stopping in mid-air). Absent means none open."""
        out: dict[str, list[Any]] = {
            "t": [], "pid": [], "comm": [], "call_site": [],
            "open_count": [], "flagged_count": [], "oldest_age_s": [],
        }  # fmt: skip
        order = sorted(range(len(self._pairs)), key=self._pairs.__getitem__)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        before = np.empty(0, dtype=np.int64)  # pairs open at the previous sample
        for sample in self._samples:
            cells = sample.cells
            fell = np.setdiff1d(before, cells["pair"])  # closed since: one row with 0
            pairs = np.concatenate([cells["pair"].astype(np.int64), fell])
            counts = np.concatenate([cells["open_count"], np.zeros(len(fell), np.int32)])
            flagged = np.concatenate([cells["flagged_count"], np.zeros(len(fell), np.int32)])
            oldest = np.concatenate([cells["oldest_age_s"], np.full(len(fell), np.nan)])
            for i in np.argsort(rank[pairs], kind="stable").tolist():
                pid, call_site = self._pairs[pairs[i]]
                out["t"].append(sample.t)
                out["pid"].append(pid)
                out["comm"].append(self._comms[pairs[i]])
                out["call_site"].append(call_site)
                out["open_count"].append(int(counts[i]))
                out["flagged_count"].append(int(flagged[i]))
                out["oldest_age_s"].append(None if counts[i] == 0 else float(oldest[i]))
            before = cells["pair"].astype(np.int64)
        return out

    def frame(self) -> pd.DataFrame:
        """The `timeline` table as written to the report."""
        from tcptrace.report.schema import frame_from_columns

        return frame_from_columns("timeline", self.columns())
