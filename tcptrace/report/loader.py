"""Reading a report directory back, refusing anything it cannot trust with a one-line ReportError.

Parquet is preferred (typed, compact); CSV is the fallback for reports whose
Parquet files were removed or never written. Either way the frames come out
through schema.conform, so they have the declared columns and dtypes.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow.parquet as pq

from tcptrace.errors import ReportError
from tcptrace.report.schema import (
    BOOL,
    FLOAT,
    INT,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    STRING,
    TIMESTAMP,
    Column,
    coerce_values,
    columns,
    conform,
    to_frame,
)
from tcptrace.report.writers import META_FILE, PARQUET_TABLE_KEY, PARQUET_VERSION_KEY

REQUIRED_TABLES: Final = ("open_sockets", "connections")
# Added to schema version 1 before its first release: a report whose meta.json does not
# mention it was written before the timeline existed, and loads with an empty one.
OPTIONAL_TABLES: Final = ("timeline",)
# pyarrow repeats the path we already print; drop it to keep the message to one short line.
_ARROW_PREFIX: Final = re.compile(r"^Could not open Parquet input source '[^']*': ")


@dataclass(frozen=True)
class Report:
    """A loaded report: meta.json as a dict, and one typed DataFrame per table.

    Columns and dtypes are exactly those declared in tcptrace.report.schema
    (see docs/report-format.md).
    """

    directory: Path
    meta: dict[str, Any]
    open_sockets: pd.DataFrame
    connections: pd.DataFrame
    timeline: pd.DataFrame = field(default_factory=lambda: to_frame("timeline", []))

    @property
    def threshold_s(self) -> float:
        value = self.meta.get("threshold_s")
        return float(value) if isinstance(value, int | float) else float("nan")

    @property
    def losses(self) -> dict[str, int]:
        raw = self.meta.get("losses")
        if not isinstance(raw, dict):
            return {}
        return {str(k): int(v) for k, v in raw.items() if isinstance(v, int)}

    @property
    def extra(self) -> dict[str, Any]:
        raw = self.meta.get("extra")
        return raw if isinstance(raw, dict) else {}


def load_report(directory: str | os.PathLike[str]) -> Report:
    """Load a report written by write_report. Raises ReportError (one line) if it cannot."""
    path = Path(directory)
    if not path.exists():
        raise ReportError(f"report directory {path} does not exist")
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory")
    meta = _read_meta(path)
    listed = meta.get("files")
    listed_names = {str(n) for n in listed} if isinstance(listed, list) else None
    expected_rows = _expected_rows(meta)

    frames: dict[str, pd.DataFrame] = {}
    for table in (*REQUIRED_TABLES, *OPTIONAL_TABLES):
        if table in OPTIONAL_TABLES and not _mentioned(table, meta, listed_names):
            frames[table] = to_frame(table, [])
            continue
        frame = _read_table(path, table, listed_names, meta["schema_version"])
        want = expected_rows.get(table)
        if want is not None and len(frame) != want:
            raise ReportError(
                f"{table} in {path} has {len(frame)} rows but meta.json says {want} (truncated?)"
            )
        frames[table] = frame
    return Report(
        directory=path,
        meta=meta,
        open_sockets=frames["open_sockets"],
        connections=frames["connections"],
        timeline=frames["timeline"],
    )


def _mentioned(table: str, meta: dict[str, Any], listed: set[str] | None) -> bool:
    tables = meta.get("tables")
    in_tables = isinstance(tables, dict) and table in tables
    in_files = listed is not None and any(n.split(".", 1)[0] == table for n in listed)
    return in_tables or in_files


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ReportError(f"{directory} is not a tcptrace report (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read {meta_path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{meta_path} is not valid JSON: {_first_line(exc)}") from exc
    if not isinstance(meta, dict):
        raise ReportError(f"{meta_path} is not a JSON object")
    _check_version(meta.get("schema_version"), meta_path)
    return meta


def _check_version(version: object, where: Path) -> None:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReportError(f"{where} has no valid schema_version")
    if version > SCHEMA_VERSION:
        raise ReportError(
            f"report schema version {version} is newer than this tcptrace understands"
            f" ({SCHEMA_VERSION}); upgrade tcptrace"
        )
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ReportError(f"unknown report schema version {version} in {where}")


def _expected_rows(meta: dict[str, Any]) -> dict[str, int]:
    tables = meta.get("tables")
    if not isinstance(tables, dict):
        return {}
    out: dict[str, int] = {}
    for name, info in tables.items():
        rows = info.get("rows") if isinstance(info, dict) else None
        if isinstance(rows, int) and not isinstance(rows, bool):
            out[str(name)] = rows
    return out


def _read_table(
    directory: Path, table: str, listed: set[str] | None, version: int | None = None
) -> pd.DataFrame:
    def usable(name: str) -> bool:
        # With a file list in meta.json, an unlisted file is a leftover of an older run.
        return (directory / name).is_file() and (listed is None or name in listed)

    if usable(f"{table}.parquet"):
        return _read_parquet(directory / f"{table}.parquet", table, version)
    if usable(f"{table}.csv"):
        return _read_csv(directory / f"{table}.csv", table)
    raise ReportError(f"report {directory} has neither {table}.parquet nor {table}.csv")


def _read_parquet(path: Path, table: str, expected_version: int | None = None) -> pd.DataFrame:
    try:
        arrow = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for bad files
        reason = _ARROW_PREFIX.sub("", _first_line(exc)).split(". ", 1)[0]
        raise ReportError(
            f"{path} is not a readable Parquet file (truncated or foreign?): {reason}"
        ) from exc
    metadata = arrow.schema.metadata or {}
    found_table = metadata.get(PARQUET_TABLE_KEY)
    raw_version = metadata.get(PARQUET_VERSION_KEY)
    if found_table is None or raw_version is None:
        raise ReportError(f"{path} is not a tcptrace Parquet file (no tcptrace metadata)")
    if found_table != table.encode():
        raise ReportError(
            f"{path} holds table {found_table.decode(errors='replace')!r}, not {table!r}"
        )
    try:
        version = int(raw_version)
    except ValueError:
        raise ReportError(f"{path} has an invalid schema version {raw_version!r}") from None
    _check_version(version, path)
    if expected_version is not None and version != expected_version:
        # A file of another report mixed in: read under the wrong version, a sparse
        # timeline would pass for a dense one.
        raise ReportError(
            f"{path} is schema version {version} but meta.json says {expected_version}"
        )
    try:
        frame = arrow.to_pandas()
    except Exception as exc:
        raise ReportError(f"cannot convert {path}: {_first_line(exc)}") from exc
    return _conform(frame, table, path)


def _conform(frame: pd.DataFrame, table: str, path: Path) -> pd.DataFrame:
    try:
        return conform(table, frame)
    except KeyError as exc:
        raise ReportError(f"{path} is missing column {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:
        raise ReportError(f"{path} has values of the wrong type: {_first_line(exc)}") from exc


def _read_csv(path: Path, table: str) -> pd.DataFrame:
    cols = columns(table)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ReportError(f"{path} is empty")
            for c in cols:
                if c.name not in header:
                    raise ReportError(f"{path} is missing column {c.name!r}")
            position = {name: i for i, name in enumerate(header)}
            raw: dict[str, list[str]] = {c.name: [] for c in cols}
            for record in reader:
                if len(record) != len(header):
                    raise ReportError(
                        f"{path} line {reader.line_num} has {len(record)} fields,"
                        f" expected {len(header)} (truncated?)"
                    )
                for c in cols:
                    raw[c.name].append(record[position[c.name]])
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReportError(f"{path} is not a valid CSV file: {_first_line(exc)}") from exc

    data: dict[str, pd.Series] = {}
    for c in cols:
        try:
            data[c.name] = coerce_values(c, [_parse_cell(c, v) for v in raw[c.name]])
        except (ValueError, TypeError) as exc:
            raise ReportError(f"{path} column {c.name!r}: {_first_line(exc)}") from exc
    return _conform(pd.DataFrame(data), table, path)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _parse_float(text: str) -> float:
    try:
        return float(text)  # Python's float() round-trips repr() exactly
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _parse_timestamp(text: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 timestamp") from None
    if not isinstance(stamp, pd.Timestamp) or stamp.tzinfo is None:  # NaT is no Timestamp
        raise ValueError(f"{text!r} is not a UTC timestamp")
    return stamp


_CELL_PARSERS: Final[dict[str, Callable[[str], object]]] = {
    INT: _parse_int,
    FLOAT: _parse_float,
    BOOL: _parse_bool,
    TIMESTAMP: _parse_timestamp,
}


def _parse_cell(column: Column, text: str) -> object:
    if column.dtype == STRING:
        return text
    if text == "":
        return None
    return _CELL_PARSERS[column.dtype](text)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
