"""The connections history when its disk fails during the trace (issue 7), without root.

The failures are real: RLIMIT_FSIZE makes the kernel refuse to grow a file past
a size (EFBIG, the way a full disk refuses with ENOSPC), for this process only
and with no privilege needed. Python ignores SIGXFSZ, so the write just fails.
tests/kernel/test_trust_disk_fills.py does the same with a full tmpfs and the CLI.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tcptrace.errors import ReportError
from tcptrace.history import ConnectionHistory, death_rows, split_records
from tcptrace.report import SCHEMA_VERSION, RunMeta, load_report, write_report
from tcptrace.report.schema import connections_frame
from tcptrace.rescue import FALLBACK_ENV, write_report_or_rescue
from tests.unit.test_history import raw_death, stacks, to_epoch
from tests.unit.test_trust_rescue import _conn

NOW = time.time()


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _rows(n: int, first: int = 0) -> pd.DataFrame:
    """n closed connections; row i lasted i+1 seconds, so rows are told apart by duration."""
    raw = b"".join(raw_death(0x1000 + i, 1.0, 2.0 + i) for i in range(first, first + n))
    deaths, _ = split_records(raw)
    return death_rows(deaths, to_epoch, stacks, {})


def _meta() -> RunMeta:
    return RunMeta("t", SCHEMA_VERSION, "h", "k", "tracepoint", (100,), 1.0, NOW - 10, NOW, {})


def _both_formats(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """connections as loaded from the report (Parquet), and from its CSV file alone."""
    from_parquet = load_report(out).connections
    (out / "connections.parquet").rename(out / "hidden.parquet")
    try:
        from_csv = load_report(out).connections
    finally:
        (out / "hidden.parquet").rename(out / "connections.parquet")
    return from_parquet, from_csv


def _durations(frame: pd.DataFrame) -> list[float]:
    return sorted(float(d) for d in frame[frame.closed_at.notna()].duration_s)


def test_failed_batches_are_counted_and_later_ones_written(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    history = ConnectionHistory(out, flush_rows=100)
    history.append(_rows(100))
    history.sync()
    batch = (out / "connections.csv.part").stat().st_size
    with file_size_limit(int(batch * 2.5)):
        for i in range(1, 6):  # the second batch fits, then none does
            history.append(_rows(100, first=100 * i))
        history.sync()
        assert history.unwritten == 400
        assert history.rows == 200
        assert history.write_error == "File too large"
        assert history.losses == {"history_rows_unwritten": 400}
        # Cut back to the whole batches: no half batch is left in the part.
        assert (out / "connections.csv.part").stat().st_size < 2.5 * batch
    # Space again (the limit lifted): tracing went on, the next batch is written.
    history.append(_rows(100, first=600))
    history.sync()
    assert history.rows == 300 and history.unwritten == 400
    write_report(out, [], NOW, 1.0, _meta(), history=history)
    assert not list(out.glob("*.part"))
    from_parquet, from_csv = _both_formats(out)
    pd.testing.assert_frame_equal(from_parquet, from_csv)
    # Whole batches, each once: rows 0-199 and 600-699.
    assert _durations(from_parquet) == [float(i + 1) for i in [*range(200), *range(600, 700)]]


def test_a_failed_parquet_write_is_undone_and_the_parquet_rebuilt(tmp_path: Path) -> None:
    # One-row batches: the Parquet part (a row group each, KiBs) outgrows the CSV
    # part (~300 bytes a row), so the Parquet write fails after the CSV write of
    # the same batch succeeded. That batch must vanish from both.
    out = tmp_path / "r"
    out.mkdir()
    history = ConnectionHistory(out, flush_rows=1)
    with file_size_limit(24 * 1024):
        for i in range(40):
            history.append(_rows(1, first=i))
            history.sync()  # one row per batch (appends alone may merge batches)
    assert history.unwritten == 1  # the one batch the Parquet part could not take
    assert not (out / "connections.parquet.part").exists()  # given up, its space freed
    assert history.rows == 39
    write_report(out, [], NOW, 1.0, _meta(), history=history)
    from_parquet, from_csv = _both_formats(out)
    assert len(from_parquet) == 39
    pd.testing.assert_frame_equal(from_parquet, from_csv)


def test_a_final_write_that_fails_leaves_the_history_for_the_rescue(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    history = ConnectionHistory(out, flush_rows=100)
    history.append(_rows(200))
    history.sync()
    size = (out / "connections.csv.part").stat().st_size
    last = _rows(150, first=200)
    with file_size_limit(size + 1000), pytest.raises(ReportError, match="File too large"):
        history.finish(last)
    # Cut back: the final rows are not half in the part, so nothing is repeated below.
    assert (out / "connections.csv.part").stat().st_size == size
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    written, rows = history.copy_to(fallback, last)
    assert rows == 350
    assert sorted(p.name for p in written) == ["connections.csv", "connections.parquet"]
    import pyarrow.parquet as pq

    copied = pq.read_table(fallback / "connections.parquet").to_pandas()
    assert _durations(copied) == [float(i + 1) for i in range(350)]


def test_a_report_file_failing_after_the_history_was_finished_is_rescued_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "timeline.csv").mkdir()  # written after connections: the rename onto it fails
    history = ConnectionHistory(out, flush_rows=100)
    history.append(_rows(250))
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    monkeypatch.setenv(FALLBACK_ENV, str(fallback))
    warnings: list[str] = []
    paths = write_report_or_rescue(
        out, [_conn(0)], NOW, 1.0, _meta(), history=history, warn=warnings.append
    )
    assert paths.directory.parent == fallback and len(warnings) == 1
    report = load_report(paths.directory)
    # 250 streamed rows and the open socket, each once, though the history had
    # already been finished (renamed into place) in the original directory.
    assert len(report.connections) == 251
    assert _durations(report.connections) == [float(i + 1) for i in range(250)]
    assert report.meta["extra"]["rescued"]["connections_rows_written"] == 251
    assert not (out / "connections.csv").exists() and not list(out.glob("*.part"))
    assert connections_frame([], 0.0).columns.tolist() == report.connections.columns.tolist()
