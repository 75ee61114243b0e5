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
  the parts into place (each file whole or absent),
- and when the disk refuses a batch, counts its rows as lost and goes on
  (issue 7); `copy_to()` re-homes the history when the report is rescued.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Callable, Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tcptrace.events import RECORD_DTYPE, Direction, RecordFlag, RecordKind, TcpState
from tcptrace.report.schema import conform, to_frame
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


def _format_address(family: int, raw: bytes) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == 10:
        return str(ipaddress.IPv6Address(raw[:16]))
    return ""


def _addresses(family: np.ndarray, raw: np.ndarray) -> Any:
    """Text addresses (an Arrow array), each distinct (family, bytes) formatted once."""
    keys = np.ascontiguousarray(raw).view(f"S{raw.shape[1]}").ravel()
    distinct, inverse = _distinct([family, keys])
    # numpy's S dtype drops trailing NULs: pad back to 16 bytes.
    texts = [_format_address(int(f), bytes(b).ljust(16, b"\0")) for f, b in distinct]
    return _take(texts, inverse)


def _take(values: list[str], inverse: np.ndarray) -> Any:
    """values[inverse] as an Arrow string column, spread in C."""
    import pyarrow as pa

    return pa.array(values, type=pa.large_string()).take(pa.array(inverse, type=pa.int64()))


def _timestamps(epoch: np.ndarray) -> Any:
    """Epoch seconds as UTC timestamps rounded to the microsecond, as the schema says."""
    import pyarrow as pa

    ns = np.round(epoch * 1e6).astype(np.int64) * 1000
    return pa.array(ns, type=pa.timestamp("ns", tz="UTC"))


@functools.lru_cache(maxsize=1)
def connections_schema() -> Any:
    """The Arrow schema of the connections table (pandas' own mapping of the declared
    dtypes, so Parquet files read back with them), with tcptrace's metadata."""
    import pyarrow as pa

    return _with_tcptrace_metadata(
        pa.Schema.from_pandas(to_frame("connections", []), preserve_index=False)
    )


def connections_table(frame: pd.DataFrame) -> Any:
    """A connections DataFrame (any dtypes the schema accepts) as an Arrow table."""
    import pyarrow as pa

    table = pa.Table.from_pandas(conform("connections", frame), preserve_index=False)
    return table.cast(connections_schema())


StackLookup = Callable[[int, int, int], tuple[tuple[str, ...], StackStatus]]


def death_table(
    deaths: np.ndarray,
    to_epoch: Callable[[np.ndarray], np.ndarray],
    stacks: StackLookup,
    exited: Mapping[int, int],
    closed_fds: Callable[[int, int, int, int], bool] | None = None,
) -> Any:
    """`connections` rows (an Arrow table in the schema's order and types) for death
    records of sockets the ledger never held open (born and gone between two scans).

    Built column by column in numpy and Arrow: at 60k deaths/s, building a pandas
    frame (and converting it again to write it) was most of the tracer's CPU."""
    import pyarrow as pa

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
    if exited:
        exit_ns = np.array([exited.get(int(p), -1) for p in tgid.tolist()], dtype=np.int64)
    else:
        exit_ns = np.full(len(tgid), -1, dtype=np.int64)
    by_exit = ~fd_closed & (exit_ns >= 0) & (ts >= exit_ns)
    cause = np.where(fd_closed, 0, np.where(by_exit, 1, 2))

    sites, site_of = _distinct([tgid, deaths["user_stack_id"], deaths["kernel_stack_id"]])
    resolved = [stacks(int(t), int(u), int(k)) for t, u, k in sites]

    opened = to_epoch(deaths["birth_ns"])
    closed = to_epoch(deaths["ts_ns"])
    names, name_of = _distinct([np.ascontiguousarray(deaths["comm"]).view("V16").ravel()])
    family_code = np.where(family == 2, 1, np.where(family == 10, 2, 0))
    opened_at = _timestamps(opened)
    columns: dict[str, Any] = {
        "pid": tgid,
        "tid": deaths["tid"].astype(np.int64),
        # A C string: up to the first NUL, whatever follows it.
        "comm": _take(
            [bytes(b).split(b"\0", 1)[0].decode("utf-8", "replace") for (b,) in names], name_of
        ),
        "fd": pa.array(fd, mask=fd < 0),
        "family": _take(["", "ipv4", "ipv6"], family_code),
        "laddr": _addresses(family, deaths["laddr"]),
        "lport": deaths["lport"].astype(np.int64),
        "raddr": _addresses(family, deaths["raddr"]),
        "rport": deaths["rport"].astype(np.int64),
        "direction": _take(list(_DIRECTION_NAMES), np.minimum(deaths["direction"], 7)),
        "opened_at": opened_at,
        "first_seen": opened_at,
        "closed_at": _timestamps(closed),
        "duration_s": np.maximum(closed - opened, 0.0),
        "final_state": _take(list(_STATE_NAMES), np.minimum(deaths["state"], 15)),
        "fd_closed_by_app": fd_closed | by_exit,
        "close_cause": _take(["app", "exit", "kernel"], cause),
        "untracked": (flags & RecordFlag.UNTRACKED) != 0,
        "stack": _take([";".join(frames) for frames, _ in resolved], site_of),
        "stack_status": _take([status.value for _, status in resolved], site_of),
        "bytes_sent": deaths["bytes_acked"].astype(np.int64),
        "bytes_received": deaths["bytes_received"].astype(np.int64),
    }
    schema = connections_schema()
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def death_rows(
    deaths: np.ndarray,
    to_epoch: Callable[[np.ndarray], np.ndarray],
    stacks: StackLookup,
    exited: Mapping[int, int],
    closed_fds: Callable[[int, int, int, int], bool] | None = None,
) -> pd.DataFrame:
    """death_table as a DataFrame with the schema's dtypes (tests, notebooks)."""
    table = death_table(deaths, to_epoch, stacks, exited, closed_fds)
    return conform("connections", table.to_pandas())


def csv_bytes(frame: pd.DataFrame, header: bool) -> bytes:
    """CSV text of `frame`, as report.writers.CsvWriter writes it, at C speed."""
    import pyarrow as pa

    return csv_table_bytes(pa.Table.from_pandas(frame, preserve_index=False), header)


def _iso_utc(column: Any) -> Any:
    """Timestamps as ISO-8601 UTC text with microseconds and Z, nulls kept.

    Arrow's strftime took ~60% of the tracer's CPU at full churn. A batch spans
    few distinct seconds: format each second once, then join the zero-padded
    microseconds to it, all in C."""
    import pyarrow as pa
    import pyarrow.compute as pc

    micro = column.cast(pa.timestamp("us", tz="UTC"), safe=False).cast(pa.int64())
    if isinstance(micro, pa.ChunkedArray):
        micro = micro.combine_chunks()
    valid = pc.is_valid(micro)
    us = pc.fill_null(micro, 0).to_numpy()
    seconds = np.floor_divide(us, 1_000_000)
    distinct, inverse = np.unique(seconds, return_inverse=True)
    prefixes = [f"{text}." for text in np.datetime_as_string(distinct.astype("datetime64[s]"))]
    fraction = pc.utf8_lpad(pa.array(us - seconds * 1_000_000).cast(pa.large_string()), 6, "0")
    text = pc.binary_join_element_wise(
        _take(prefixes, inverse),
        fraction,
        pa.scalar("Z", pa.large_string()),
        pa.scalar("", pa.large_string()),  # the separator
    )
    return pc.if_else(valid, text, pa.scalar(None, text.type))


def csv_table_bytes(table: Any, header: bool) -> bytes:
    """CSV text of an Arrow table, the one CSV style of every report file.

    pandas' to_csv cost ~3 us a row: at 40k deaths/s the trace loop stalled in it
    and the ring buffer overflowed. Timestamps and booleans are formatted here
    (ISO-8601 UTC with microseconds and Z; True/False), then pyarrow writes the text.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(field.type):
            column = _iso_utc(column)
        elif pa.types.is_boolean(field.type):
            column = pc.if_else(column, "True", "False")
        columns.append(column)
    sink = pa.BufferOutputStream()
    options = pacsv.WriteOptions(include_header=header, quoting_style="needed")
    pacsv.write_csv(pa.table(columns, names=table.column_names), sink, options)
    data: bytes = sink.getvalue().to_pybytes()
    return data


class ConnectionHistory:
    """`connections` rows appended as they come, written in parts, renamed at the end.

    Rows are buffered up to `flush_rows`, then appended to `connections.csv.part`
    and as a row group to `connections.parquet.part` by one writer thread:
    pyarrow releases the GIL while it encodes and writes, so the trace loop
    keeps draining the ring buffer meanwhile. Memory stays bounded by the
    buffer (and at most two batches in flight) whatever the length of the trace.

    issue 7: a batch that cannot be written (ENOSPC, EIO, ...) never stops the
    trace. Its rows are dropped and counted (`unwritten`, the loss counter
    `history_rows_unwritten`); the CSV part is cut back to its last whole batch,
    so it always holds exactly the rows written; a Parquet part a failed write
    touched is given up (deleted, freeing its space) and rebuilt from the CSV at
    the end. Later batches are tried again: a disk that got space back takes them.
    """

    def __init__(self, directory: Path, flush_rows: int = 20_000) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.directory = directory
        self.flush_rows = flush_rows
        self.rows = 0  # rows held: written to the parts, buffered or in flight
        self.unwritten = 0  # rows dropped because their batch could not be written
        self.write_error: str | None = None  # the first such failure, one line
        self._pending: list[Any] = []  # Arrow tables
        self._pending_rows = 0
        self._csv_part = directory / "connections.csv.part"
        self._parquet_part = directory / "connections.parquet.part"
        # Whole batches in the CSV part (bytes, rows); changed by the writer thread only
        # while a batch is in flight, read by the caller only after waiting for it.
        self._csv_size = 0
        self._csv_rows = 0
        # The batches streamed during the trace (bytes, rows), without finish's final
        # rows, and where they are: a copy_to after finish must not repeat those.
        self._streamed: tuple[int, int] | None = None
        self._csv_data = self._csv_part
        self._parquet_writer: Any = None
        self._parquet_lost = False
        self._schema: Any = None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tcptrace-history")
        self._in_flight: tuple[Future[None], int] | None = None
        for part in (self._csv_part, self._parquet_part):
            part.unlink(missing_ok=True)

    @property
    def losses(self) -> dict[str, int]:
        """Loss counters of the history, for the terminal and meta.json."""
        return {"history_rows_unwritten": self.unwritten}

    def append(self, rows: pd.DataFrame | Any) -> None:
        """Rows to add: an Arrow table in the schema (death_table) or a DataFrame."""
        table = connections_table(rows) if isinstance(rows, pd.DataFrame) else rows
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.flush_rows:
            self.flush(block=False)

    def flush(self, block: bool = True) -> None:
        """Hand the buffered rows to the writer thread (waits for the previous batch).

        With block=False, a busy writer is not waited for until the buffer holds
        8 batches: the trace loop must keep draining the ring buffer meanwhile."""
        if not self._pending:
            return
        busy = self._in_flight is not None and not self._in_flight[0].done()
        if busy and not block and self._pending_rows < 8 * self.flush_rows:
            return
        self._wait()  # one batch in flight: bounded memory, ordered parts
        table = self._take_pending()
        self._in_flight = (self._writer.submit(self._write, table), table.num_rows)

    def sync(self) -> None:
        """Write every buffered row now and wait; afterwards `unwritten` is final
        until `finish` (whose own failure raises instead of dropping rows)."""
        self.flush()
        self._wait()

    def _take_pending(self) -> Any:
        import pyarrow as pa

        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        return table

    def _wait(self) -> None:
        if self._in_flight is None:
            return
        (future, count), self._in_flight = self._in_flight, None
        try:
            future.result()
        except OSError as exc:  # the disk, not a bug: count the rows, trace on
            self._lost(count, exc)
        except BaseException as exc:  # a bug: the parts are consistent, say so upstream
            self._lost(count, exc)
            raise

    def _lost(self, count: int, exc: BaseException) -> None:
        self.rows -= count
        self.unwritten += count
        if self.write_error is None:
            self.write_error = _one_line(exc)

    def _write(self, table: Any) -> None:
        """Append one batch to both parts, or leave both as they were (raising)."""
        start = self._csv_size
        data = csv_table_bytes(table, header=start == 0)
        try:
            fd = os.open(self._csv_part, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as fh:
                if os.fstat(fd).st_size != start:  # an earlier cut-back failed
                    os.ftruncate(fd, start)
                fh.write(data)
        except BaseException:
            self._cut_csv(start)
            raise
        # CSV first: the larger file meets a full disk first, and its failure leaves
        # the Parquet part untouched. A failed Parquet write cannot be undone.
        try:
            if not self._parquet_lost:
                self._write_parquet(table)
        except BaseException:
            self._cut_csv(start)
            self._give_up_parquet()
            raise
        self._csv_size = start + len(data)
        self._csv_rows += table.num_rows
        release_arrow_memory()  # after each batch, off the trace loop

    def _write_parquet(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self._parquet_writer is None:
            self._schema = connections_schema()
            self._parquet_part.touch(mode=0o600)
            self._parquet_writer = pq.ParquetWriter(self._parquet_part, self._schema)
        self._parquet_writer.write_table(table.cast(self._schema))

    def _cut_csv(self, size: int) -> None:
        """Back to `size` bytes (the whole batches); truncating needs no free space."""
        with suppress(OSError):
            if size == 0:
                self._csv_part.unlink(missing_ok=True)
            else:
                os.truncate(self._csv_part, size)

    def _give_up_parquet(self) -> None:
        self._parquet_lost = True
        writer, self._parquet_writer = self._parquet_writer, None
        if writer is not None:
            with suppress(Exception):  # its footer may not fit either
                writer.close()
        with suppress(OSError):
            self._parquet_part.unlink(missing_ok=True)

    def finish(self, last: pd.DataFrame) -> list[Path]:
        """Append the final rows (sockets still open), complete the parts, rename them.

        Raises ReportError (OutputDirFull for a full disk) if that fails; the parts
        then hold what they held before, so `copy_to` can still write it all elsewhere.
        """
        from tcptrace.fileio import _give_to_invoking_user, _write_error

        try:
            self.sync()
            last_table = connections_table(last)
            before = (self._csv_size, self._csv_rows)
            where = self._csv_part  # named in the error
            try:
                if last_table.num_rows or self._csv_size == 0:  # an empty table has its header
                    self._write(last_table)
                where = self._parquet_part
                self._complete_parquet()
                where = self._csv_part
                if self._csv_part.stat().st_size != self._csv_size:
                    os.truncate(self._csv_part, self._csv_size)
            except BaseException as exc:
                self._cut_csv(before[0])
                self._csv_size, self._csv_rows = before
                if isinstance(exc, OSError):
                    raise _write_error(exc, where) from exc
                raise
            self._streamed = before
            done = []
            for part in (self._csv_part, self._parquet_part):
                final = part.with_suffix("")
                _give_to_invoking_user(part)
                os.replace(part, final)
                if part == self._csv_part:
                    self._csv_data = final
                done.append(final)
            self.rows = self._csv_rows
            return done
        finally:
            self.close()

    def _complete_parquet(self) -> None:
        """Close the streamed Parquet part, or rebuild it from the CSV part if lost."""
        if not self._parquet_lost and self._parquet_writer is not None:
            writer, self._parquet_writer = self._parquet_writer, None
            try:
                writer.close()
            except BaseException:
                self._give_up_parquet()
                raise
            return
        self._parquet_part.unlink(missing_ok=True)
        try:
            with open(self._parquet_part, "wb") as sink:
                os.fchmod(sink.fileno(), 0o600)
                _csv_to_parquet(self._csv_part, sink)
        except BaseException:
            self._parquet_part.unlink(missing_ok=True)
            raise

    def copy_to(self, directory: Path, last: pd.DataFrame) -> tuple[list[Path], int]:
        """The whole history (rows written so far, rows still buffered, then `last`)
        as connections.csv and connections.parquet in another `directory`, each
        written atomically: how a report is rescued when its own directory failed.

        Returns the files and their row count. Reads and writes in blocks: memory
        stays bounded however long the history is.
        """
        from tcptrace.fileio import atomic_writer

        try:
            self._wait()
            tables = [*self._pending, connections_table(last)]
            # After a finish that succeeded (a later file of the report failed), the
            # final rows are in the CSV too: copy the streamed batches only.
            size = self._csv_size if self._streamed is None else self._streamed[0]
            csv_path = directory / "connections.csv"
            with atomic_writer(csv_path) as out:
                if size:
                    with open(self._csv_data, "rb") as part:
                        _copy_bytes(part, out, size)
                else:
                    out.write(csv_table_bytes(connections_schema().empty_table(), header=True))
                for table in tables:
                    if table.num_rows:
                        out.write(csv_table_bytes(table, header=False))
            parquet_path = directory / "connections.parquet"
            with atomic_writer(parquet_path) as sink:
                rows = _csv_to_parquet(csv_path, sink)
            return [csv_path, parquet_path], rows
        finally:
            self.close()

    def close(self) -> None:
        """Stop the writer thread (idempotent). The part files are left as they are."""
        with suppress(BaseException):
            self._wait()
        self._writer.shutdown(wait=True)
        writer, self._parquet_writer = self._parquet_writer, None
        if writer is not None:
            with suppress(Exception):
                writer.close()


def use_system_allocator() -> None:
    """Arrow allocates with glibc's malloc from now on, not mimalloc (pyarrow's default).

    A trace builds history batches on one thread and frees them on another, for
    hours. Measured in the soak (issue 7, 2,000 connections/s, a child process
    forked every second): mimalloc's arena grew from 21 to 43 MB in five minutes
    while Arrow held under 11 MB, and went on growing; with the system allocator
    (and malloc_trim after each batch) RSS stayed at 236-238 MB, 33 MB lower.

    This sets pyarrow's default pool; Arrow's C++ code that takes the process-wide
    default (the Parquet and CSV writers) follows only ARROW_DEFAULT_MEMORY_POOL,
    which the `tcptrace` command sets before Arrow starts (tcptrace.entry)."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps but does not use back to the system
    (malloc_trim with the system allocator). Called by the writer thread once per
    history batch, so the trace loop never waits for it (~10 us measured here with a
    small heap; malloc_trim walks every arena)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _with_tcptrace_metadata(schema: Any) -> Any:
    from tcptrace.report.schema import SCHEMA_VERSION
    from tcptrace.report.writers import PARQUET_TABLE_KEY, PARQUET_VERSION_KEY

    metadata = dict(schema.metadata or {})
    metadata[PARQUET_VERSION_KEY] = str(SCHEMA_VERSION).encode()
    metadata[PARQUET_TABLE_KEY] = b"connections"
    return schema.with_metadata(metadata)


def _csv_to_parquet(source: Path, sink: Any) -> int:
    """Convert a connections CSV (as csv_bytes writes it) to Parquet, block by block."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    schema = connections_schema()
    convert = pacsv.ConvertOptions(
        column_types={name: schema.field(name).type for name in schema.names},
        include_columns=schema.names,
        strings_can_be_null=False,  # "" is an empty string, as the loader reads it
    )
    parse = pacsv.ParseOptions(newlines_in_values=True)  # names are data: may hold "\n"
    rows = 0
    with pq.ParquetWriter(sink, schema) as writer:
        reader = pacsv.open_csv(source, parse_options=parse, convert_options=convert)
        for batch in reader:
            writer.write_table(pa.Table.from_batches([batch]).cast(schema))
            rows += batch.num_rows
    return rows


def _copy_bytes(source: Any, sink: Any, count: int, block: int = 1 << 20) -> None:
    while count > 0:
        chunk = source.read(min(block, count))
        if not chunk:
            raise OSError(f"{source.name} is shorter than the {count} bytes it should hold")
        sink.write(chunk)
        count -= len(chunk)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:  # pyarrow's strerror is its own sentence
        return os.strerror(exc.errno)
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
