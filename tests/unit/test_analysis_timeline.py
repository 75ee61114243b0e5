"""TimelineRecorder, the timeline table's round trip, and load_report's top-level re-export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import tcptrace
from tcptrace.analysis import timeline_grid
from tcptrace.errors import ReportError, UsageError
from tcptrace.events import TcpState
from tcptrace.report import TABLES, TimelineRecorder, load_report, write_report
from tcptrace.report.summary import UNKNOWN_STACK_KEY
from tcptrace.sockets import StackStatus
from tests.unit.analysis_data import CLIENT, SERVER, demo_connections, write_demo_report
from tests.unit.test_report_io import make_conn, run_meta

NOW = 1_700_000_100.0


def rows(rec: TimelineRecorder) -> list[dict[str, object]]:
    columns = rec.columns()
    return [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]


def test_sample_counts_open_and_flagged_per_pid_and_site() -> None:
    rec = TimelineRecorder()
    old = make_conn(key=1, opened_at=NOW - 60, state=TcpState.CLOSE_WAIT)
    young = make_conn(key=2, opened_at=NOW - 5)
    other_pid = make_conn(key=3, pid=7, comm="other", opened_at=NOW - 40)
    closed = make_conn(key=4, closed_at=NOW - 1)  # ignored: not open
    listener = make_conn(key=5, state=TcpState.LISTEN, stack=("main", "listen"))
    rec.sample(NOW, [old, young, other_pid, closed, listener], threshold_s=30.0)
    by_pair = {(r["pid"], r["call_site"]): r for r in rows(rec)}
    assert by_pair[(100, "main;handler;connect")] == {
        "t": NOW,
        "pid": 100,
        "comm": "app",
        "call_site": "main;handler;connect",
        "open_count": 2,
        "flagged_count": 1,
        "oldest_age_s": 60.0,
    }
    assert by_pair[(7, "main;handler;connect")]["flagged_count"] == 1
    assert by_pair[(100, "main;listen")]["open_count"] == 1
    assert by_pair[(100, "main;listen")]["flagged_count"] == 0  # listeners are never leaks
    assert len(by_pair) == 3


def test_placeholder_call_site_for_preexisting() -> None:
    rec = TimelineRecorder()
    pre = make_conn(opened_at=None, stack=(), stack_status=StackStatus.UNKNOWN)
    rec.sample(NOW, [pre], 30.0)
    assert [r["call_site"] for r in rows(rec)] == [UNKNOWN_STACK_KEY]


def test_rows_are_sparse_with_a_zero_row_after_the_last_close() -> None:
    rec = TimelineRecorder()
    a = make_conn(key=1, stack=("a",), opened_at=NOW)
    b = make_conn(key=2, stack=("b",), opened_at=NOW + 1)
    rec.sample(NOW + 0.5, [a], 30.0)
    rec.sample(NOW + 1.5, [a, b], 30.0)
    rec.sample(NOW + 2.5, [b], 30.0)  # a closed: one row with 0
    rec.sample(NOW + 3.5, [b], 30.0)  # a: no row
    rec.sample(NOW + 4.5, [], 30.0)  # b closed: one row with 0
    rec.sample(NOW + 5.5, [], 30.0)  # nothing open: no row, but a sample time
    rec.sample(NOW + 6.5, [a], 30.0)  # a again
    got = rows(rec)
    assert [(r["t"], r["call_site"], r["open_count"]) for r in got] == [
        (NOW + 0.5, "a", 1),
        (NOW + 1.5, "a", 1),
        (NOW + 1.5, "b", 1),
        (NOW + 2.5, "a", 0),
        (NOW + 2.5, "b", 1),
        (NOW + 3.5, "b", 1),
        (NOW + 4.5, "b", 0),
        (NOW + 6.5, "a", 1),
    ]
    assert got[3]["oldest_age_s"] is None and got[0]["oldest_age_s"] == 0.5
    assert rec.sample_times() == [NOW + 0.5 + i for i in range(7)]


def test_rows_do_not_grow_with_processes_that_came_and_went() -> None:
    # issue 7 (soak): the dense grid of version 1 had a row per sample for every
    # (pid, call site) ever seen: 200 short-lived children x 1000 samples = 200,000
    # rows. Sparse, each child costs its own samples plus one zero row.
    rec = TimelineRecorder()
    children = [make_conn(key=i, pid=1000 + i, opened_at=NOW + 5 * i) for i in range(200)]
    for s in range(1000):
        now = NOW + s
        rec.sample(now, [c for i, c in enumerate(children) if 5 * i <= s < 5 * i + 3], 30.0)
    got = rows(rec)
    assert len(got) == 200 * (3 + 1)
    assert [r["open_count"] for r in got if r["pid"] == 1007] == [1, 1, 1, 0]
    assert rec.sample_count == 1000


def test_frame_has_the_declared_columns_and_dtypes() -> None:
    rec = TimelineRecorder()
    rec.sample(NOW, [make_conn(opened_at=NOW - 1)], 30.0)
    rec.sample(NOW + 1, [], 30.0)
    frame = rec.frame()
    assert list(frame.columns) == [c.name for c in TABLES["timeline"]]
    assert [str(t) for t in frame.dtypes] == [c.dtype for c in TABLES["timeline"]]
    assert frame["open_count"].tolist() == [1, 0]
    assert frame["oldest_age_s"].isna().tolist() == [False, True]


def test_thinning_bounds_samples_and_keeps_first_and_last() -> None:
    rec = TimelineRecorder(max_samples=10)
    conn = make_conn(opened_at=0.0, first_seen=0.0)
    for i in range(101):
        rec.sample(float(i), [conn], 30.0)
    times = [float(str(r["t"])) for r in rows(rec)]
    assert rec.sample_times()[0] == 0.0 and rec.sample_times()[-1] == 100.0
    assert rec.sample_count <= 10
    assert times[0] == 0.0 and times[-1] == 100.0
    assert times == sorted(times)
    with pytest.raises(ValueError):
        TimelineRecorder(max_samples=1)


def test_timeline_round_trips_through_parquet_and_csv(tmp_path: Path) -> None:
    out = write_demo_report(tmp_path / "r")
    from_parquet = load_report(out).timeline
    assert list(from_parquet.columns) == [c.name for c in TABLES["timeline"]]
    assert [str(t) for t in from_parquet.dtypes] == [c.dtype for c in TABLES["timeline"]]
    assert from_parquet["t"].nunique() == 7  # 0..5 s every second, plus the final sample at 6 s
    assert set(from_parquet["pid"]) == {CLIENT, SERVER}
    last = from_parquet[from_parquet["t"] == from_parquet["t"].max()]
    assert int(last["open_count"].sum()) == len(load_report(out).open_sockets)
    for table in TABLES:
        (out / f"{table}.parquet").unlink()
    from_csv = load_report(out).timeline
    pd.testing.assert_frame_equal(from_parquet, from_csv)


def test_report_without_timeline_in_meta_loads_with_an_empty_one(tmp_path: Path) -> None:
    # A report written before the timeline table existed (same schema version).
    write_report(tmp_path, [make_conn()], NOW, 30.0, run_meta())
    for ext in ("csv", "parquet"):
        (tmp_path / f"timeline.{ext}").unlink()
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["files"] = [f for f in meta["files"] if not f.startswith("timeline.")]
    del meta["tables"]["timeline"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    report = load_report(tmp_path)
    assert report.timeline.empty
    assert list(report.timeline.columns) == [c.name for c in TABLES["timeline"]]


def test_timeline_listed_but_missing_is_refused(tmp_path: Path) -> None:
    write_report(tmp_path, [make_conn()], NOW, 30.0, run_meta())
    for ext in ("csv", "parquet"):
        (tmp_path / f"timeline.{ext}").unlink()
    with pytest.raises(ReportError, match=r"neither timeline\.parquet nor timeline\.csv"):
        load_report(tmp_path)


def test_truncated_timeline_csv_is_refused(tmp_path: Path) -> None:
    out = write_demo_report(tmp_path / "r")
    (out / "timeline.parquet").unlink()
    lines = (out / "timeline.csv").read_text().splitlines(keepends=True)
    (out / "timeline.csv").write_text("".join(lines[:5]))
    with pytest.raises(ReportError, match=r"timeline .* rows but meta\.json says"):
        load_report(out)


def test_top_level_load_report_is_lazy() -> None:
    assert tcptrace.load_report is load_report
    code = (
        "import sys, tcptrace; "
        "assert 'pandas' not in sys.modules and 'pyarrow' not in sys.modules; "
        "tcptrace.load_report; assert 'pandas' in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    with pytest.raises(AttributeError):
        _ = tcptrace.no_such_thing


def test_report_accessors(tmp_path: Path) -> None:
    report = load_report(write_demo_report(tmp_path / "r", losses={"events_lost": 3}))
    assert report.threshold_s == 2.0
    assert report.losses == {"events_lost": 3}
    assert report.extra["fd_count"]["start"] == {str(SERVER): 3, str(CLIENT): 4}


def test_replayed_sockets_match_final_state() -> None:
    # Guards the fixture itself: leaked client sockets stay open, proper ones close.
    conns = demo_connections(leak=3, ok=2)
    client = [c for c in conns if c.pid == CLIENT and c.direction.value == "connect"]
    assert sum(c.is_open for c in client) == 3
    assert all(dataclasses.replace(c).stack for c in client)


def test_timeline_grid_has_every_sample_and_zeros(tmp_path: Path) -> None:
    rec = TimelineRecorder()
    a = make_conn(key=1, stack=("a",), opened_at=NOW)
    rec.sample(NOW, [], 30.0)  # nothing open yet: no row
    rec.sample(NOW + 1, [a], 30.0)
    rec.sample(NOW + 2, [], 30.0)  # a closed: a zero row
    rec.sample(NOW + 3, [], 30.0)  # no row
    extra = {"timeline_sample_times": rec.sample_times()}
    write_report(tmp_path, [], NOW + 3, 30.0, run_meta(extra=extra), timeline=rec.frame())
    report = load_report(tmp_path)
    assert len(report.timeline) == 2
    grid = timeline_grid(report, by="call_site")
    assert [t.timestamp() for t in grid.index] == [NOW, NOW + 1, NOW + 2, NOW + 3]
    assert grid["a"].tolist() == [0, 1, 0, 0]
    assert timeline_grid(report, by="pid")[100].tolist() == [0, 1, 0, 0]
    with pytest.raises(UsageError, match="by must be"):
        timeline_grid(report, by="state")


def test_fractional_sample_times_match_rows_after_csv_and_parquet(tmp_path: Path) -> None:
    # time.time() values: meta.json keeps the float, the t column microseconds. Both
    # are compared as integer microseconds, so no sample appears twice in the grid.
    start = 1_700_000_000.123456789
    rec = TimelineRecorder()
    a = make_conn(key=1, stack=("a",), opened_at=start)
    for i in range(5):
        rec.sample(start + i * 1.000000371, [a] if i % 2 else [], 30.0)
    extra = {"timeline_sample_times": rec.sample_times()}
    write_report(tmp_path, [], start + 5, 30.0, run_meta(extra=extra), timeline=rec.frame())
    from_parquet = timeline_grid(load_report(tmp_path))
    for table in TABLES:
        (tmp_path / f"{table}.parquet").unlink()
    from_csv = timeline_grid(load_report(tmp_path))
    for grid in (from_parquet, from_csv):
        assert len(grid) == 5
        assert grid["a"].tolist() == [0, 1, 0, 1, 0]
