"""Overload: more events than the ring buffer holds, more open sockets than the
socket map holds, a full stack map. Each is counted, shown in the terminal and in
meta.json, and the report marks what could not be tracked instead of guessing.

The kernel maps are shrunk with the CLI's hidden options (--ringbuf-pages,
--max-sockets, --max-stacks) so real workloads overflow them in seconds.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import start
from tests.kernel.trust import CliTrace

pytestmark = pytest.mark.usefixtures("root")


def _terminal_counter(stdout: str, name: str) -> int:
    """The value of a loss counter in the final terminal summary."""
    found = re.findall(rf"\b{name}=(\d+)", stdout)
    assert found, f"{name} not shown in the terminal:\n{stdout}"
    return int(found[-1])


def test_socket_map_full_sockets_marked_untracked(tmp_path: Path) -> None:
    count, capacity = 20, 4
    with start("accept_server", "--port", "0", "--count", str(count), "--hold", "120") as srv:
        out = tmp_path / "r"
        with CliTrace(["--pid", str(srv.pid), "--output", str(out), "--threshold", "500ms",
                       "--max-sockets", str(capacity)]) as trace:
            trace.wait_for("probes attached")
            with start("dialer", "--port", str(srv.ready["port"]), "--count", str(count),
                       "--hold", "60"):
                srv.wait_line("ACCEPTED")
                time.sleep(1.5)  # past the threshold, and a few scans
                trace.signal(signal.SIGINT)
                done = trace.wait(60)
    assert done.returncode == 0, done.stderr
    report = load_report(out)
    losses = report.meta["losses"]
    assert losses["map_full"] == count - capacity
    assert losses["sockets_untracked"] == count - capacity
    assert _terminal_counter(done.stdout, "map_full") == count - capacity
    assert "results may be incomplete" in done.stdout
    accepted = report.open_sockets[report.open_sockets.direction == "accept"]
    assert len(accepted) == count  # every socket is shown...
    untracked = accepted[accepted.untracked]
    assert len(untracked) == count - capacity  # ...the ones the map could not hold marked
    assert not untracked.leak.any()  # and never called leaks: their fate is unknown
    tracked = accepted[~accepted.untracked]
    assert len(tracked) == capacity and tracked.leak.all()


def test_stack_map_full_stacks_marked_failed(tmp_path: Path) -> None:
    n = 300
    with start("churn", "--connections", str(n), "--ports", "2", "--rate", "300",
               "--seconds", "60", "--start-delay-ms", "5000") as churn:
        out = tmp_path / "r"
        with CliTrace(["--pid", str(churn.pid), "--output", str(out), "--max-stacks", "1"]) \
                as trace:
            trace.wait_for("probes attached")
            done = trace.wait(120)  # churn exits when done: the trace ends by itself
    assert done.returncode == 0, done.stderr
    report = load_report(out)
    failed = report.meta["losses"]["ustack_failed"]
    # One bucket: the first stack (connect or accept) holds it, the other one never fits.
    assert failed == n, report.meta["losses"]
    assert _terminal_counter(done.stdout, "ustack_failed") == n
    conns = report.connections[report.connections.direction.isin(["connect", "accept"])]
    assert len(conns) == 2 * n
    by_status = {
        direction: sorted(set(conns[conns.direction == direction].stack_status))
        for direction in ("connect", "accept")
    }
    # One side kept its stack, the other is marked as not captured.
    assert sorted(by_status.values()) == [["failed"], ["ok"]], by_status
    assert (conns[conns.stack_status == "failed"]["stack"] == "").all()  # no stack invented


def test_ring_buffer_overflow_counted(tmp_path: Path) -> None:
    n = 20000
    with start("churn", "--connections", str(n), "--ports", "4", "--seconds", "120",
               "--start-delay-ms", "5000") as churn:
        out = tmp_path / "r"
        with CliTrace(["--pid", str(churn.pid), "--output", str(out), "--ringbuf-pages", "1"]) \
                as trace:
            trace.wait_for("probes attached")
            done = trace.wait(180)
            summary = churn.wait_line("DONE")
    assert done.returncode == 0, done.stderr
    assert summary["connections"] == n
    report = load_report(out)
    dropped = report.meta["losses"]["events_dropped"]
    assert dropped > 0, "a one-page ring buffer must overflow at this rate"
    assert _terminal_counter(done.stdout, "events_dropped") == dropped
    assert "results may be incomplete" in done.stdout
    # Nothing vanished unaccounted: every socket is a row of the report or a counted drop.
    sockets = len(report.connections[report.connections.direction.isin(["connect", "accept"])])
    assert sockets < 2 * n
    assert sockets + dropped >= 2 * n, (sockets, dropped)
