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


def _addresses(family: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Text addresses, formatting each distinct (family, bytes) once."""
    keys = np.ascontiguousarray(raw).view(f"V{raw.shape[1]}").ravel()
    out = np.empty(len(keys), dtype=object)
    cache: dict[tuple[int, bytes], str] = {}
    for i, (fam, key) in enumerate(zip(family.tolist(), keys.tolist(), strict=True)):
        k = (fam, key)
        text = cache.get(k)
        if text is None:
            if fam == 2:
                text = str(ipaddress.IPv4Address(key[:4]))
            elif fam == 10:
                text = str(ipaddress.IPv6Address(key))
            else:
                text = ""
            cache[k] = text
        out[i] = text
    return out


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
    n = len(deaths)
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

    sites: dict[tuple[int, int, int], tuple[str, str]] = {}
    stack_col = np.empty(n, dtype=object)
    status_col = np.empty(n, dtype=object)
    keys = zip(
        tgid.tolist(),
        deaths["user_stack_id"].tolist(),
        deaths["kernel_stack_id"].tolist(),
        strict=True,
    )
    for i, key in enumerate(keys):
        site = sites.get(key)
        if site is None:
            frames, status = stacks(*key)
            site = (";".join(frames), status.value)
            sites[key] = site
        stack_col[i], status_col[i] = site

    opened = to_epoch(deaths["birth_ns"])
    closed = to_epoch(deaths["ts_ns"])
    comm_bytes = np.ascontiguousarray(deaths["comm"]).view("S16").ravel().tolist()
    names: dict[bytes, str] = {}
    comm = np.empty(n, dtype=object)
    for i, b in enumerate(comm_bytes):
        name = names.get(b)
        if name is None:
            # A C string: up to the first NUL, whatever follows it.
            name = names[b] = b.split(b"\0", 1)[0].decode("utf-8", "replace")
        comm[i] = name
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


class ConnectionHistory:
    """`connections` rows appended as they come, written in parts, renamed at the end.

    Rows are buffered up to `flush_rows`, then appended to `connections.csv.part`
    and as a row group to `connections.parquet.part`. Memory stays bounded by
    the buffer whatever the length of the trace.
    """

    def __init__(self, directory: Path, flush_rows: int = 200_000) -> None:
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
        if not self._pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        from tcptrace.report.schema import SCHEMA_VERSION
        from tcptrace.report.writers import (
            CSV_DATE_FORMAT,
            PARQUET_TABLE_KEY,
            PARQUET_VERSION_KEY,
        )

        frame = pd.concat(self._pending, ignore_index=True)
        self._pending, self._pending_rows = [], 0
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet_writer is None:
            metadata = dict(table.schema.metadata or {})
            metadata[PARQUET_VERSION_KEY] = str(SCHEMA_VERSION).encode()
            metadata[PARQUET_TABLE_KEY] = b"connections"
            self._schema = table.schema.with_metadata(metadata)
            self._parquet_part.touch(mode=0o600)
            self._parquet_writer = pq.ParquetWriter(self._parquet_part, self._schema)
        self._parquet_writer.write_table(table.cast(self._schema))
        # Same text as report.writers.CsvWriter, header only once.
        text = frame.to_csv(
            index=False,
            header=not self._csv_started,
            date_format=CSV_DATE_FORMAT,
            lineterminator="\n",
        )
        if not self._csv_started:
            self._csv_part.touch(mode=0o600)
        with open(self._csv_part, "a", encoding="utf-8") as fh:
            fh.write(text)
        self._csv_started = True

    def finish(self, last: pd.DataFrame) -> list[Path]:
        """Append the final rows (sockets still open), close the parts, rename them."""
        from tcptrace.fileio import _give_to_invoking_user

        self.append(last)
        self.flush()
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
