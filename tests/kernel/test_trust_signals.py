"""Ctrl-C and SIGTERM at any moment write a complete report; files are whole or absent.

"Any moment" starts when tcptrace's first line of code has run (tcptrace.entry
installs its signal latch before importing anything heavy; before that the
Python interpreter itself is still starting). The tests wait for that point by
reading the process's caught-signal mask, then signal after a sweep of delays
that lands in the imports, the start-up checks, the BPF compile (the worker
thread) and the tracing loop.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import RunningWorkload, start
from tests.kernel.trust import TCPTRACE, CliTrace, kill_quietly, meta_of

pytestmark = pytest.mark.usefixtures("root")

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[RunningWorkload, dict[str, object]]]:
    """An untraced-at-birth server holding 3 accepted connections (preexisting sockets)."""
    with start("accept_server", "--port", "0", "--count", "3", "--hold", "300") as srv:
        port = str(srv.ready["port"])
        with start("dialer", "--port", port, "--count", "3", "--hold", "300"):
            accepted = srv.wait_line("ACCEPTED")
            yield srv, accepted


def _wait_latched(pid: int, timeout: float = 10) -> None:
    """Until the process catches SIGTERM: tcptrace.entry's latch is installed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))
                     .split()[1], 16)
        if caught & SIGTERM_BIT:
            return
        time.sleep(0.002)
    raise AssertionError(f"pid {pid} never installed its signal latch")


def _check_complete(out: Path, sig: signal.Signals, server_pid: int, stdout: str) -> bool:
    """The report is whole and holds the server's sockets; returns whether probes attached."""
    report = load_report(out)  # refuses a report with a missing or truncated table
    meta = report.meta
    assert meta["extra"]["stop_reason"] == sig.name
    mine = report.open_sockets[report.open_sockets.pid == server_pid]
    # Opened before tracing: in the report from the start-up snapshot, attached or not.
    assert sorted(mine.state) == ["ESTABLISHED"] * 3 + ["LISTEN"], mine
    attached = bool(meta["losses"].get("probes_not_attached", 0) == 0)
    if not attached:
        assert "stopped before the probes were attached" in stdout
    return attached


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_any_moment_writes_a_complete_report(
    tmp_path: Path, server: tuple[RunningWorkload, dict[str, object]], sig: signal.Signals
) -> None:
    srv, _ = server
    outcomes: dict[str, bool] = {}
    # Delays after the latch is in place, then once the probes are attached.
    for when in ("0.0", "0.05", "0.15", "0.3", "0.5", "0.8", "1.2", "attached"):
        out = tmp_path / f"r{when}"
        with CliTrace(["--pid", str(srv.pid), "--output", str(out)]) as trace:
            _wait_latched(trace.pid)
            if when == "attached":
                trace.wait_for("probes attached")
            else:
                time.sleep(float(when))
            trace.signal(sig)
            done = trace.wait(120)
        assert done.returncode == 0, (when, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        outcomes[when] = _check_complete(out, sig, srv.pid, done.stdout)
    # The sweep covered both sides of the attach: stopped early and stopped while tracing.
    assert not outcomes["0.0"] and outcomes["attached"], outcomes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_while_bpf_compiles(
    tmp_path: Path, server: tuple[RunningWorkload, dict[str, object]], sig: signal.Signals
) -> None:
    srv, _ = server
    out = tmp_path / "r"
    with CliTrace(["--pid", str(srv.pid), "--output", str(out)]) as trace:
        # The progress line is printed as the compile starts, in the worker thread.
        trace.wait_for("compiling and loading BPF programs...", stream="err")
        trace.signal(sig)
        done = trace.wait(120)
    assert done.returncode == 0, done.stderr
    assert "stop requested after" in done.stderr and "of compiling" in done.stderr
    assert not _check_complete(out, sig, srv.pid, done.stdout)
    # The compile it abandoned was finished and unloaded: nothing was attached.
    assert meta_of(out)["losses"]["probes_not_attached"] == 1


def test_progress_line_during_start_up(
    tmp_path: Path, server: tuple[RunningWorkload, dict[str, object]]
) -> None:
    srv, _ = server
    with CliTrace(["--pid", str(srv.pid), "--output", str(tmp_path / "r"),
                   "--duration", "1s"]) as trace:
        done = trace.wait(120)
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert lines[0] == "tcptrace: compiling and loading BPF programs..."
    assert lines[1].startswith("tcptrace: BPF programs compiled, loaded and attached in ")
    seconds = float(lines[1].rsplit(" ", 1)[1].rstrip("s"))
    assert 0 < seconds < 60


# -- atomic files ----------------------------------------------------------------------

_WRITER = r"""
import sys, time
from pathlib import Path
from tcptrace.events import Direction, TcpState
from tcptrace.report import SCHEMA_VERSION, RunMeta, write_report
from tcptrace.sockets import Connection, StackStatus

out, n = Path(sys.argv[1]), int(sys.argv[2])
now = time.time()
rows = [
    Connection(key=i + 1, pid=4242, tid=4242, comm="writer", fd=i % 1000, family="ipv4",
               laddr="127.0.0.1", lport=40000 + i % 20000, raddr="127.0.0.1", rport=80,
               state=TcpState.ESTABLISHED, direction=Direction.CONNECT, opened_at=now - 60,
               first_seen=now - 60, stack=("main", "serve", f"dial{i % 50}"),
               stack_status=StackStatus.OK,
               closed_at=None if i % 3 else now - 1)
    for i in range(n)
]
meta = RunMeta("t", SCHEMA_VERSION, "h", "k", "tracepoint", (4242,), 1.0, now - 60, now, {})
print("WRITING", flush=True)
while True:
    write_report(out, rows, now, 1.0, meta)
"""


def _assert_whole_or_absent(out: Path) -> None:
    """Every table file present parses to the end; meta.json present => loadable report."""
    for path in out.glob("*.parquet"):
        pq.read_table(path)  # raises on a truncated file (no footer)
    for path in out.glob("*.csv"):
        data = path.read_bytes()
        assert data.endswith(b"\n"), f"{path} is truncated"
        rows = list(csv.reader(data.decode().splitlines()))
        assert all(len(r) == len(rows[0]) for r in rows), f"{path} has a short row"
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        report = load_report(out)
        assert len(report.connections) == meta["tables"]["connections"]["rows"]


def test_reports_are_whole_or_absent_when_killed_while_writing(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a 30,000-row report in a loop, at 25 moments."""
    for i in range(25):
        out = tmp_path / f"r{i}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(out), "30000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "WRITING\n"
            time.sleep(0.05 + 0.09 * i)  # spread over several whole rewrites
        finally:
            kill_quietly(proc.pid)
            proc.wait()
        _assert_whole_or_absent(out)


def test_cli_killed_while_writing_its_report_leaves_no_truncated_file(tmp_path: Path) -> None:
    # A churning target fills the connections table, so writing takes a while.
    with start("churn", "--connections", "20000", "--ports", "4", "--seconds", "120",
               "--start-delay-ms", "1500") as churn:
        out = tmp_path / "r"
        with CliTrace(["--pid", str(churn.pid), "--output", str(out)]) as trace:
            trace.wait_for("probes attached")
            churn.wait_line("DONE", timeout=120)
            trace.signal(signal.SIGINT)
            trace.wait_for("stopped: SIGINT")  # printed right before the write
            time.sleep(0.05)
            kill_quietly(trace.pid)
            trace.wait(30)
    _assert_whole_or_absent(out)


def test_hangup_with_the_terminal_gone_still_writes_the_report(
    tmp_path: Path, server: tuple[RunningWorkload, dict[str, object]]
) -> None:
    """ssh dropped: SIGHUP, and nobody reads stdout any more."""
    srv, _ = server
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [TCPTRACE, "--pid", str(srv.pid), "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "probes attached" in line:
                break
        proc.stdout.close()  # the reader is gone: every later print fails
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 0
    finally:
        kill_quietly(proc.pid)
        proc.wait()
    _check_complete(out, signal.SIGHUP, srv.pid, stdout="")
