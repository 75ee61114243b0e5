"""write_report / load_report: round trips through CSV and Parquet, and every refusal."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tcptrace.errors import ReportError
from tcptrace.events import Direction, TcpState
from tcptrace.report import (
    SCHEMA_VERSION,
    TABLES,
    CsvWriter,
    ParquetWriter,
    RunMeta,
    TableWriter,
    load_report,
    write_report,
)
from tcptrace.report.schema import connections_frame, open_sockets_frame
from tcptrace.sockets import CloseCause, Connection, StackStatus
from tests.unit.connection_factory import NOW, make_connection

THRESHOLD = 30.0


def make_conn(**overrides: Any) -> Connection:
    return make_connection(**overrides)


def sample_connections() -> list[Connection]:
    return [
        make_conn(state=TcpState.CLOSE_WAIT, opened_at=NOW - 99.123456789, bytes_sent=1 << 40),
        make_conn(
            key=-2,
            pid=200,
            tid=200,
            comm='we,ird "name"\n',
            fd=-1,
            family="ipv6",
            laddr="::1",
            lport=8080,
            raddr="",
            rport=0,
            state=TcpState.LISTEN,
            direction=Direction.PREEXISTING,
            opened_at=None,
            first_seen=NOW - 50.0,
            stack=(),
            stack_status=StackStatus.UNKNOWN,
        ),
        make_conn(
            key=3,
            comm="NA",  # must stay a string, not become missing
            state=TcpState.CLOSE,
            closed_at=NOW - 1.5,
            fd_closed=True,
            close_cause=CloseCause.APP,
            bytes_sent=0,
            bytes_received=123,
            stack=("main", "wörker", "0x7f00dead"),
            stack_status=StackStatus.UNSYMBOLIZED,
        ),
        make_conn(key=4, opened_at=NOW - 0.25, first_seen=NOW - 0.25, untracked=True),
    ]


def run_meta(**overrides: Any) -> RunMeta:
    fields: dict[str, Any] = {
        "tool_version": "0.1.0",
        "schema_version": SCHEMA_VERSION,
        "host": "box",
        "kernel": "6.8.0",
        "probe_set": "fentry",
        "pids": (100, 200),
        "threshold_s": THRESHOLD,
        "started_at": NOW - 120.0,
        "ended_at": NOW,
        "losses": {"events_dropped": 0, "ustack_failed": 2},
    }
    fields.update(overrides)
    return RunMeta(**fields)


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    out = tmp_path / "report"
    write_report(out, sample_connections(), NOW, THRESHOLD, run_meta())
    return out


def assert_declared(frame: pd.DataFrame, table: str) -> None:
    cols = TABLES[table]
    assert list(frame.columns) == [c.name for c in cols]
    assert [str(t) for t in frame.dtypes] == [c.dtype for c in cols]


# -- round trips -------------------------------------------------------------------------------


def test_write_report_files_modes_and_paths(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "report"
    paths = write_report(out, sample_connections(), NOW, THRESHOLD, run_meta())
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "connections.csv",
        "connections.parquet",
        "meta.json",
        "open_sockets.csv",
        "open_sockets.parquet",
        "timeline.csv",  # issue 5: written empty when no timeline rows are given
        "timeline.parquet",
    ]  # and no leftover temp files
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert paths.meta == out / "meta.json"
    assert [p.name for p in paths.for_table("connections")] == [
        "connections.csv",
        "connections.parquet",
    ]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_round_trip_preserves_values_dtypes_and_order(report_dir: Path, fmt: str) -> None:
    if fmt == "csv":
        for table in TABLES:
            (report_dir / f"{table}.parquet").unlink()
    report = load_report(report_dir)
    conns = sample_connections()
    expected_open = open_sockets_frame(conns, NOW, THRESHOLD)
    expected_all = connections_frame(conns, NOW)

    assert_declared(report.open_sockets, "open_sockets")
    assert_declared(report.connections, "connections")
    pd.testing.assert_frame_equal(report.open_sockets, expected_open)
    pd.testing.assert_frame_equal(report.connections, expected_all)
    assert report.connections["comm"].tolist()[1:3] == ['we,ird "name"\n', "NA"]
    assert len(report.open_sockets) == 3
    assert report.open_sockets["leak"].tolist() == [True, False, False]


def test_csv_and_parquet_load_identically(report_dir: Path, tmp_path: Path) -> None:
    from_parquet = load_report(report_dir)
    for table in TABLES:
        (report_dir / f"{table}.parquet").unlink()
    from_csv = load_report(report_dir)
    pd.testing.assert_frame_equal(from_parquet.open_sockets, from_csv.open_sockets)
    pd.testing.assert_frame_equal(from_parquet.connections, from_csv.connections)


def test_empty_report_round_trips(tmp_path: Path) -> None:
    write_report(tmp_path / "r", [], NOW, THRESHOLD, run_meta())
    report = load_report(tmp_path / "r")
    assert report.open_sockets.empty and report.connections.empty
    assert_declared(report.open_sockets, "open_sockets")
    assert_declared(report.connections, "connections")


def test_csv_timestamps_are_iso_utc(report_dir: Path) -> None:
    text = (report_dir / "connections.csv").read_text()
    opened = pd.Timestamp(NOW - 99.123456789, unit="s", tz="UTC").round("us")
    assert opened.strftime("%Y-%m-%dT%H:%M:%S.%fZ") in text


def test_parquet_carries_version_and_table(report_dir: Path) -> None:
    for table in TABLES:
        metadata = pq.read_schema(report_dir / f"{table}.parquet").metadata
        assert metadata[b"tcptrace.schema_version"] == str(SCHEMA_VERSION).encode()
        assert metadata[b"tcptrace.table"] == table.encode()
        assert b"pandas" in metadata  # kept, so pandas restores nullable dtypes


def test_meta_json_has_run_meta_and_files(report_dir: Path) -> None:
    meta = json.loads((report_dir / "meta.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["tool_version"] == "0.1.0"
    assert meta["host"] == "box"
    assert meta["kernel"] == "6.8.0"
    assert meta["probe_set"] == "fentry"
    assert meta["pids"] == [100, 200]
    assert meta["threshold_s"] == THRESHOLD
    assert meta["started_at"] == NOW - 120.0
    assert meta["ended_at"] == NOW
    assert meta["losses"] == {"events_dropped": 0, "ustack_failed": 2}
    assert meta["extra"] == {}
    assert meta["report_time"] == NOW
    assert sorted(meta["files"]) == sorted(
        f"{t}.{ext}"
        for t in ("open_sockets", "connections", "timeline")  # timeline: issue 5
        for ext in ("csv", "parquet")
    )
    assert meta["tables"] == {
        "open_sockets": {"rows": 3},
        "connections": {"rows": 4},
        "timeline": {"rows": 0},  # issue 5
    }
    assert load_report(report_dir).meta == meta


def test_extra_meta_is_kept(tmp_path: Path) -> None:
    write_report(tmp_path, [], NOW, THRESHOLD, run_meta(extra={"ringbuf_pages": 64}))
    assert load_report(tmp_path).meta["extra"] == {"ringbuf_pages": 64}


def test_meta_schema_version_must_match_writer(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_report(tmp_path, [], NOW, THRESHOLD, run_meta(schema_version=SCHEMA_VERSION + 1))


def test_custom_writer_plugs_into_write_report(tmp_path: Path) -> None:
    class JsonLinesWriter:
        suffix = ".jsonl"

        def write(self, frame: pd.DataFrame, path: Path, table: str) -> None:
            path.write_text(frame.to_json(orient="records", lines=True, date_format="iso"))

    writers: tuple[TableWriter, ...] = (JsonLinesWriter(), CsvWriter())
    paths = write_report(tmp_path, sample_connections(), NOW, THRESHOLD, run_meta(), writers)
    assert (tmp_path / "connections.jsonl").is_file()
    assert not (tmp_path / "connections.parquet").exists()
    assert [p.name for p in paths.for_table("open_sockets")] == [
        "open_sockets.jsonl",
        "open_sockets.csv",
    ]
    assert len(load_report(tmp_path).connections) == 4  # falls back to CSV


def test_stale_parquet_not_listed_in_meta_is_ignored(report_dir: Path) -> None:
    # A CSV-only rewrite of a directory that held an older Parquet report.
    write_report(report_dir, [make_conn()], NOW, THRESHOLD, run_meta(), (CsvWriter(),))
    assert (report_dir / "connections.parquet").exists()
    assert len(load_report(report_dir).connections) == 1


def test_parquet_writer_alone(tmp_path: Path) -> None:
    write_report(tmp_path, sample_connections(), NOW, THRESHOLD, run_meta(), (ParquetWriter(),))
    assert not (tmp_path / "connections.csv").exists()
    assert len(load_report(tmp_path).connections) == 4


# -- refusals ------------------------------------------------------------------------------------


def refused(directory: Path) -> str:
    with pytest.raises(ReportError) as info:
        load_report(directory)
    message = str(info.value)
    assert "\n" not in message, message
    assert "Traceback" not in message
    return message


def rewrite_meta(directory: Path, **changes: Any) -> None:
    meta_path = directory / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    meta_path.write_text(json.dumps(meta))


def test_missing_directory(tmp_path: Path) -> None:
    assert "does not exist" in refused(tmp_path / "absent")


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert "not a directory" in refused(tmp_path / "f")


def test_no_meta_json(report_dir: Path) -> None:
    (report_dir / "meta.json").unlink()
    assert "no meta.json" in refused(report_dir)


def test_meta_json_not_json(report_dir: Path) -> None:
    (report_dir / "meta.json").write_text("{not json\n\n")
    assert "not valid JSON" in refused(report_dir)


def test_meta_json_not_an_object(report_dir: Path) -> None:
    (report_dir / "meta.json").write_text("[1, 2]")
    assert "not a JSON object" in refused(report_dir)


def test_newer_schema_version(report_dir: Path) -> None:
    rewrite_meta(report_dir, schema_version=7)
    assert refused(report_dir) == (
        f"report schema version 7 is newer than this tcptrace understands ({SCHEMA_VERSION});"
        " upgrade tcptrace"
    )


@pytest.mark.parametrize("version", [0, -1, "1", None, True, 1.0])
def test_unknown_or_invalid_schema_version(report_dir: Path, version: object) -> None:
    rewrite_meta(report_dir, schema_version=version)
    message = refused(report_dir)
    assert "schema version" in message or "schema_version" in message


def test_truncated_parquet(report_dir: Path) -> None:
    path = report_dir / "open_sockets.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = refused(report_dir)
    assert "open_sockets.parquet" in message and "not a readable Parquet file" in message


def test_foreign_file_named_parquet(report_dir: Path) -> None:
    (report_dir / "connections.parquet").write_text("id,name\n1,x\n")
    assert "not a readable Parquet file" in refused(report_dir)


def test_foreign_parquet_without_tcptrace_metadata(report_dir: Path) -> None:
    pq.write_table(pa.table({"a": [1, 2]}), report_dir / "connections.parquet")
    assert "not a tcptrace Parquet file" in refused(report_dir)


def test_parquet_holding_the_wrong_table(report_dir: Path) -> None:
    (report_dir / "open_sockets.parquet").write_bytes(
        (report_dir / "connections.parquet").read_bytes()
    )
    assert "holds table 'connections', not 'open_sockets'" in refused(report_dir)


def test_parquet_with_newer_version(report_dir: Path) -> None:
    path = report_dir / "connections.parquet"
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    metadata[b"tcptrace.schema_version"] = b"9"
    pq.write_table(table.replace_schema_metadata(metadata), path)
    assert "report schema version 9 is newer" in refused(report_dir)


def test_parquet_missing_a_column(report_dir: Path) -> None:
    path = report_dir / "connections.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["stack_status"]), path)
    message = refused(report_dir)
    assert "missing column 'stack_status'" in message


def test_csv_missing_a_column_is_named(report_dir: Path) -> None:
    (report_dir / "connections.parquet").unlink()
    frame = pd.read_csv(report_dir / "connections.csv", dtype=str, keep_default_na=False)
    frame.drop(columns=["duration_s"]).to_csv(report_dir / "connections.csv", index=False)
    message = refused(report_dir)
    assert "connections.csv" in message and "missing column 'duration_s'" in message


def test_csv_truncated_mid_row(report_dir: Path) -> None:
    (report_dir / "connections.parquet").unlink()
    path = report_dir / "connections.csv"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])
    assert "truncated" in refused(report_dir)


def test_csv_missing_whole_rows(report_dir: Path) -> None:
    (report_dir / "open_sockets.parquet").unlink()
    path = report_dir / "open_sockets.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))  # header and the first row only
    message = refused(report_dir)
    assert "has 1 rows but meta.json says 3" in message


def test_csv_bad_value_names_column(report_dir: Path) -> None:
    (report_dir / "connections.parquet").unlink()
    path = report_dir / "connections.csv"
    header, first, *rest = path.read_text().split("\n")
    path.write_text("\n".join([header, "x" + first, *rest]))
    message = refused(report_dir)
    assert "column 'pid'" in message and "'x100' is not an integer" in message


def test_csv_bad_timestamp(report_dir: Path) -> None:
    (report_dir / "connections.parquet").unlink()
    path = report_dir / "connections.csv"
    path.write_text(path.read_text().replace("2023-11-14T", "yesterdayT", 1))
    message = refused(report_dir)
    assert "column 'opened_at'" in message and "not an ISO-8601 timestamp" in message


def test_empty_csv(report_dir: Path) -> None:
    (report_dir / "connections.parquet").unlink()
    (report_dir / "connections.csv").write_text("")
    assert "is empty" in refused(report_dir)


def test_no_table_files(report_dir: Path) -> None:
    (report_dir / "connections.parquet").unlink()
    (report_dir / "connections.csv").unlink()
    assert "neither connections.parquet nor connections.csv" in refused(report_dir)


def test_parquet_file_of_another_version_than_meta_is_refused(report_dir: Path) -> None:
    # A file of another report mixed in: read under the wrong version, a sparse
    # (version 2) timeline would pass for a dense one.
    rewrite_meta(report_dir, schema_version=1)
    assert f"is schema version {SCHEMA_VERSION} but meta.json says 1" in refused(report_dir)
