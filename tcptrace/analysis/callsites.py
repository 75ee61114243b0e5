"""Per call site statistics of a loaded report: what `tcptrace report` prints.

Everything here reads the DataFrames of a `Report` (never the ledger), so the
same numbers come out of a report written today or loaded a month later.

Definitions:
- opened: sockets born while tracing (opened_at known); preexisting: seen in the
  start-up snapshot, born before tracing; closed: destroyed during the run;
  still open / flagged: rows of open_sockets (flagged = the `leak` column).
- growth per minute: least-squares slope of the site's open-socket count in the
  timeline (all samples, summed over processes). It is a trend over the run, not
  a forecast; fewer than two samples give no slope.
- time to RLIMIT_NOFILE: (soft limit - fds in use at the end) / growth, per
  process, assuming the growth goes on linearly and nothing else changes. Fds in
  use come from /proc/PID/fd counted at stop; when that count is missing, the
  process's open sockets stand in (a lower bound, so the estimate is an upper bound).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tcptrace.analysis.names import PLACEHOLDERS, frames_of, site_key, site_label
from tcptrace.errors import UsageError
from tcptrace.report.loader import Report
from tcptrace.report.schema import TIMELINE, coerce_values


@dataclass(frozen=True)
class RlimitEstimate:
    pid: int
    limit: int
    fds_in_use: int
    fds_is_lower_bound: bool  # counted from open sockets: /proc/PID/fd was unreadable at stop
    growth_per_min: float
    seconds_left: float


@dataclass(frozen=True)
class SiteStats:
    key: str  # folded stack, or a bracketed placeholder
    label: str  # innermost frame worth reading, with a short file:line
    frames: tuple[str, ...]  # outermost first; empty for placeholders
    pids: tuple[int, ...]
    comms: tuple[str, ...]
    opened: int
    preexisting: int
    closed: int
    still_open: int
    flagged: int
    oldest_age_s: float | None  # of the still-open sockets
    oldest_is_lower_bound: bool
    leak_classes: dict[str, int]  # of the flagged sockets
    states: dict[str, int]  # of the still-open sockets
    growth_per_min: float | None
    rlimit: RlimitEstimate | None  # the process that would run out first at this rate

    @property
    def is_placeholder(self) -> bool:
        return self.key in PLACEHOLDERS

    @property
    def leak_rate(self) -> float | None:
        """Flagged sockets per socket seen at this site (0..1); None when none were seen."""
        seen = self.opened + self.preexisting
        return self.flagged / seen if seen else None


@dataclass(frozen=True)
class ProcessStats:
    pid: int
    comm: str
    rlimit_nofile: int | None
    fds_start: int | None
    fds_end: int | None
    still_open: int
    flagged: int
    growth_per_min: float | None  # all call sites together
    rlimit: RlimitEstimate | None


@dataclass(frozen=True)
class Analysis:
    directory: str
    meta: dict[str, Any]
    threshold_s: float
    started_at: float | None
    ended_at: float | None
    sites: tuple[SiteStats, ...]  # worst first
    processes: tuple[ProcessStats, ...]
    # Of flagged sockets, most first. An ephemeral port says nothing (every leaked
    # connection has its own), so it is shown as "*": accepted sockets' remote ports,
    # connected sockets' local ports.
    remote_endpoints: tuple[tuple[str, int], ...]
    local_ports: tuple[tuple[str, int], ...]
    losses: dict[str, int]
    timeline_samples: int
    untracked_open: int  # open sockets never classified (kernel ledger was full)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)

    @property
    def flagged(self) -> int:
        return sum(s.flagged for s in self.sites)

    @property
    def still_open(self) -> int:
        return sum(s.still_open for s in self.sites)

    @property
    def seen(self) -> int:
        return sum(s.opened + s.preexisting for s in self.sites)


_EPOCH = pd.Timestamp(0, tz="UTC")

# -- helpers ------------------------------------------------------------------------------------


def _keys(frame: pd.DataFrame) -> list[str]:
    return [
        site_key(str(stack), str(status))
        for stack, status in zip(frame["stack"], frame["stack_status"], strict=True)
    ]


def _bools(series: pd.Series) -> np.ndarray:
    return series.fillna(False).to_numpy(dtype=bool)


def slope_per_min(times_s: Iterable[float], counts: Iterable[float]) -> float | None:
    """Least-squares slope of counts over time, per minute; None without two distinct times."""
    t = np.asarray(list(times_s), dtype=float)
    y = np.asarray(list(counts), dtype=float)
    if len(t) < 2 or float(np.ptp(t)) <= 0.0:
        return None
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / (tc * tc).sum()) * 60.0


_MICROSECOND = pd.Timedelta(microseconds=1)


def _micros(t: pd.Series) -> np.ndarray:
    """UTC timestamps as integer microseconds since the epoch: the report's own
    resolution, so sample times and the t column match exactly, not as floats."""
    return ((t - _EPOCH) // _MICROSECOND).to_numpy(dtype=np.int64)


def sample_times(report: Report) -> tuple[np.ndarray | None, bool]:
    """(every timeline sample's time in microseconds, or None; whether growth rates
    can be computed from the timeline).

    Version 2 timelines are sparse: a sample where nothing was open has no row,
    yet is a 0 for growth rates, so its time comes from meta.json. Without those
    times (a meta.json edited by hand) a version 2 timeline gives no growth rather
    than a wrong one. Version 1 grids are dense: their rows are every sample."""
    raw = report.extra.get("timeline_sample_times")
    if isinstance(raw, list) and raw and all(_number(v) is not None for v in raw):
        times = coerce_values(TIMELINE[0], [float(v) for v in raw])  # as the t column
        return np.unique(_micros(times)), True
    return None, report.meta.get("schema_version") == 1


def _pivot(timeline: pd.DataFrame, by: str, times: np.ndarray | None = None) -> pd.DataFrame:
    """open_count summed per (t, `by`), as a t x `by` grid indexed by microseconds;
    absent cells are 0, and with `times`, every sample time is a row."""
    if timeline.empty:
        return pd.DataFrame(index=pd.Index(times if times is not None else [], dtype=np.int64))
    frame = pd.DataFrame(
        {
            "t": _micros(timeline["t"]),
            "by": timeline[by].astype(object),
            "n": timeline["open_count"].fillna(0).astype("int64"),
        }
    )
    grid = frame.pivot_table(index="t", columns="by", values="n", aggfunc="sum", fill_value=0)
    if times is not None:
        grid = grid.reindex(grid.index.union(pd.Index(times)), fill_value=0)
    return grid


def timeline_grid(report: Report, by: str = "call_site") -> pd.DataFrame:
    """Open sockets over time: one row per timeline sample (UTC timestamps), one column
    per value of `by` (call_site, pid or comm), summed over the rest; 0 where none
    were open. The table itself is sparse (schema version 2): use this to plot it."""
    if by not in ("call_site", "pid", "comm"):
        raise UsageError(f"timeline_grid: by must be call_site, pid or comm, not {by!r}")
    grid = _pivot(report.timeline, by, sample_times(report)[0])
    grid.index = pd.to_datetime(grid.index.to_numpy(dtype=np.int64), unit="us", utc=True)
    grid.index.name = "t"
    grid.columns.name = by
    return grid


def _growth_by(grid: pd.DataFrame) -> dict[Any, float | None]:
    if grid.empty:
        return {}
    times = grid.index.to_numpy(dtype=np.int64) / 1e6  # seconds
    return {col: slope_per_min(times, grid[col].to_numpy(dtype=float)) for col in grid.columns}


def _int_map(raw: object) -> dict[int, int | None]:
    """{"123": 7, ...} from meta.json -> {123: 7}; values that are not ints become None."""
    if not isinstance(raw, Mapping):
        return {}
    out: dict[int, int | None] = {}
    for key, value in raw.items():
        try:
            pid = int(key)
        except (TypeError, ValueError):
            continue
        ok = isinstance(value, int) and not isinstance(value, bool)
        out[pid] = value if ok else None
    return out


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _estimate(
    pid: int,
    growth: float | None,
    limits: Mapping[int, int | None],
    fds_end: Mapping[int, int | None],
    open_by_pid: Mapping[int, int],
) -> RlimitEstimate | None:
    limit = limits.get(pid)
    if growth is None or growth <= 0 or limit is None:
        return None
    fds = fds_end.get(pid)
    lower_bound = fds is None
    in_use = open_by_pid.get(pid, 0) if fds is None else fds
    seconds = max(limit - in_use, 0) / (growth / 60.0)
    return RlimitEstimate(pid, limit, in_use, lower_bound, growth, seconds)


@dataclass
class _Acc:
    pids: set[int] = field(default_factory=set)
    comms: set[str] = field(default_factory=set)
    opened: int = 0
    preexisting: int = 0
    closed: int = 0
    open_rows: list[int] = field(default_factory=list)  # row numbers in open_sockets


# -- the analysis -------------------------------------------------------------------------------


def analyze(report: Report) -> Analysis:
    meta = report.meta
    extra = report.extra
    opened_df, conns = report.open_sockets, report.connections
    open_keys, conn_keys = _keys(opened_df), _keys(conns)
    flagged_mask = _bools(opened_df["leak"])
    open_pids = [int(p) for p in opened_df["pid"].fillna(-1)]

    limits = _int_map(extra.get("rlimit_nofile"))
    fd_count = extra.get("fd_count")
    fd_count = fd_count if isinstance(fd_count, Mapping) else {}
    fds_start, fds_end = _int_map(fd_count.get("start")), _int_map(fd_count.get("end"))
    open_by_pid: Counter[int] = Counter(open_pids)

    timeline = report.timeline
    times, growth_known = sample_times(report)
    # Without the sample times of a sparse timeline: no growth rather than a wrong one.
    growing = timeline if growth_known else timeline.iloc[:0]
    site_growth = _growth_by(_pivot(growing, "call_site", times))
    pid_growth = _growth_by(_pivot(growing, "pid", times))
    has_growth = any(g is not None for g in site_growth.values())
    site_pid_growth: dict[tuple[str, int], float | None] = {}
    if not growing.empty:
        # One pivot column per (pid, call site): "pid\0site" keeps it a plain string.
        pairs = growing.assign(
            pair=[f"{p}\0{s}" for p, s in zip(growing["pid"], growing["call_site"], strict=True)]
        )
        for pair, growth in _growth_by(_pivot(pairs, "pair", times)).items():
            pid_text, call_site = str(pair).split("\0", 1)
            site_pid_growth[(call_site, int(pid_text))] = growth

    # Per site accumulators: connections first (history), then open sockets (the end state).
    seen_comms: dict[int, str] = {}
    per_site: dict[str, _Acc] = {}
    born = conns["opened_at"].notna().to_numpy(dtype=bool)
    closed = conns["closed_at"].notna().to_numpy(dtype=bool)
    conn_pids = [int(p) for p in conns["pid"].fillna(-1)]
    for i, (key, comm) in enumerate(zip(conn_keys, conns["comm"].astype(str), strict=True)):
        acc = per_site.setdefault(key, _Acc())
        acc.pids.add(conn_pids[i])
        acc.comms.add(comm)
        seen_comms.setdefault(conn_pids[i], comm)
        if born[i]:
            acc.opened += 1
        else:
            acc.preexisting += 1
        acc.closed += int(closed[i])
    for i, (key, comm) in enumerate(zip(open_keys, opened_df["comm"].astype(str), strict=True)):
        acc = per_site.setdefault(key, _Acc())
        acc.pids.add(open_pids[i])
        acc.comms.add(comm)
        seen_comms[open_pids[i]] = comm
        acc.open_rows.append(i)
    if not timeline.empty:
        for pid, comm, key in zip(
            timeline["pid"], timeline["comm"].astype(str), timeline["call_site"], strict=True
        ):
            acc = per_site.setdefault(str(key), _Acc())
            acc.pids.add(int(pid))
            acc.comms.add(comm)
            seen_comms.setdefault(int(pid), comm)

    ages = opened_df["age_s"].to_numpy(dtype=float, na_value=np.nan)
    lower = _bools(opened_df["age_is_lower_bound"])
    classes = opened_df["leak_class"].astype(object).to_numpy()
    states = opened_df["state"].astype(object).to_numpy()

    sites: list[SiteStats] = []
    for key, acc in per_site.items():
        rows = acc.open_rows
        flagged_rows = [i for i in rows if flagged_mask[i]]
        oldest_age: float | None = None
        oldest_lower = False
        valid = [i for i in rows if not math.isnan(ages[i])]
        if valid:
            oldest = max(valid, key=lambda i: ages[i])
            oldest_age, oldest_lower = float(ages[oldest]), bool(lower[oldest])
        estimates = [
            _estimate(pid, site_pid_growth.get((key, pid)), limits, fds_end, open_by_pid)
            for pid in sorted(acc.pids)
        ]
        usable = [e for e in estimates if e is not None]
        frames = frames_of(key)
        sites.append(
            SiteStats(
                key=key,
                label=site_label(key, frames),
                frames=frames,
                pids=tuple(sorted(acc.pids)),
                comms=tuple(sorted(acc.comms)),
                opened=acc.opened,
                preexisting=acc.preexisting,
                closed=acc.closed,
                still_open=len(rows),
                flagged=len(flagged_rows),
                oldest_age_s=oldest_age,
                oldest_is_lower_bound=oldest_lower,
                leak_classes=dict(Counter(str(classes[i]) for i in flagged_rows).most_common()),
                states=dict(Counter(str(states[i]) for i in rows).most_common()),
                # A site absent from a usable timeline never had a socket open at a sample.
                growth_per_min=site_growth.get(key, 0.0 if has_growth else None),
                rlimit=min(usable, key=lambda e: e.seconds_left) if usable else None,
            )
        )
    sites.sort(key=lambda s: (-s.flagged, -s.still_open, -(s.growth_per_min or 0.0), s.key))

    pids = sorted(
        {int(p) for p in meta.get("pids", []) if isinstance(p, int)}
        | set(open_by_pid)
        | set(seen_comms)
        | {int(p) for p in pid_growth}
    )
    flagged_by_pid = Counter(open_pids[i] for i in range(len(open_pids)) if flagged_mask[i])
    processes = tuple(
        ProcessStats(
            pid=pid,
            comm=seen_comms.get(pid, ""),
            rlimit_nofile=limits.get(pid),
            fds_start=fds_start.get(pid),
            fds_end=fds_end.get(pid),
            still_open=open_by_pid.get(pid, 0),
            flagged=flagged_by_pid.get(pid, 0),
            growth_per_min=pid_growth.get(pid),
            rlimit=_estimate(pid, pid_growth.get(pid), limits, fds_end, open_by_pid),
        )
        for pid in pids
        if pid >= 0
    )

    leaked = opened_df[flagged_mask]
    endpoints: Counter[str] = Counter()
    ports: Counter[str] = Counter()
    for fam, addr, rport, lport, direction in zip(
        leaked["family"],
        leaked["raddr"],
        leaked["rport"],
        leaked["lport"],
        leaked["direction"],
        strict=True,
    ):
        accepted, connected = direction == "accept", direction == "connect"
        endpoints[_endpoint(str(fam), str(addr), "*" if accepted else _port(rport))] += 1
        ports["*" if connected else _port(lport)] += 1
    untracked = int(_bools(opened_df["untracked"]).sum())

    return Analysis(
        directory=str(report.directory),
        meta=meta,
        threshold_s=report.threshold_s,
        started_at=_number(meta.get("started_at")),
        ended_at=_number(meta.get("ended_at")),
        sites=tuple(sites),
        processes=processes,
        remote_endpoints=tuple(sorted(endpoints.items(), key=lambda kv: (-kv[1], kv[0]))),
        local_ports=tuple(sorted(ports.items(), key=lambda kv: (-kv[1], kv[0]))),
        losses=report.losses,
        timeline_samples=(
            len(times)
            if times is not None
            else int(timeline["t"].nunique())
            if not timeline.empty
            else 0
        ),
        untracked_open=untracked,
    )


def _port(value: object) -> str:
    return "?" if value is None or value is pd.NA else str(value)


def _endpoint(family: str, addr: str, port: str) -> str:
    if not addr:
        return "(unknown)"
    shown = f"[{addr}]" if family == "ipv6" or ":" in addr else addr
    return f"{shown}:{port}"


def sites_frame(analysis: Analysis) -> pd.DataFrame:
    """The call sites as a DataFrame, worst first (for notebooks)."""
    return pd.DataFrame(
        {
            "site": [s.label for s in analysis.sites],
            "pids": [",".join(map(str, s.pids)) for s in analysis.sites],
            "opened": [s.opened for s in analysis.sites],
            "preexisting": [s.preexisting for s in analysis.sites],
            "closed": [s.closed for s in analysis.sites],
            "still_open": [s.still_open for s in analysis.sites],
            "flagged": [s.flagged for s in analysis.sites],
            "oldest_age_s": [s.oldest_age_s for s in analysis.sites],
            "growth_per_min": [s.growth_per_min for s in analysis.sites],
            "seconds_to_rlimit": [
                s.rlimit.seconds_left if s.rlimit else None for s in analysis.sites
            ],
            "leak_classes": [
                " ".join(f"{k}={v}" for k, v in s.leak_classes.items()) for s in analysis.sites
            ],
            "key": [s.key for s in analysis.sites],
        }
    ).astype(
        {
            "opened": "Int64",
            "preexisting": "Int64",
            "closed": "Int64",
            "still_open": "Int64",
            "flagged": "Int64",
            "oldest_age_s": "Float64",
            "growth_per_min": "Float64",
            "seconds_to_rlimit": "Float64",
        }
    )
