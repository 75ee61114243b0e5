"""A bug of ours inside the trace loop does not cost the report (issue 7).

The bug is injected through the real CLI with TCPTRACE_INJECT_FAULT=loop:N
(testing only: the trace loop raises after N iterations, ~0.1 s each) while a
real server holds real leaked connections. The report of what was traced until
then must be complete and loadable, marked as ended by an internal error; the
traceback is in a file next to it; one line names that file; the exit code is
12; and nothing of ours is left in the kernel.
"""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import start
from tests.kernel.trust import CliTrace, bpf_ids_of, tracefs_probe_entries, wait_bpf_gone

pytestmark = pytest.mark.usefixtures("root")

ITERATIONS = 60  # ~6 s after attach: the dialer's connections are in by then


def test_internal_error_in_the_loop_writes_the_report_and_the_traceback(tmp_path: Path) -> None:
    out = tmp_path / "r"
    summary = f"InjectedFault: injected after {ITERATIONS} trace-loop iterations"
    with (
        start("accept_server", "--port", "0", "--count", "3", "--hold", "120") as srv,
        CliTrace(
            ["--pid", str(srv.pid), "--output", str(out), "--threshold", "1s"],
            env={"TCPTRACE_INJECT_FAULT": f"loop:{ITERATIONS}"},
        ) as trace,
    ):
        trace.wait_for("probes attached")
        ids = bpf_ids_of(trace.pid)
        assert ids.progs and ids.maps, ids
        attached_at = time.monotonic()
        time.sleep(0.5)  # the start-up snapshot follows that line: connect after it
        with start("dialer", "--port", str(srv.ready["port"]), "--count", "3", "--hold", "120"):
            srv.wait_line("ACCEPTED")
            assert time.monotonic() - attached_at < ITERATIONS * 0.1 - 1, "too slow"
            done = trace.wait(60)  # the injected bug ends the trace

    assert done.returncode == 12, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    traceback_file = out / "internal-error.txt"
    errors = [line for line in done.stderr.splitlines() if line.startswith("tcptrace: error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0] == (
        f"tcptrace: error: internal error during the trace ({summary}); the report of what"
        f" was traced until then is in {out}; traceback in {traceback_file}"
        " (please report it with that file)"
    )
    assert f"stopped: internal error: {summary}" in done.stdout
    assert f"report written to {out}" in done.stdout

    # The report is whole (load_report checks every table against meta.json) and
    # holds what the ledger held: the listener and the 3 leaked accepted sockets.
    report = load_report(out)
    extra = report.meta["extra"]
    assert extra["stop_reason"] == f"internal error: {summary}"
    assert extra["internal_error"] == {"error": summary, "traceback_file": "internal-error.txt"}
    mine = report.open_sockets[report.open_sockets.pid == srv.pid]
    assert sorted(mine.state) == ["ESTABLISHED"] * 3 + ["LISTEN"], mine
    accepted = mine[mine.direction == "accept"]
    assert accepted.leak.all() and accepted["stack"].str.contains("accept_one").all()
    assert report.meta["losses"]["history_rows_unwritten"] == 0

    text = traceback_file.read_text()
    assert text.startswith("tcptrace ") and "Traceback (most recent call last)" in text
    assert "run_trace" in text and summary in text
    assert stat.S_IMODE(traceback_file.stat().st_mode) == 0o600

    # Detached, and gone from the kernel with the process: no program, map or link left.
    assert not wait_bpf_gone(ids), "BPF objects left after the internal error"
    assert tracefs_probe_entries(trace.pid) == []
