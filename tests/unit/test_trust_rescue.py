"""A report that cannot be written where asked is written whole elsewhere (issue 7).

The failures are real file-system failures (a path under a regular file, a
meta.json that is a directory), not mocks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tcptrace.errors import ReportError
from tcptrace.events import Direction, TcpState
from tcptrace.history import ConnectionHistory, death_rows, split_records
from tcptrace.report import SCHEMA_VERSION, RunMeta, load_report
from tcptrace.rescue import FALLBACK_ENV, write_report_or_rescue
from tcptrace.sockets import Connection, StackStatus
from tests.unit.test_history import raw_death, stacks, to_epoch

NOW = time.time()


def _meta() -> RunMeta:
    return RunMeta("t", SCHEMA_VERSION, "h", "k", "tracepoint", (100,), 1.0, NOW - 10, NOW, {})


def _conn(i: int) -> Connection:
    return Connection(
        key=i + 1, pid=100, tid=100, comm="c", fd=3 + i, family="ipv4", laddr="127.0.0.1",
        lport=40000 + i, raddr="127.0.0.1", rport=80, state=TcpState.ESTABLISHED,
        direction=Direction.CONNECT, opened_at=NOW - 5, first_seen=NOW - 5,
        stack=("main", "leak"), stack_status=StackStatus.OK,
    )


def test_unwritable_target_goes_to_the_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    monkeypatch.setenv(FALLBACK_ENV, str(fallback))
    warnings: list[str] = []
    wanted = blocker / "report"  # mkdir fails: ENOTDIR
    paths = write_report_or_rescue(
        wanted, [_conn(0), _conn(1)], NOW, 1.0, _meta(), warn=warnings.append
    )
    assert paths.directory.parent == fallback
    assert paths.directory.name.startswith("report.rescued.")
    assert len(warnings) == 1 and f"could not write the report to {wanted}" in warnings[0]
    report = load_report(paths.directory)
    assert len(report.open_sockets) == 2
    assert report.meta["extra"]["rescued"]["requested_dir"] == str(wanted)
    assert "Not a directory" in report.meta["extra"]["rescued"]["reason"]


def test_no_fallback_left_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv(FALLBACK_ENV, str(blocker))  # a file: no directory can go there
    with pytest.raises(ReportError) as info:
        write_report_or_rescue(blocker / "r", [_conn(0)], NOW, 1.0, _meta(), warn=lambda _: None)
    text = str(info.value)
    assert "could not be written to" in text and "nor to a fallback" in text
    assert FALLBACK_ENV in info.value.hint


def test_streamed_history_is_rescued_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    out.mkdir()
    history = ConnectionHistory(out, flush_rows=3)  # rows 0-5 streamed to part files
    deaths, _ = split_records(b"".join(raw_death(0x10 + i, 1.0, 2.0 + i) for i in range(8)))
    history.append(death_rows(deaths[:3], to_epoch, stacks, {}))
    history.sync()  # appends alone never wait for the writer thread
    history.append(death_rows(deaths[3:6], to_epoch, stacks, {}))
    history.sync()
    history.append(death_rows(deaths[6:], to_epoch, stacks, {}))  # rows 6-7 still in memory
    assert (out / "connections.csv.part").is_file()
    (out / "meta.json").mkdir()  # write_report cannot replace it: the write fails for real
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    monkeypatch.setenv(FALLBACK_ENV, str(fallback))
    paths = write_report_or_rescue(
        out, [_conn(0)], NOW, 1.0, _meta(), history=history, warn=lambda _: None
    )
    report = load_report(paths.directory)
    # 8 streamed or buffered deaths plus the open socket, each exactly once.
    assert len(report.connections) == 9
    ports = sorted(report.connections.lport.astype(int))
    assert ports == sorted([40000] * 8 + [40000])
    closed = report.connections[report.connections.closed_at.notna()]
    assert np.allclose(sorted(closed.duration_s), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    rescued = report.meta["extra"]["rescued"]
    assert rescued["connections_rows_written"] == 9
    # The failed attempt's part files were re-homed, so they left the original dir.
    assert not (out / "connections.csv.part").exists()
