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

import json
import os
import shutil
import signal
import subprocess
import sys
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
    kill_quietly,
    run_cli,
    wait_bpf_gone,
)

pytestmark = pytest.mark.usefixtures("root")

NOBODY = 65534
MINIMAL = ("bpf", "perfmon", "dac_read_search", "sys_ptrace")
BITS = {
    "bpf": CAP_BPF,
    "perfmon": CAP_PERFMON,
    "dac_read_search": CAP_DAC_READ_SEARCH,
    "sys_ptrace": CAP_SYS_PTRACE,
}
ENV = {"HOME": "/tmp"}  # nobody's home (/nonexistent) does not exist


def as_nobody(caps: tuple[str, ...]) -> list[str]:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "util-linux setpriv is part of Debian's base system"
    spec = ",".join(f"+{c}" for c in caps) if caps else "-all"
    return [
        setpriv,
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        f"--inh-caps={spec}",
        f"--ambient-caps={spec}",
        "--",
    ]


@dataclass
class PrivilegedTrace(CliTrace):
    """CliTrace behind a command prefix (setpriv)."""

    prefix: list[str] = field(default_factory=list)

    def __enter__(self) -> PrivilegedTrace:
        self.proc = subprocess.Popen(
            [*self.prefix, TCPTRACE, *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(self.env or {})},
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
    with PrivilegedTrace(
        ["--pid", str(server.pid), "--output", str(out), "--threshold", "1s"],
        env=ENV,
        prefix=as_nobody(MINIMAL),
    ) as trace:
        trace.wait_for("probes attached")
        # Really nobody, with exactly these capabilities and no others.
        status = _status(trace.pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert int(status["CapEff"], 16) == sum(1 << bit for bit in BITS.values())
        ids = bpf_ids_of(trace.pid)
        assert ids.progs and ids.links, ids
        time.sleep(0.5)  # the start-up snapshot follows that line: connect after it
        with start("dialer", "--port", str(server.ready["port"]), "--count", "3", "--hold", "60"):
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
    done = run_cli(
        ["--pid", str(server.pid), "--output", str(out)], env=ENV, prefix=as_nobody(caps)
    )
    assert done.returncode == 3, (done.stdout, done.stderr)
    line = done.one_line_error()
    assert line.startswith("tcptrace: error: ")
    name = f"CAP_{lacking.upper()}"
    assert name in line and "sudo" in line, line
    if lacking != "sys_ptrace":
        assert line.endswith(
            f"this process lacks {name} (run it with sudo, or give it those"
            " capabilities, e.g. AmbientCapabilities=CAP_BPF CAP_PERFMON"
            " CAP_DAC_READ_SEARCH CAP_SYS_PTRACE in a systemd unit)"
        ), line
    else:
        assert f"cannot inspect pid {server.pid} (accept_server)" in line, line
    assert not out.exists()


def test_doctor_agrees(shared_dir: Path) -> None:
    ok = subprocess.run(
        [*as_nobody(MINIMAL), TCPTRACE, "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **ENV},
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.splitlines()[0] == (
        f"OK   privileges: uid {NOBODY} with CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH,"
        " CAP_SYS_PTRACE"
    )
    assert "OK   live tracepoint:" in ok.stdout
    lacking = subprocess.run(
        [*as_nobody(("bpf", "dac_read_search")), TCPTRACE, "doctor"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **ENV},
        check=False,
    )
    assert lacking.returncode == 5
    assert lacking.stdout.splitlines()[0].startswith("FAIL privileges: lacks CAP_PERFMON -- fix:")
    assert "verdict: tracing is NOT possible here" in lacking.stdout


def test_kernel_stacks_refused_for_another_user(shared_dir: Path, server: RunningWorkload) -> None:
    out = shared_dir / "r"
    done = run_cli(
        ["--pid", str(server.pid), "--output", str(out), "--kernel-stacks"],
        env=ENV,
        prefix=as_nobody(MINIMAL),
    )
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "--kernel-stacks needs uid 0" in done.one_line_error()
    assert not out.exists()


# --follow-forks: a child tcptrace may not read. The parent holds CAP_SETUID (to drop
# its child to another user), so tcptrace is given it too: a process whose
# capabilities exceed ours is not ours to inspect, and the parent must be.
OTHER = 65533
FORKER = r"""
import ctypes, json, os, socket, sys, time
mode, other = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(16)
print("READY", flush=True)
sys.stdin.readline()  # tcptrace is attached
mine = socket.create_connection(ls.getsockname())
r, w = os.pipe()
child = os.fork()
if child == 0:
    if mode == "setuid":
        os.setresuid(other, other, other)  # another user now (and not dumpable)
    else:
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, as ssh-agent does
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG SIGKILL, after: a uid change clears it
    held = [socket.create_connection(ls.getsockname()) for _ in range(3)]
    os.write(w, b"x")
    time.sleep(120)
    os._exit(0)
os.read(r, 1)
accepted = [ls.accept()[0] for _ in range(4)]
print("CHILD " + json.dumps({"pid": child}), flush=True)
time.sleep(120)
"""
WITHOUT_PTRACE = ("bpf", "perfmon", "dac_read_search", "setuid")


@pytest.mark.parametrize(
    ("mode", "caps"),
    [("setuid", WITHOUT_PTRACE), ("nondumpable", WITHOUT_PTRACE), ("setuid", (*MINIMAL, "setuid"))],
    ids=["other-user", "not-dumpable", "other-user-with-sys_ptrace"],
)
def test_follow_forks_child_tcptrace_may_not_read(
    shared_dir: Path, mode: str, caps: tuple[str, ...]
) -> None:
    out = shared_dir / "r"
    target = subprocess.Popen(
        [*as_nobody(("setuid",)), sys.executable, "-c", FORKER, mode, str(OTHER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert target.stdin is not None and target.stdout is not None
        assert target.stdout.readline() == "READY\n"
        args = ["--pid", str(target.pid), "--follow-forks", "--threshold", "1s",
                "--output", str(out)]  # fmt: skip
        with PrivilegedTrace(args, env=ENV, prefix=as_nobody(caps)) as trace:
            trace.wait_for("probes attached")
            time.sleep(0.5)  # the start-up snapshot follows that line: fork after it
            target.stdin.write("go\n")
            target.stdin.flush()
            child = int(json.loads(target.stdout.readline().split(" ", 1)[1])["pid"])
            assert _status(child)["Uid"].split()[0] == str(OTHER if mode == "setuid" else NOBODY)
            time.sleep(1.5)  # past the threshold, and a few scans
            trace.signal(signal.SIGINT)
            done = trace.wait(60)
    finally:
        kill_quietly(target.pid)
        target.wait()
        if child:
            kill_quietly(child)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    report = load_report(out)
    opened = report.open_sockets
    # The child's sockets are traced either way: its 3 leaks, flagged.
    theirs = opened[opened.pid == child]
    assert len(theirs) == 3 and (theirs.direction == "connect").all() and theirs.leak.all()
    mine = opened[(opened.pid == target.pid) & (opened.direction == "connect")]
    assert len(mine) == 1 and mine.iloc[0].stack_status == "ok" and "connect" in mine.iloc[0].stack
    losses = report.meta["losses"]
    assert losses["stacks_unsymbolized"] == 0
    warnings = [line for line in done.stderr.splitlines() if "cannot symbolize" in line]
    if "sys_ptrace" in caps:
        assert (theirs.stack_status == "ok").all() and theirs["stack"].str.contains("connect").all()
        assert losses["stacks_unreadable_process"] == 0 and warnings == []
        return
    # Without CAP_SYS_PTRACE: never a wrong name. Addresses, marked and counted as a
    # loss by its cause, in meta.json and on the terminal, and one line says why.
    assert (theirs.stack_status == "unsymbolized").all(), theirs
    assert theirs["stack"].str.match(r"0x[0-9a-f]+( \(|$)").all(), theirs["stack"]
    assert losses["stacks_unreadable_process"] == 1  # one call site in one process
    assert "stacks_unreadable_process=1" in done.stdout
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith(f"tcptrace: cannot symbolize pid {child} (")
    assert f"/proc/{child}/root needs CAP_SYS_PTRACE, which tcptrace lacks" in warnings[0]
