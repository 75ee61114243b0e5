"""The disk under the report fills up during the trace, for real (issue 7).

A churn workload makes the real CLI stream tens of megabytes of connections
history to a small tmpfs, which fills up mid-trace. Tracing must go on; the
rows that could not be written are a counted loss (`history_rows_unwritten`,
in the terminal and in meta.json); at the end the report is written where asked
if it fits, else rescued whole to the fallback directory (exit 11); one line
says what happened to the history.

Sizes: a history row is ~500 bytes of CSV, a batch 20,000 rows or more (~10 MB
and ~0.6 MB of Parquet). 60,000 connections (120,000 rows) on a 24 MiB tmpfs
(18 MiB free while a 6 MiB ballast file is there): one to three batches fit, the
others meet a full disk, whatever the length of the stack paths in the rows.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import start
from tests.kernel.trust import CliTrace, Done, fill, tmpfs

pytestmark = pytest.mark.usefixtures("root")

CONNECTIONS = 60_000
UNWRITTEN = re.compile(r"\bhistory_rows_unwritten=(\d+)")


def _unwritten_in_terminal(lines: list[str]) -> int:
    found = [int(n) for line in lines for n in UNWRITTEN.findall(line)]
    assert found, "history_rows_unwritten not shown in the terminal"
    return found[-1]


def _wait_unwritten(trace: CliTrace, timeout: float = 90) -> None:
    """Until a periodic summary shows rows that could not be written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(int(n) > 0 for line in list(trace.out) for n in UNWRITTEN.findall(line)):
            return
        assert trace.proc is not None and trace.proc.poll() is None, trace.err
        time.sleep(0.2)
    raise AssertionError(f"the disk never filled:\n{trace.out[-20:]}")


def _trace_churn(
    out: Path, env: dict[str, str], *, fill_when_full: Path | None = None,
    ballast: Path | None = None,
) -> tuple[Done, list[str]]:
    """Trace a churn (and, with `ballast`, a sleeper that keeps the trace going).

    fill_when_full: once rows went unwritten, fill that file system to the brim.
    ballast: a file taking room from the start, deleted once rows went unwritten
    and the churn is done; then Ctrl-C: the report has room again at the end.
    """
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with start("churn", "--connections", str(CONNECTIONS), "--rate", "6000", "--ports",
                   "4", "--seconds", "120", "--start-delay-ms", "3000") as churn:
            pids = ["--pid", str(churn.pid)] + (["--pid", str(sleeper.pid)] if ballast else [])
            with CliTrace([*pids, "--output", str(out), "--interval", "1s"], env=env) as trace:
                trace.wait_for("probes attached")
                _wait_unwritten(trace)  # the disk filled up mid-trace
                if fill_when_full is not None:
                    fill(fill_when_full)  # and now nothing fits any more, the report neither
                if ballast is not None:
                    summary = churn.wait_line("DONE", timeout=120)
                    time.sleep(2)  # the last records drained
                    ballast.unlink()  # some room again: the report will fit
                    trace.signal(signal.SIGINT)
                done = trace.wait(180)  # without ballast churn exits: the trace ends by itself
            if ballast is None:
                summary = churn.wait_line("DONE")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert summary["connections"] == CONNECTIONS
    return done, trace.out


def _check_history(report_dir: Path, stdout: list[str]) -> tuple[int, int]:
    report = load_report(report_dir)  # whole: every table, rows as meta.json says
    losses = report.meta["losses"]
    unwritten = losses["history_rows_unwritten"]
    conns = report.connections[report.connections.direction.isin(["connect", "accept"])]
    written = len(conns)
    # Part of the history made it, part met the full disk, and the terminal says so.
    assert unwritten > 0 and written > 0, (written, unwritten)
    assert _unwritten_in_terminal(stdout) == unwritten
    assert report.meta["extra"]["history_write_error"] == "No space left on device"
    # Every socket is a row of the report, a counted unwritten row or a counted drop.
    dropped = losses["events_dropped"]
    assert written + unwritten + dropped >= 2 * CONNECTIONS, (written, unwritten, dropped)
    assert written + unwritten <= 2 * CONNECTIONS
    assert conns.closed_at.notna().all() and conns.duration_s.notna().all()
    return written, unwritten


def _history_line(stderr: str, unwritten: int, out: Path) -> None:
    lines = [line for line in stderr.splitlines() if "connections history" in line]
    assert len(lines) == 1, stderr
    assert lines[0] == (
        f"tcptrace: {unwritten} rows of the connections history could not be written to {out}"
        " during the trace (No space left on device); tracing went on, they are counted as"
        " history_rows_unwritten"
    )


def test_disk_fills_mid_trace_history_loss_counted_report_written(tmp_path: Path) -> None:
    fallback = tmp_path / "fallback"  # not used if all goes well; never /var/tmp
    fallback.mkdir()
    with tmpfs(tmp_path / "small", "24m") as small:
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * (6 << 20))
        out = small / "r"
        done, stdout = _trace_churn(out, {"TCPTRACE_FALLBACK_DIR": str(fallback)},
                                    ballast=ballast)
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr)
        assert "Traceback" not in done.stderr
        assert "stopped: SIGINT" in done.stdout
        assert f"report written to {out}" in done.stdout
        _, unwritten = _check_history(out, stdout)
        _history_line(done.stderr, unwritten, out)
        assert not list(out.glob("*.part"))
    assert list(fallback.iterdir()) == []


def test_disk_full_to_the_end_report_rescued_with_the_history(tmp_path: Path) -> None:
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    with tmpfs(tmp_path / "small", "24m") as small:
        out = small / "r"
        done, stdout = _trace_churn(out, {"TCPTRACE_FALLBACK_DIR": str(fallback)},
                                    fill_when_full=small)
        assert done.returncode == 11, (done.stdout[-3000:], done.stderr)
        assert "Traceback" not in done.stderr
        # The original directory holds no half report: every file the attempt began is gone.
        assert sorted(p.name for p in out.iterdir()) == []
    rescued = [p for p in fallback.iterdir() if p.name.startswith("r.rescued.")]
    assert len(rescued) == 1, list(fallback.iterdir())
    written, unwritten = _check_history(rescued[0], stdout)
    _history_line(done.stderr, unwritten, out)
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("tcptrace: error: "), done.stderr
    assert str(rescued[0]) in errors[0]
    assert f"report written to {rescued[0]}" in done.stdout
    meta = load_report(rescued[0]).meta
    assert meta["extra"]["rescued"]["requested_dir"] == str(out)
    assert "no space left" in meta["extra"]["rescued"]["reason"]
    # The streamed batches were re-homed from the full disk, with the final rows.
    rows = len(load_report(rescued[0]).connections)
    assert meta["extra"]["rescued"]["connections_rows_written"] == rows > written
