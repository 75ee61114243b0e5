"""Writing a report directory: one frame per table, through each TableWriter, then meta.json.

meta.json is written last and removed first: its presence marks a complete
report, so a run interrupted while overwriting an old report is not mistaken
for either the old or the new one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tcptrace.errors import ReportError
from tcptrace.fileio import prepare_output_dir, write_atomic
from tcptrace.report.schema import (
    SCHEMA_VERSION,
    conform,
    connections_frame,
    open_sockets_frame,
    to_frame,
)
from tcptrace.sockets import Connection

META_FILE: Final = "meta.json"
PARQUET_VERSION_KEY: Final = b"tcptrace.schema_version"
PARQUET_TABLE_KEY: Final = b"tcptrace.table"
# ISO-8601 UTC; frames hold microsecond-rounded timestamps so %f loses nothing.
CSV_DATE_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class RunMeta:
    """What a report says about the run that produced it. Times are epoch seconds."""

    tool_version: str
    schema_version: int
    host: str
    kernel: str
    probe_set: str
    pids: tuple[int, ...]
    threshold_s: float
    started_at: float
    ended_at: float
    losses: dict[str, int]
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportPaths:
    directory: Path
    meta: Path
    files: tuple[Path, ...]  # table files, in the order written

    def for_table(self, table: str) -> tuple[Path, ...]:
        return tuple(p for p in self.files if p.name.split(".", 1)[0] == table)


class StreamedTable(Protocol):
    """Rows of `connections` already streamed to part files (tcptrace.history)."""

    @property
    def rows(self) -> int: ...

    def finish(self, last: pd.DataFrame) -> list[Path]: ...


class TableWriter(Protocol):
    """One on-disk format for a table. `path` already ends with `suffix`."""

    @property
    def suffix(self) -> str: ...

    def write(self, frame: pd.DataFrame, path: Path, table: str) -> None: ...


class CsvWriter:
    suffix = ".csv"

    def write(self, frame: pd.DataFrame, path: Path, table: str) -> None:
        # The schema version lives in meta.json: a header comment would trip up other tools.
        # One CSV style for every table, streamed or not (tcptrace.history.csv_bytes).
        from tcptrace.history import csv_bytes

        write_atomic(path, csv_bytes(frame, header=True))


class ParquetWriter:
    suffix = ".parquet"

    def write(self, frame: pd.DataFrame, path: Path, table: str) -> None:
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        metadata = dict(arrow.schema.metadata or {})
        metadata[PARQUET_VERSION_KEY] = str(SCHEMA_VERSION).encode()
        metadata[PARQUET_TABLE_KEY] = table.encode()
        arrow = arrow.replace_schema_metadata(metadata)
        # Serialize in memory, then write atomically: a report is at most a few MB.
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink)
        data: bytes = sink.getvalue().to_pybytes()
        write_atomic(path, data)


DEFAULT_WRITERS: Final[tuple[TableWriter, ...]] = (CsvWriter(), ParquetWriter())


def _write_table(
    directory: Path,
    table: str,
    frame: pd.DataFrame,
    writers: Sequence[TableWriter],
    history: StreamedTable | None,
) -> tuple[int, list[Path]]:
    """Write one table; returns (its rows, its files). The frame dies with the call."""
    if table == "connections" and history is not None and history.rows:
        # The history streamed most rows to part files during the trace.
        files = history.finish(frame)
        return history.rows, files
    files = []
    for writer in writers:
        path = directory / f"{table}{writer.suffix}"
        writer.write(frame, path, table)
        files.append(path)
    return len(frame), files


def meta_dict(
    meta: RunMeta, files: Sequence[Path], rows: dict[str, int], now: float
) -> dict[str, object]:
    """meta.json contents: every RunMeta field, plus what was written."""
    out: dict[str, object] = dataclasses.asdict(meta)
    out["pids"] = list(meta.pids)
    out["report_time"] = now  # the `now` that ages and leak flags were computed against
    out["files"] = [p.name for p in files]
    out["tables"] = {name: {"rows": count} for name, count in rows.items()}
    return out


def write_report(
    out_dir: Path,
    connections: Sequence[Connection],
    now: float,
    threshold_s: float,
    meta: RunMeta,
    writers: Sequence[TableWriter] = DEFAULT_WRITERS,
    timeline: pd.DataFrame | Sequence[Mapping[str, object]] = (),
    history: StreamedTable | None = None,
) -> ReportPaths:
    """Write open_sockets, connections and timeline through every writer, then meta.json.

    `timeline` holds TimelineRecorder.frame() (or rows); without it the timeline table is
    written empty, so every report has the same files. `history`, when given,
    holds the connections rows streamed during the trace; `connections` rows
    are appended to it (the sockets still open, and those the ledger closed).

    `out_dir` is created if absent; callers should still call
    `prepare_output_dir(out_dir, force)` before tracing so a bad directory fails
    early. Raises ReportError if a file cannot be written.
    """
    if meta.schema_version != SCHEMA_VERSION:
        raise ValueError(
            f"RunMeta.schema_version is {meta.schema_version}; this writer writes {SCHEMA_VERSION}"
        )
    directory = prepare_output_dir(out_dir, force=True)
    meta_path = directory / META_FILE
    try:
        meta_path.unlink(missing_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot replace {meta_path}: {exc.strerror or exc}") from exc

    # One table at a time, each frame dropped once written: with 100k open
    # sockets two frames at once doubled the peak memory (issue 6).
    builders: dict[str, Callable[[], pd.DataFrame]] = {
        "open_sockets": lambda: open_sockets_frame(connections, now, threshold_s),
        "connections": lambda: connections_frame(connections, now),
        "timeline": lambda: (
            conform("timeline", timeline)
            if isinstance(timeline, pd.DataFrame)
            else to_frame("timeline", timeline)
        ),
    }
    written: list[Path] = []
    rows: dict[str, int] = {}
    for table, build in builders.items():
        rows[table], files = _write_table(directory, table, build(), writers, history)
        written.extend(files)

    text = json.dumps(meta_dict(meta, written, rows, now), indent=2, default=str) + "\n"
    write_atomic(meta_path, text.encode("utf-8"))
    return ReportPaths(directory=directory, meta=meta_path, files=tuple(written))
