"""Targets that go away: tcptrace notices, closes their ledgers, writes the report,
and never mistakes a new process that got the same pid for its target.

The pid is reused for real: the kernel hands out pid N+1 after the last pid it
gave (/proc/sys/kernel/ns_last_pid, writable by root), so the test sets it to
N-1 right after the target died and starts the impostor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import build, start
from tests.kernel.trust import CliTrace, kill_quietly, meta_of

pytestmark = pytest.mark.usefixtures("root")

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


def spawn_with_pid(pid: int, argv: Sequence[str], attempts: int = 200) -> subprocess.Popen[str]:
    """Start `argv` as process `pid` (free, i.e. its previous owner was reaped)."""
    for _ in range(attempts):
        NS_LAST_PID.write_text(str(pid - 1))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if proc.pid == pid:
            return proc
        proc.kill()  # another process took the pid first: retry
        proc.wait()
    raise AssertionError(f"could not get pid {pid} in {attempts} attempts")


def test_all_targets_exit_report_written(tmp_path: Path) -> None:
    with start("accept_server", "--port", "0", "--count", "3", "--hold", "120") as server:
        port = str(server.ready["port"])
        out = tmp_path / "r"
        with CliTrace(["--pid", str(server.pid), "--output", str(out)]) as trace:
            trace.wait_for("probes attached")
            with start("dialer", "--port", port, "--count", "3", "--hold", "60"):
                server.wait_line("ACCEPTED")
                time.sleep(0.3)
                os.kill(server.pid, signal.SIGKILL)
                done = trace.wait(30)  # stops by itself
    assert done.returncode == 0, done.stderr
    assert "stopped: all traced processes exited" in done.stdout
    report = load_report(out)
    assert report.meta["extra"]["stop_reason"] == "all traced processes exited"
    assert report.open_sockets.empty
    mine = report.connections[report.connections.pid == server.pid]
    # The listener (open before tracing) and the 3 accepted sockets, all closed by exit.
    assert len(mine) == 4
    assert set(mine.close_cause) == {"exit"}
    assert mine.closed_at.notna().all()
    assert report.meta["extra"]["fd_count"]["end"] == {str(server.pid): None}


def test_reused_pid_is_not_the_target_trace_ends(tmp_path: Path) -> None:
    dialer = str(build("dialer"))
    with start("accept_server", "--port", "0", "--count", "50", "--hold", "120") as other:
        other_port = str(other.ready["port"])
        victim = subprocess.Popen(["sleep", "120"])
        out = tmp_path / "r"
        impostor: subprocess.Popen[str] | None = None
        try:
            with CliTrace(["--pid", str(victim.pid), "--output", str(out)]) as trace:
                trace.wait_for("probes attached")
                victim.kill()
                victim.wait()  # reaped: its pid is free
                impostor = spawn_with_pid(
                    victim.pid, [dialer, "--port", other_port, "--count", "5", "--hold", "60"]
                )
                reused_while_tracing = trace.proc is not None and trace.proc.poll() is None
                assert impostor.stdout is not None
                assert impostor.stdout.readline().startswith("READY ")
                # The pid is alive again, but it is not the process we were asked to trace.
                done = trace.wait(20)
        finally:
            if impostor is not None:
                kill_quietly(impostor.pid)
                impostor.wait()
    assert reused_while_tracing
    assert done.returncode == 0, done.stderr
    assert "stopped: all traced processes exited" in done.stdout
    report = load_report(out)
    # Nothing of the impostor: no socket to the other server, no fd count of its.
    assert not (report.connections.rport == int(other_port)).any()
    assert report.open_sockets.empty
    assert meta_of(out)["extra"]["fd_count"]["end"] == {str(victim.pid): None}


def test_reused_pid_not_mixed_into_the_old_ledger_while_tracing_goes_on(tmp_path: Path) -> None:
    dialer = str(build("dialer"))
    with start("accept_server", "--port", "0", "--count", "50", "--hold", "120") as server:
        port = str(server.ready["port"])
        with start("dialer", "--port", port, "--count", "2", "--hold", "120") as old, \
                start("dialer", "--port", port, "--count", "1", "--hold", "120") as keeper:
            out = tmp_path / "r"
            impostor: subprocess.Popen[str] | None = None
            try:
                with CliTrace(["--pid", str(old.pid), "--pid", str(keeper.pid),
                               "--output", str(out)]) as trace:
                    trace.wait_for("probes attached")
                    # The start-up snapshot of open sockets follows that line by a few ms.
                    time.sleep(1.0)
                    old_pid = old.pid
                    old.proc.kill()
                    old.proc.wait()
                    impostor = spawn_with_pid(
                        old_pid, [dialer, "--port", port, "--count", "4", "--hold", "60"]
                    )
                    assert impostor.stdout is not None
                    ready = impostor.stdout.readline()
                    assert ready.startswith("READY "), ready
                    time.sleep(2.5)  # a few scans and a preexisting refresh
                    assert trace.proc is not None and trace.proc.poll() is None
                    trace.signal(signal.SIGINT)
                    done = trace.wait(60)
            finally:
                if impostor is not None:
                    kill_quietly(impostor.pid)
                    impostor.wait()
    assert done.returncode == 0, done.stderr
    report = load_report(out)
    old_rows = report.connections[report.connections.pid == old_pid]
    # The old dialer's 2 connections (open before tracing), closed when it died...
    assert len(old_rows) == 2
    assert old_rows.closed_at.notna().all()
    # ...and none of the impostor's 4, although they carry the same pid.
    assert report.open_sockets[report.open_sockets.pid == old_pid].empty
    keeper_rows = report.open_sockets[report.open_sockets.pid == keeper.pid]
    assert len(keeper_rows) == 1
    fds = meta_of(out)["extra"]["fd_count"]["end"]
    assert fds[str(old_pid)] is None and fds[str(keeper.pid)] is not None
