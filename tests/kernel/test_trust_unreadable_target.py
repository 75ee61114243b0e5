"""A target whose fds tcptrace can no longer read keeps its preexisting sockets open.

The real CLI runs as `nobody` without CAP_SYS_PTRACE (setpriv and ambient
capabilities, as in test_trust_capabilities) and traces a `--pid` target run by
`nobody` too, so its /proc/PID/fd is readable at start: the start-up snapshot
finds the 3 sockets it holds (a listener and both ends of a loopback connection)
as preexisting. Then the target turns itself non-dumpable
(prctl(PR_SET_DUMPABLE, 0)): its fd links can no longer be read by tcptrace.
The periodic re-check (every TraceOptions.preexisting_interval_s, 5 s, no CLI
option) must not take "cannot look" for "closed": the 3 sockets stay in
open_sockets as last seen, and meta.json counts them as preexisting_unverified.

The control: the target stays dumpable and closes one of its sockets. That one
is recorded closed by the app and preexisting_unverified is 0, so the re-check
does look, and can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tcptrace.report import load_report
from tests.kernel import test_trust_capabilities as caps
from tests.kernel.trust import kill_quietly

pytestmark = pytest.mark.usefixtures("root")

shared_dir = caps.shared_dir  # a report directory nobody may write into

# MINIMAL without CAP_SYS_PTRACE: another user's or a non-dumpable process's fd
# links are off limits, a dumpable process of our own user is not.
TRACER_CAPS = tuple(c for c in caps.MINIMAL if c != "sys_ptrace")
RECHECK_S = 5.0  # tcptrace.tracer.TraceOptions.preexisting_interval_s
DURATION_S = 15.0  # after the target changes (~1-2 s in), room for two re-checks and more

TARGET = r"""
import ctypes, json, socket, sys, time
mode = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL: never outlives the test
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4)
client = socket.create_connection(ls.getsockname())
server = ls.accept()[0]
fds = {"listener": ls.fileno(), "client": client.fileno(), "server": server.fileno()}
ports = {"listener": ls.getsockname()[1], "client": client.getsockname()[1],
         "server": server.getsockname()[1]}
print("READY " + json.dumps({"fds": fds, "ports": ports}), flush=True)
sys.stdin.readline()  # tcptrace took its start-up snapshot
if mode == "undumpable":
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0, as ssh-agent does
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    print("UNDUMPABLE", flush=True)
else:
    client.close()
    print("CLOSED", flush=True)
time.sleep(120)
"""

# Reads every fd link of a pid, as tcptrace's snapshot does (listdir, then readlink).
READ_FDS = r"""
import os, sys
d = f"/proc/{sys.argv[1]}/fd"
try:
    links = [os.readlink(os.path.join(d, n)) for n in os.listdir(d)]
except PermissionError as exc:
    print(f"denied: {exc}")
    sys.exit(13)
print(f"read {len(links)} links")
"""


def fds_readable_by_tracer(pid: int) -> bool:
    """Whether nobody with tcptrace's capabilities may read the fd links of `pid`."""
    done = subprocess.run(
        [*caps.as_nobody(TRACER_CAPS), sys.executable, "-c", READ_FDS, str(pid)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **caps.ENV},
        check=False,
    )
    assert done.returncode in (0, 13), (done.stdout, done.stderr)
    return done.returncode == 0


def _rows(frame: pd.DataFrame, pid: int) -> pd.DataFrame:
    return frame[(frame.pid == pid) & (frame.direction == "preexisting")]


@pytest.mark.parametrize("mode", ["undumpable", "closes-one"])
def test_unreadable_target_keeps_its_preexisting_sockets(shared_dir: Path, mode: str) -> None:
    out = shared_dir / "r"
    target = subprocess.Popen(
        [*caps.as_nobody(()), sys.executable, "-c", TARGET, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **caps.ENV},
    )
    try:
        assert target.stdin is not None and target.stdout is not None
        ready = target.stdout.readline()
        assert ready.startswith("READY "), ready
        info: dict[str, Any] = json.loads(ready.split(" ", 1)[1])
        fds: dict[str, int] = info["fds"]
        ports: dict[str, int] = info["ports"]
        assert fds_readable_by_tracer(target.pid)  # readable at start: same user, dumpable
        args = ["--pid", str(target.pid), "--duration", f"{DURATION_S:g}s",
                "--interval", "1s", "--output", str(out)]  # fmt: skip
        with caps.PrivilegedTrace(args, env=caps.ENV, prefix=caps.as_nobody(TRACER_CAPS)) as trace:
            trace.wait_for("probes attached", timeout=120)
            status = caps._status(trace.pid)
            assert status["Uid"].split() == [str(caps.NOBODY)] * 4
            wanted = sum(1 << caps.BITS[c] for c in TRACER_CAPS)
            assert int(status["CapEff"], 16) == wanted, status["CapEff"]  # no CAP_SYS_PTRACE
            # The first periodic summary: the trace loop runs, so the start-up
            # snapshot (taken before the loop) is done.
            trace.wait_for("preexisting_unverified=0", timeout=30)
            target.stdin.write("go\n")
            target.stdin.flush()
            changed = target.stdout.readline()
            changed_at = time.monotonic()
            if mode == "undumpable":
                assert changed == "UNDUMPABLE\n", changed
                # Otherwise this test would prove nothing.
                assert not fds_readable_by_tracer(target.pid)
                # Seen live, at the next re-check.
                trace.wait_for("preexisting_unverified=3", timeout=RECHECK_S + 10)
            else:
                assert changed == "CLOSED\n", changed
                assert fds_readable_by_tracer(target.pid)  # the check above can say yes
            done = trace.wait(DURATION_S + 60)
            # The periodic re-checks (every RECHECK_S) plus the final one at stop.
            assert time.monotonic() - changed_at > 2 * RECHECK_S
    finally:
        kill_quietly(target.pid)
        target.wait(10)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    report = load_report(out)
    assert report.meta["extra"]["stop_reason"] == f"--duration {DURATION_S:g}s reached"
    opened = _rows(report.open_sockets, target.pid)
    history = _rows(report.connections, target.pid)
    closed = history[history.closed_at.notna()]
    unverified = report.meta["losses"]["preexisting_unverified"]
    if mode == "undumpable":
        # All 3 still open as last seen, none recorded closed, all 3 counted.
        assert sorted(zip(opened.fd, opened.state, opened.lport, strict=True)) == sorted(
            [
                (fds["listener"], "LISTEN", ports["listener"]),
                (fds["client"], "ESTABLISHED", ports["client"]),
                (fds["server"], "ESTABLISHED", ports["server"]),
            ]
        ), opened
        assert closed.empty, closed
        assert unverified == 3, report.meta["losses"]
        assert "preexisting_unverified=3" in done.stdout
        # One line says which process and why, once (re-checks do not repeat it).
        told = [x for x in done.stderr.splitlines() if "can no longer be inspected" in x]
        assert len(told) == 1, done.stderr
        assert f"pid {target.pid} " in told[0] and "CAP_SYS_PTRACE" in told[0]
        return
    # Control: the closed one is recorded closed by the app; the other two are open,
    # re-read (the server end saw the client's FIN: CLOSE_WAIT).
    assert sorted(zip(opened.fd, opened.state, opened.lport, strict=True)) == sorted(
        [
            (fds["listener"], "LISTEN", ports["listener"]),
            (fds["server"], "CLOSE_WAIT", ports["server"]),
        ]
    ), opened
    assert len(closed) == 1, closed
    row = closed.iloc[0]
    assert (row.fd, row.lport, row.close_cause) == (fds["client"], ports["client"], "app"), row
    assert bool(row.fd_closed_by_app)
    assert unverified == 0, report.meta["losses"]
    assert "preexisting_unverified=0" in done.stdout
    assert "can no longer be inspected" not in done.stderr
