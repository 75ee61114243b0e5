"""Tracing as a user other than root, with capabilities only (issue 7).

The real CLI runs as `nobody` under `setpriv` with ambient capabilities and
traces a real server run by root (another user's process: the production
case). With the minimal set it finds the leak, with stacks and the sockets open
before tracing; with any one of them missing it refuses with one line naming
the missing capability, exit code 3, and creates nothing.

The minimal set, found by experiment on this kernel (README, "On a production
host"): CAP_BPF + CAP_PERFMON (load and attach), CAP_DAC_READ_SEARCH (tracefs
is mode 0700, root's), CAP_SYS_PTRACE (another user's /proc/PID/fd links and
/proc/PID/root, for the start-up snapshot and for symbols).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tcptrace.system import CAP_BPF, CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_SYS_PTRACE
from tcptrace.workloads.build import RunningWorkload, start
from tests.kernel.trust import (
    TCPTRACE,
    CliTrace,
    bpf_ids_of,
    run_cli,
    wait_bpf_gone,
)

pytestmark = pytest.mark.usefixtures("root")

NOBODY = 65534
MINIMAL = ("bpf", "perfmon", "dac_read_search", "sys_ptrace")
BITS = {"bpf": CAP_BPF, "perfmon": CAP_PERFMON, "dac_read_search": CAP_DAC_READ_SEARCH,
        "sys_ptrace": CAP_SYS_PTRACE}
ENV = {"HOME": "/tmp"}  # nobody's home (/nonexistent) does not exist


def as_nobody(caps: tuple[str, ...]) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "util-linux setpriv is part of Debian's base system"
    spec = ",".join(f"+{c}" for c in caps) if caps else "-all"
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            f"--inh-caps={spec}", f"--ambient-caps={spec}", "--"]


@dataclass
class PrivilegedTrace(CliTrace):
    """CliTrace behind a command prefix (setpriv)."""

    prefix: list[str] = field(default_factory=list)

    def __enter__(self) -> PrivilegedTrace:
        self.proc = subprocess.Popen(
            [*self.prefix, TCPTRACE, *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env={**os.environ, **(self.env or {})},
        )
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            thread = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody may write its report into (tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tcptrace-caps-"))
    try:
        os.chown(path, NOBODY, NOBODY)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[RunningWorkload]:
    """A server run by root: another user's process, for nobody."""
    with start("accept_server", "--port", "0", "--count", "3", "--hold", "120") as srv:
        yield srv


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_traces_as_nobody_with_the_minimal_capabilities(
    shared_dir: Path, server: RunningWorkload
) -> None:
    out = shared_dir / "r"
    with PrivilegedTrace(["--pid", str(server.pid), "--output", str(out), "--threshold", "1s"],
                         env=ENV, prefix=as_nobody(MINIMAL)) as trace:
        trace.wait_for("probes attached")
        # Really nobody, with exactly these capabilities and no others.
        status = _status(trace.pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert int(status["CapEff"], 16) == sum(1 << bit for bit in BITS.values())
        ids = bpf_ids_of(trace.pid)
        assert ids.progs and ids.links, ids
        time.sleep(0.5)  # the start-up snapshot follows that line: connect after it
        with start("dialer", "--port", str(server.ready["port"]), "--count", "3",
                   "--hold", "60"):
            server.wait_line("ACCEPTED")
            time.sleep(1.5)  # past the threshold, and a few scans
            trace.signal(signal.SIGINT)
            done = trace.wait(60)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    report = load_report(out)
    mine = report.open_sockets[report.open_sockets.pid == server.pid]
    # The listener, open before tracing: the snapshot could read root's /proc/PID/fd.
    assert sorted(mine.state) == ["ESTABLISHED"] * 3 + ["LISTEN"], mine
    accepted = mine[mine.direction == "accept"]
    assert accepted.leak.all()
    # Symbolized through root's /proc/PID/root: names, not addresses.
    assert accepted["stack"].str.contains("accept_one (", regex=False).all(), accepted["stack"]
    assert report.meta["losses"]["stacks_unsymbolized"] == 0
    assert "3 flagged sockets" in done.stdout
    assert out.stat().st_uid == NOBODY  # written by nobody itself
    assert not wait_bpf_gone(ids)


@pytest.mark.parametrize("lacking", MINIMAL)
def test_a_missing_capability_is_named(
    shared_dir: Path, server: RunningWorkload, lacking: str
) -> None:
    caps = tuple(c for c in MINIMAL if c != lacking)
    out = shared_dir / "r"
    done = run_cli(["--pid", str(server.pid), "--output", str(out)], env=ENV,
                   prefix=as_nobody(caps))
    assert done.returncode == 3, (done.stdout, done.stderr)
    line = done.one_line_error()
    assert line.startswith("tcptrace: error: ")
    name = f"CAP_{lacking.upper()}"
    assert name in line and "sudo" in line, line
    if lacking != "sys_ptrace":
        assert line.endswith(f"this process lacks {name} (run it with sudo, or give it those"
                             " capabilities, e.g. AmbientCapabilities=CAP_BPF CAP_PERFMON"
                             " CAP_DAC_READ_SEARCH CAP_SYS_PTRACE in a systemd unit)"), line
    else:
        assert f"cannot inspect pid {server.pid} (accept_server)" in line, line
    assert not out.exists()


def test_doctor_agrees(shared_dir: Path) -> None:
    ok = subprocess.run([*as_nobody(MINIMAL), TCPTRACE, "doctor"], capture_output=True,
                        text=True, timeout=120, env={**os.environ, **ENV}, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0] == (
        f"OK   privileges: uid {NOBODY} with CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH,"
        " CAP_SYS_PTRACE"
    )
    assert "OK   live tracepoint:" in ok.stdout
    lacking = subprocess.run(
        [*as_nobody(("bpf", "dac_read_search")), TCPTRACE, "doctor"], capture_output=True,
        text=True, timeout=120, env={**os.environ, **ENV}, check=False,
    )
    assert lacking.returncode == 5
    assert lacking.stdout.splitlines()[0].startswith("FAIL privileges: lacks CAP_PERFMON -- fix:")
    assert "verdict: tracing is NOT possible here" in lacking.stdout


def test_kernel_stacks_refused_for_another_user(
    shared_dir: Path, server: RunningWorkload
) -> None:
    out = shared_dir / "r"
    done = run_cli(["--pid", str(server.pid), "--output", str(out), "--kernel-stacks"],
                   env=ENV, prefix=as_nobody(MINIMAL))
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "--kernel-stacks needs uid 0" in done.one_line_error()
    assert not out.exists()
