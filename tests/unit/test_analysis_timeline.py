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
from tcptrace.errors import ReportError
from tcptrace.events import TcpState
from tcptrace.report import TABLES, TimelineRecorder, load_report, write_report
from tcptrace.report.summary import UNKNOWN_STACK_KEY
from tcptrace.sockets import StackStatus
from tests.unit.analysis_data import CLIENT, SERVER, demo_connections, write_demo_report
from tests.unit.test_report_io import make_conn, run_meta

NOW = 1_700_000_100.0


def test_sample_counts_open_and_flagged_per_pid_and_site() -> None:
    rec = TimelineRecorder()
    old = make_conn(key=1, opened_at=NOW - 60, state=TcpState.CLOSE_WAIT)
    young = make_conn(key=2, opened_at=NOW - 5)
    other_pid = make_conn(key=3, pid=7, comm="other", opened_at=NOW - 40)
    closed = make_conn(key=4, closed_at=NOW - 1)  # ignored: not open
    listener = make_conn(key=5, state=TcpState.LISTEN, stack=("main", "listen"))
    rec.sample(NOW, [old, young, other_pid, closed, listener], threshold_s=30.0)
    rows = {(r["pid"], r["call_site"]): r for r in rec.rows()}
    assert rows[(100, "main;handler;connect")] == {
        "t": NOW,
        "pid": 100,
        "comm": "app",
        "call_site": "main;handler;connect",
        "open_count": 2,
        "flagged_count": 1,
        "oldest_age_s": 60.0,
    }
    assert rows[(7, "main;handler;connect")]["flagged_count"] == 1
    assert rows[(100, "main;listen")]["open_count"] == 1
    assert rows[(100, "main;listen")]["flagged_count"] == 0  # listeners are never leaks
    assert len(rows) == 3


def test_placeholder_call_site_for_preexisting() -> None:
    rec = TimelineRecorder()
    pre = make_conn(opened_at=None, stack=(), stack_status=StackStatus.UNKNOWN)
    rec.sample(NOW, [pre], 30.0)
    assert [r["call_site"] for r in rec.rows()] == [UNKNOWN_STACK_KEY]


def test_grid_is_dense_and_back_filled() -> None:
    rec = TimelineRecorder()
    a = make_conn(key=1, stack=("a",), opened_at=NOW)
    b = make_conn(key=2, stack=("b",), opened_at=NOW + 1)
    rec.sample(NOW + 0.5, [a], 30.0)
    rec.sample(NOW + 1.5, [a, b], 30.0)
    rec.sample(NOW + 2.5, [b], 30.0)  # a closed: still gets a row, with 0
    rows = rec.rows()
    assert [(r["t"], r["call_site"], r["open_count"]) for r in rows] == [
        (NOW + 0.5, "a", 1),
        (NOW + 0.5, "b", 0),  # back-filled: b did not exist yet
        (NOW + 1.5, "a", 1),
        (NOW + 1.5, "b", 1),
        (NOW + 2.5, "a", 0),
        (NOW + 2.5, "b", 1),
    ]
    assert rows[1]["oldest_age_s"] is None and rows[0]["oldest_age_s"] == 0.5


def test_thinning_bounds_samples_and_keeps_first_and_last() -> None:
    rec = TimelineRecorder(max_samples=10)
    conn = make_conn(opened_at=0.0, first_seen=0.0)
    for i in range(101):
        rec.sample(float(i), [conn], 30.0)
    times = [float(str(r["t"])) for r in rec.rows()]
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
