"""The connection history at full churn: death records in bulk, streamed to disk.

A busy service opens tens of thousands of connections a second; each reaches
user space once, as a death record. Decoding those one by one into Python
objects costs more than the service can spare, and keeping them in memory for
a long trace is not possible, so this module:
- decodes ring-buffer bytes in bulk with numpy (`RECORD_DTYPE` mirrors
  `RawSocketRecord`, pinned by tests/unit/test_layout.py),
- turns a batch of death records into report rows column by column,
- appends them to `connections` part files (Parquet row groups, CSV lines) in
  the report directory as it goes, so memory stays flat; `finish()` renames
  the parts into place (each file whole or absent).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tcptrace.events import RECORD_DTYPE, Direction, RecordFlag, RecordKind, TcpState
from tcptrace.report.schema import CONNECTIONS, dtypes
from tcptrace.sockets import StackStatus

_STATE_NAMES = np.array(
    [TcpState(i).name if i in TcpState._value2member_map_ else "" for i in range(16)], dtype=object
)
_DIRECTION_NAMES = np.array(
    ["", *(Direction.from_kernel(i).value for i in (1, 2, 3, 4)), "", "", ""], dtype=object
)


def split_records(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(death records, every other record) of concatenated raw records."""
    if len(raw) % RECORD_DTYPE.itemsize:
        raise ValueError(f"{len(raw)} bytes is not a whole number of records")
    arr = np.frombuffer(raw, dtype=RECORD_DTYPE)
    is_death = arr["kind"] == RecordKind.DEATH
    return arr[is_death], arr[~is_death]


def _codes(column: np.ndarray) -> np.ndarray:
    """Dense integer codes of a column (equal values, equal codes), by hashing."""
    if column.dtype.kind in "iub":
        return pd.factorize(column)[0]
    # Fixed-size bytes (addresses, names): hash them as 8-byte words.
    width = column.dtype.itemsize
    words = np.ascontiguousarray(column).view(np.uint8).reshape(len(column), width)
    if width % 8:
        words = np.pad(words, ((0, 0), (0, 8 - width % 8)))
    return _combine([pd.factorize(w)[0] for w in words.view(np.uint64).T])


def _combine(codes: list[np.ndarray]) -> np.ndarray:
    combined = codes[0]
    for more in codes[1:]:
        # Re-densify after each step so the product never overflows.
        combined = pd.factorize(combined * (int(more.max(initial=0)) + 1) + more)[0]
    return combined


def _distinct(columns: list[np.ndarray]) -> tuple[list[tuple[Any, ...]], np.ndarray]:
    """The distinct rows of side-by-side columns, and each row's index among them.

    Deaths repeat a handful of addresses, names and call sites thousands of
    times: format each distinct value once (in Python), spread it in C.
    """
    n = len(columns[0])
    if n == 0:
        return [], np.zeros(0, dtype=np.intp)
    inverse = _combine([_codes(c) for c in columns])
    first = np.empty(int(inverse.max()) + 1, dtype=np.intp)
    first[inverse[::-1]] = np.arange(n - 1, -1, -1)  # first row of each code
    rows = list(zip(*(c[first].tolist() for c in columns), strict=True))
    return rows, inverse


def _spread(values: list[object], inverse: np.ndarray) -> np.ndarray:
    table = np.empty(len(values), dtype=object)
    table[:] = values
    spread: np.ndarray = table[inverse]
    return spread


def _format_address(family: int, raw: bytes) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 10:
        return str(ipaddress.IPv6Address(raw[:16]))
    return ""


def _addresses(family: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Text addresses, each distinct (family, bytes) formatted once."""
    keys = np.ascontiguousarray(raw).view(f"S{raw.shape[1]}").ravel()
    distinct, inverse = _distinct([family, keys])
    # numpy's S dtype drops trailing NULs: pad back to 16 bytes.
    texts: list[object] = [_format_address(int(f), bytes(b).ljust(16, b"\0")) for f, b in distinct]
    return _spread(texts, inverse)


StackLookup = Callable[[int, int, int], tuple[tuple[str, ...], StackStatus]]


def death_rows(
    deaths: np.ndarray,
    to_epoch: Callable[[np.ndarray], np.ndarray],
    stacks: StackLookup,
    exited: Mapping[int, int],
    closed_fds: Callable[[int, int, int, int], bool] | None = None,
) -> pd.DataFrame:
    """`connections` rows, in schema order and dtypes, for death records of sockets
    the ledger never held open (born and gone between two scans)."""
    tgid = deaths["tgid"].astype(np.int64)
    family = deaths["family"].astype(np.int64)
    flags = deaths["flags"].astype(np.int64)
    fd = deaths["fd"].astype(np.int64)
    fd_closed = (flags & RecordFlag.FD_CLOSED) != 0
    if closed_fds is not None:
        # close_range() closes fds the kernel side did not mark one by one.
        for i in np.flatnonzero(~fd_closed).tolist():
            fd_closed[i] = closed_fds(
                int(tgid[i]), int(fd[i]), int(deaths["birth_ns"][i]), int(deaths["ts_ns"][i])
            )
    ts = deaths["ts_ns"].astype(np.int64)
    exit_ns = np.array([exited.get(int(p), -1) for p in tgid.tolist()], dtype=np.int64)
    by_exit = ~fd_closed & (exit_ns >= 0) & (ts >= exit_ns)
    cause = np.where(fd_closed, "app", np.where(by_exit, "exit", "kernel")).astype(object)

    sites, site_of = _distinct([tgid, deaths["user_stack_id"], deaths["kernel_stack_id"]])
    resolved = [stacks(int(t), int(u), int(k)) for t, u, k in sites]
    stack_col = _spread([";".join(frames) for frames, _ in resolved], site_of)
    status_col = _spread([status.value for _, status in resolved], site_of)

    opened = to_epoch(deaths["birth_ns"])
    closed = to_epoch(deaths["ts_ns"])
    names, name_of = _distinct([np.ascontiguousarray(deaths["comm"]).view("V16").ravel()])
    # A C string: up to the first NUL, whatever follows it.
    comm = _spread(
        [bytes(b).split(b"\0", 1)[0].decode("utf-8", "replace") for (b,) in names], name_of
    )
    columns: dict[str, Any] = {
        "pid": tgid,
        "tid": deaths["tid"].astype(np.int64),
        "comm": comm,
        "fd": pd.array(np.where(fd >= 0, fd, 0), dtype="Int64"),
        "family": np.where(family == 2, "ipv4", np.where(family == 10, "ipv6", "")).astype(object),
        "laddr": _addresses(family, deaths["laddr"]),
        "lport": deaths["lport"].astype(np.int64),
        "raddr": _addresses(family, deaths["raddr"]),
        "rport": deaths["rport"].astype(np.int64),
        "direction": _DIRECTION_NAMES[np.minimum(deaths["direction"], 7)],
        "opened_at": pd.to_datetime(opened, unit="s", utc=True).round("us"),
        "first_seen": pd.to_datetime(opened, unit="s", utc=True).round("us"),
        "closed_at": pd.to_datetime(closed, unit="s", utc=True).round("us"),
        "duration_s": np.maximum(closed - opened, 0.0),
        "final_state": _STATE_NAMES[np.minimum(deaths["state"], 15)],
        "fd_closed_by_app": fd_closed | by_exit,
        "close_cause": cause,
        "untracked": (flags & RecordFlag.UNTRACKED) != 0,
        "stack": stack_col,
        "stack_status": status_col,
        "bytes_sent": deaths["bytes_acked"].astype(np.int64),
        "bytes_received": deaths["bytes_received"].astype(np.int64),
    }
    frame = pd.DataFrame(columns)
    fd_na = fd < 0
    if fd_na.any():
        frame.loc[fd_na, "fd"] = pd.NA
    return frame.astype(dtypes("connections"))[[c.name for c in CONNECTIONS]]


def csv_bytes(frame: pd.DataFrame, header: bool) -> bytes:
    """CSV text of `frame`, as report.writers.CsvWriter writes it, at C speed.

    pandas' to_csv cost ~3 us a row: at 40k deaths/s the trace loop stalled in it
    and the ring buffer overflowed. Timestamps and booleans are formatted here
    the way CsvWriter does (ISO-8601 UTC with microseconds and Z; True/False),
    then pyarrow writes the text.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    columns: dict[str, pa.Array] = {}
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            values = col.dt.tz_convert(None).to_numpy(dtype="datetime64[us]")
            text = np.datetime_as_string(values, unit="us", timezone="UTC")  # ...Z
            columns[name] = pa.array(text, type=pa.string(), mask=np.isnat(values))
        elif str(col.dtype) == "boolean":
            text = np.where(col.fillna(False).to_numpy(dtype=bool), "True", "False").astype(object)
            text[col.isna().to_numpy()] = None
            columns[name] = pa.array(text, type=pa.string())
        else:
            columns[name] = pa.array(col, from_pandas=True)
    sink = pa.BufferOutputStream()
    options = pacsv.WriteOptions(include_header=header, quoting_style="needed")
    pacsv.write_csv(pa.table(columns), sink, options)
    data: bytes = sink.getvalue().to_pybytes()
    return data


class ConnectionHistory:
    """`connections` rows appended as they come, written in parts, renamed at the end.

    Rows are buffered up to `flush_rows`, then appended to `connections.csv.part`
    and as a row group to `connections.parquet.part` by one writer thread:
    pyarrow releases the GIL while it encodes and writes, so the trace loop
    keeps draining the ring buffer meanwhile. Memory stays bounded by the
    buffer (and at most two batches in flight) whatever the length of the trace.
    """

    def __init__(self, directory: Path, flush_rows: int = 20_000) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.directory = directory
        self.flush_rows = flush_rows
        self.rows = 0
        self._pending: list[pd.DataFrame] = []
        self._pending_rows = 0
        self._csv_part = directory / "connections.csv.part"
        self._parquet_part = directory / "connections.parquet.part"
        self._parquet_writer: Any = None
        self._schema: Any = None
        self._csv_started = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tcptrace-history")
        self._in_flight: Future[None] | None = None
        for part in (self._csv_part, self._parquet_part):
            part.unlink(missing_ok=True)

    def append(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        self._pending.append(frame)
        self._pending_rows += len(frame)
        self.rows += len(frame)
        if self._pending_rows >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (waits for the previous batch)."""
        if not self._pending:
            return
        frame = pd.concat(self._pending, ignore_index=True)
        self._pending, self._pending_rows = [], 0
        self._wait()  # one batch in flight: bounded memory, ordered parts
        self._in_flight = self._writer.submit(self._write, frame)

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # re-raises a write error (e.g. ENOSPC) here

    def _write(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from tcptrace.report.schema import SCHEMA_VERSION
        from tcptrace.report.writers import PARQUET_TABLE_KEY, PARQUET_VERSION_KEY

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet_writer is None:
            metadata = dict(table.schema.metadata or {})
            metadata[PARQUET_VERSION_KEY] = str(SCHEMA_VERSION).encode()
            metadata[PARQUET_TABLE_KEY] = b"connections"
            self._schema = table.schema.with_metadata(metadata)
            self._parquet_part.touch(mode=0o600)
            self._parquet_writer = pq.ParquetWriter(self._parquet_part, self._schema)
        self._parquet_writer.write_table(table.cast(self._schema))
        if not self._csv_started:
            self._csv_part.touch(mode=0o600)
        with open(self._csv_part, "ab") as fh:
            fh.write(csv_bytes(frame, header=not self._csv_started))
        self._csv_started = True

    def finish(self, last: pd.DataFrame) -> list[Path]:
        """Append the final rows (sockets still open), close the parts, rename them."""
        from tcptrace.fileio import _give_to_invoking_user

        self.append(last)
        self.flush()
        try:
            self._wait()
        finally:
            self._writer.shutdown(wait=True)
        if self._parquet_writer is None:
            return []
        self._parquet_writer.close()
        done = []
        for part in (self._csv_part, self._parquet_part):
            final = part.with_suffix("")
            _give_to_invoking_user(part)
            os.replace(part, final)
            done.append(final)
        return done
