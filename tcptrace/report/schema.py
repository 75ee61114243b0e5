"""The report schema, declared once: tables, their columns in order, and their dtypes.

Every writer builds its frame with `to_frame` and every reader passes what it
read through `conform`, so a column's name, position and dtype live only here.

Conventions:
- string columns never hold NA: an absent value is "" (CSV cannot tell them apart);
- timestamps are UTC, rounded to the microsecond (epoch floats carry no more);
- an unknown fd is NA, not -1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd
from pandas.api.types import pandas_dtype

from tcptrace.sockets import Connection, classify, is_leak

# 2: the timeline table is sparse (issue 7; version 1 wrote a dense grid). Readers
# take both: a dense timeline read the sparse way gives the same counts.
SCHEMA_VERSION: Final = 2
READABLE_SCHEMA_VERSIONS: Final = (1, 2)

INT: Final = "Int64"
FLOAT: Final = "Float64"
BOOL: Final = "boolean"
STRING: Final = "string"
TIMESTAMP: Final = "datetime64[ns, UTC]"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    dtype: str  # a pandas dtype string, always a nullable one
    description: str


def _socket_columns() -> tuple[Column, ...]:
    return (
        Column("pid", INT, "process id (tgid) that opened the socket"),
        Column("tid", INT, "thread id that opened it"),
        Column("comm", STRING, "process name (kernel comm, at most 15 characters)"),
        Column("fd", INT, "file descriptor; NA when unknown"),
        Column("family", STRING, "ipv4 or ipv6"),
        Column("laddr", STRING, "local address"),
        Column("lport", INT, "local port"),
        Column("raddr", STRING, "remote address"),
        Column("rport", INT, "remote port"),
    )


_STACK_COLUMNS = (
    Column("stack", STRING, "frames joined by ';', outermost caller first"),
    Column("stack_status", STRING, "ok | unknown (predates tracing) | failed | unsymbolized"),
)
_BYTES_COLUMNS = (
    Column("bytes_sent", INT, "bytes acknowledged by the peer; NA when unknown"),
    Column("bytes_received", INT, "bytes received; NA when unknown"),
)

OPEN_SOCKETS: Final[tuple[Column, ...]] = (
    *_socket_columns(),
    Column("state", STRING, "TCP state at the end of the run, e.g. CLOSE_WAIT"),
    Column("direction", STRING, "connect | accept | listen | preexisting"),
    Column("opened_at", TIMESTAMP, "when it was opened; NaT if it predates tracing"),
    Column("first_seen", TIMESTAMP, "when tcptrace first saw it"),
    Column("age_s", FLOAT, "seconds open at the end of the run"),
    Column(
        "age_is_lower_bound", BOOL, "true when opened_at is unknown: age counts from first_seen"
    ),
    Column("leak", BOOL, "flagged: open at least threshold_s and not a listener"),
    Column("leak_class", STRING, "close_wait | established | fd_on_closed_socket | orphan | ..."),
    Column("untracked", BOOL, "the kernel ledger was full at its birth: shown, never flagged"),
    *_STACK_COLUMNS,
    *_BYTES_COLUMNS,
)

CONNECTIONS: Final[tuple[Column, ...]] = (
    *_socket_columns(),
    Column("direction", STRING, "connect | accept | listen | preexisting"),
    Column("opened_at", TIMESTAMP, "when it was opened; NaT if it predates tracing"),
    Column("first_seen", TIMESTAMP, "when tcptrace first saw it"),
    Column("closed_at", TIMESTAMP, "when the socket was destroyed; NaT if still open"),
    Column(
        "duration_s",
        FLOAT,
        "seconds from opened_at (or first_seen) to closed_at, or to the end of the run if open",
    ),
    Column("final_state", STRING, "last TCP state seen"),
    Column("fd_closed_by_app", BOOL, "the process closed its fd (or exited)"),
    Column("close_cause", STRING, "app | exit | kernel; empty while still open"),
    Column("untracked", BOOL, "the kernel ledger was full at its birth: its close may be unseen"),
    *_STACK_COLUMNS,
    *_BYTES_COLUMNS,
)

TIMELINE: Final[tuple[Column, ...]] = (
    Column("t", TIMESTAMP, "sample time"),
    Column("pid", INT, "process id (tgid)"),
    Column("comm", STRING, "process name at the last sample that saw this call site"),
    Column(
        "call_site",
        STRING,
        "folded stack that opened the sockets (as in the `stack` column), or a placeholder:"
        " [preexisting: stack unknown], [stack not captured], [empty stack]",
    ),
    Column("open_count", INT, "sockets of this pid from this call site open at t (listeners too)"),
    Column("flagged_count", INT, "of those, flagged as leaks at t (same rule as `leak`)"),
    Column("oldest_age_s", FLOAT, "age of the oldest of them at t; NA when open_count is 0"),
)

TABLES: Final[Mapping[str, tuple[Column, ...]]] = {
    "open_sockets": OPEN_SOCKETS,
    "connections": CONNECTIONS,
    "timeline": TIMELINE,
}

# What each table is, for docs/report-format.md (generated from this module).
TABLE_DESCRIPTIONS: Final[Mapping[str, str]] = {
    "open_sockets": (
        "One row per socket still open when the report was written (at `report_time`),"
        " whether or not it is flagged as a leak."
    ),
    "connections": (
        "One row per socket seen during the run, open or closed: the full history,"
        " for open/close counts per call site."
    ),
    "timeline": (
        "Open sockets per process and call site, sampled at a fixed interval while tracing"
        " (`extra.sample_interval_s`) plus a final sample at stop. Sparse: a (pid, call_site)"
        " pair has a row at each sample where it has sockets open, and one row with"
        " open_count 0 at the sample after its last one closed; a pair absent at a sample"
        " had none open. Every sample time is listed in `extra.timeline_sample_times`"
        " (a sample where nothing was open has no row). Long runs are thinned to at most"
        " `extra.timeline_max_samples` samples by dropping every other one, keeping the last."
        " (Version 1 reports hold a dense grid instead: every pair at every sample, 0 when"
        " none were open; read the same way, it gives the same counts.)"
    ),
}


@dataclass(frozen=True, slots=True)
class MetaField:
    name: str
    type: str  # JSON type as written
    description: str


# meta.json: written last, so its presence marks a complete report. Declared here so the
# format documentation is generated from one place (a unit test checks RunMeta matches).
META_FIELDS: Final[tuple[MetaField, ...]] = (
    MetaField("tool_version", "string", "tcptrace version that wrote the report"),
    MetaField("schema_version", "integer", "version of this format; readers refuse others"),
    MetaField("host", "string", "host name of the traced machine"),
    MetaField("kernel", "string", "kernel release (uname -r)"),
    MetaField("probe_set", "string", "probe set used: tracepoint or kprobe"),
    MetaField("pids", "array of integers", "the traced process ids"),
    MetaField("threshold_s", "number", "leak threshold in seconds"),
    MetaField("started_at", "number", "start of the run, epoch seconds"),
    MetaField("ended_at", "number", "end of the run, epoch seconds"),
    MetaField(
        "losses",
        "object",
        "every loss/anomaly counter of every layer (kernel, ledger, stacks); zeros included",
    ),
    MetaField("extra", "object", "run details; the keys below are the ones analysis uses"),
    MetaField(
        "extra.rlimit_nofile",
        "object",
        'soft RLIMIT_NOFILE per pid ("pid" -> integer, null when unlimited or unknown)',
    ),
    MetaField(
        "extra.fd_count",
        "object",
        '{"start": {pid: n}, "end": {pid: n}}: entries in /proc/PID/fd at start and end'
        " (null when unreadable, e.g. the process had exited)",
    ),
    MetaField("extra.sample_interval_s", "number", "timeline sampling interval in seconds"),
    MetaField("extra.timeline_max_samples", "integer", "cap on timeline samples (see `timeline`)"),
    MetaField(
        "extra.timeline_sample_times",
        "array of numbers",
        "epoch seconds of every timeline sample kept, rows or not (since version 2)",
    ),
    MetaField("report_time", "number", "the `now` that ages and leak flags were computed at"),
    MetaField("files", "array of strings", "table files written, in order"),
    MetaField("tables", "object", 'rows per table: {"open_sockets": {"rows": n}, ...}'),
)


def columns(table: str) -> tuple[Column, ...]:
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown report table {table!r}") from None


def dtypes(table: str) -> dict[str, str]:
    return {c.name: c.dtype for c in columns(table)}


# -- building frames ---------------------------------------------------------------------------


def to_frame(table: str, rows: Sequence[Mapping[str, object]]) -> pd.DataFrame:
    """DataFrame of `rows` with exactly the declared columns, in order, with declared dtypes.

    Row values are plain Python: int/float/bool/str/None, and epoch seconds
    (float) or pandas Timestamps for timestamps. A row with a missing or extra
    key is a programming error (ValueError).
    """
    cols = columns(table)
    names = [c.name for c in cols]
    wanted = set(names)
    for index, row in enumerate(rows):
        if row.keys() != wanted:
            missing = sorted(wanted - row.keys())
            extra = sorted(row.keys() - wanted)
            raise ValueError(f"{table} row {index}: missing {missing}, unexpected {extra}")
    data = {c.name: coerce_values(c, [row[c.name] for row in rows]) for c in cols}
    return pd.DataFrame(data, columns=names)


def conform(table: str, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` restricted to the declared columns, in order, with declared dtypes.

    Raises KeyError naming the first missing column; a value that cannot take its
    column's dtype raises ValueError or TypeError (readers turn both into ReportError).
    """
    cols = columns(table)
    for c in cols:
        if c.name not in frame.columns:
            raise KeyError(c.name)
    data = {c.name: coerce_values(c, frame[c.name]) for c in cols}
    return pd.DataFrame(data, columns=[c.name for c in cols])


def coerce_values(column: Column, values: Sequence[Any] | pd.Series) -> pd.Series:
    """One column's values as a Series of its declared dtype (the single place dtypes are set)."""
    if column.dtype == TIMESTAMP:
        return _timestamps(values)
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    series = series.reset_index(drop=True)
    if column.dtype == STRING:
        return series.astype(STRING).fillna("")
    return series.astype(pandas_dtype(column.dtype))


def _epoch_floats(values: list[Any]) -> np.ndarray | None:
    """Epoch seconds (floats, ints, None) as a float array in one C pass, or None
    when the values are anything else. The per-value checks below cost ~1 s per
    100k rows; rows from the ledger are always this simple (issue 6)."""
    if any(isinstance(v, bool | str) for v in values[:1]):
        return None
    try:
        epoch = np.array(values, dtype=float)
    except (TypeError, ValueError):
        return None
    if epoch.ndim != 1 or any(isinstance(v, bool | str) for v in values):
        return None
    return epoch


def _timestamps(values: Sequence[Any] | pd.Series) -> pd.Series:
    if isinstance(values, list) and (epoch := _epoch_floats(values)) is not None:
        converted = pd.Series(pd.to_datetime(epoch, unit="s", utc=True))
        return converted.dt.round("us").astype(TIMESTAMP)
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    series = series.reset_index(drop=True)
    if isinstance(series.dtype, pd.DatetimeTZDtype) or series.dtype.kind == "M":
        converted = pd.to_datetime(series, utc=True)
    elif series.dtype.kind in "fiu" or all(_is_number_or_na(v) for v in series):
        epoch = np.array([np.nan if _is_na(v) else float(v) for v in series], dtype=float)
        converted = pd.Series(pd.to_datetime(epoch, unit="s", utc=True))
    else:
        converted = pd.to_datetime(series, utc=True, format="ISO8601")
    # Epoch floats are exact to ~0.2us; rounding makes CSV (microseconds) and Parquet agree.
    return converted.dt.round("us").astype(TIMESTAMP)


def _is_na(value: object) -> bool:
    return (
        value is None
        or value is pd.NA
        or value is pd.NaT
        or (isinstance(value, float) and np.isnan(value))
    )


def _is_number_or_na(value: object) -> bool:
    return _is_na(value) or (isinstance(value, int | float) and not isinstance(value, bool))


# -- rows from the ledger ----------------------------------------------------------------------


def _common(conn: Connection) -> dict[str, object]:
    return {
        "pid": conn.pid,
        "tid": conn.tid,
        "comm": conn.comm,
        "fd": conn.fd if conn.fd >= 0 else None,
        "family": conn.family,
        "laddr": conn.laddr,
        "lport": conn.lport,
        "raddr": conn.raddr,
        "rport": conn.rport,
        "direction": conn.direction.value,
        "opened_at": conn.opened_at,
        "first_seen": conn.first_seen,
        "stack": conn.folded_stack,
        "stack_status": conn.stack_status.value,
        "bytes_sent": conn.bytes_sent,
        "bytes_received": conn.bytes_received,
        "untracked": conn.untracked,
    }


def open_socket_row(conn: Connection, now: float, threshold_s: float) -> dict[str, object]:
    return {
        **_common(conn),
        "state": conn.state.name,
        "age_s": conn.age_s(now),
        "age_is_lower_bound": conn.opened_at is None,
        "leak": is_leak(conn, now, threshold_s),
        "leak_class": classify(conn).value,
    }


def connection_row(conn: Connection, now: float) -> dict[str, object]:
    return {
        **_common(conn),
        "closed_at": conn.closed_at,
        "duration_s": conn.age_s(now),
        "final_state": conn.state.name,
        "fd_closed_by_app": conn.fd_closed,
        "close_cause": conn.close_cause.value,
    }


def frame_from_columns(table: str, data: dict[str, list[Any]]) -> pd.DataFrame:
    """Like to_frame, from columns instead of rows: no dict per row, so 100k
    sockets cost one list per column (issue 6: peak memory and time at report)."""
    names = [c.name for c in columns(table)]
    if data.keys() != set(names):
        raise ValueError(f"{table}: columns {sorted(data)} are not {sorted(names)}")
    out = {}
    for c in columns(table):
        out[c.name] = coerce_values(c, data.pop(c.name))  # free each list once converted
    return pd.DataFrame(out, columns=names)


def _common_columns(conns: Sequence[Connection]) -> dict[str, list[Any]]:
    folded: dict[tuple[str, ...], str] = {}  # one string per call site, not per socket
    return {
        "pid": [c.pid for c in conns],
        "tid": [c.tid for c in conns],
        "comm": [c.comm for c in conns],
        "fd": [c.fd if c.fd >= 0 else None for c in conns],
        "family": [c.family for c in conns],
        "laddr": [c.laddr for c in conns],
        "lport": [c.lport for c in conns],
        "raddr": [c.raddr for c in conns],
        "rport": [c.rport for c in conns],
        "direction": [c.direction.value for c in conns],
        "opened_at": [c.opened_at for c in conns],
        "first_seen": [c.first_seen for c in conns],
        "stack": [folded.get(c.stack) or folded.setdefault(c.stack, c.folded_stack) for c in conns],
        "stack_status": [c.stack_status.value for c in conns],
        "bytes_sent": [c.bytes_sent for c in conns],
        "bytes_received": [c.bytes_received for c in conns],
        "untracked": [c.untracked for c in conns],
    }


def open_sockets_frame(
    connections: Iterable[Connection], now: float, threshold_s: float
) -> pd.DataFrame:
    conns = [c for c in connections if c.is_open]
    data = _common_columns(conns)
    data["state"] = [c.state.name for c in conns]
    data["age_s"] = [c.age_s(now) for c in conns]
    data["age_is_lower_bound"] = [c.opened_at is None for c in conns]
    data["leak"] = [is_leak(c, now, threshold_s) for c in conns]
    data["leak_class"] = [classify(c).value for c in conns]
    return frame_from_columns("open_sockets", data)


def connections_frame(connections: Iterable[Connection], now: float) -> pd.DataFrame:
    conns = list(connections)
    data = _common_columns(conns)
    data["closed_at"] = [c.closed_at for c in conns]
    data["duration_s"] = [c.age_s(now) for c in conns]
    data["final_state"] = [c.state.name for c in conns]
    data["fd_closed_by_app"] = [c.fd_closed for c in conns]
    data["close_cause"] = [c.close_cause.value for c in conns]
    return frame_from_columns("connections", data)
