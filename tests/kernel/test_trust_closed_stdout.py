"""stdout closed early, for real: `tcptrace doctor | head -1`, `tcptrace demo | head -1`.

A command whose output is its product (doctor) exits quietly, 141 like a C tool
SIGPIPE killed, never as an internal error. A trace's product is its report:
its messages to the closed stdout are dropped, it runs to its normal stop,
writes the whole report and exits 0.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tcptrace import __version__
from tcptrace.report import load_report
from tcptrace.workloads.build import RunningWorkload, start
from tests.kernel.trust import TCPTRACE, Done, kill_quietly

pytestmark = pytest.mark.usefixtures("root")


def into_head(args: Sequence[str], tmp_path: Path, timeout: float = 180) -> tuple[Done, str]:
    """`tcptrace ARGS | head -1`, without a shell: (tcptrace's run, what head printed)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where a crash file would go
    tracer = subprocess.Popen([TCPTRACE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
    try:
        assert tracer.stdout is not None
        head = subprocess.Popen(["head", "-1"], stdin=tracer.stdout, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        tracer.stdout.close()  # head holds the only read end: its exit closes the pipe
        try:
            first, _ = head.communicate(timeout=timeout)
        finally:
            kill_quietly(head.pid)
            head.wait()
        _, err = tracer.communicate(timeout=timeout)
    finally:
        kill_quietly(tracer.pid)
        tracer.wait()
    return Done(tracer.returncode, "", err), first


def assert_quiet(done: Done, tmp_path: Path) -> None:
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert not list(tmp_path.glob("tcptrace-crash-*"))


def test_doctor_into_head(tmp_path: Path) -> None:
    done, first = into_head(["doctor"], tmp_path)
    assert first.startswith("OK   privileges: ")
    # 141 when a line met the closed pipe; 0 when the pipe took all of them before
    # head left (doctor prints every line at the end of its checks). Never 1.
    assert done.returncode in (0, 141), done.stderr
    assert done.stderr == ""
    assert_quiet(done, tmp_path)


def test_doctor_into_a_pipe_already_closed(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([TCPTRACE, "doctor"], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, timeout=180, check=False,
                              env={**os.environ, "TMPDIR": str(tmp_path)})  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")
    assert not list(tmp_path.glob("tcptrace-crash-*"))


def test_demo_into_head_still_traces_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["demo", "--duration", "3s", "--leak", "5", "--ok", "5", "--output", str(out)]
    done, first = into_head(args, tmp_path)
    assert first == "building the demo programs (Go)...\n"
    assert done.returncode == 0, done.stderr
    assert_quiet(done, tmp_path)
    report = load_report(out)  # whole: every table, meta.json last
    assert report.meta["extra"]["stop_reason"] == "--duration 3s reached"
    opened = report.open_sockets
    leaked = opened[opened["stack"].str.contains("main.leakyDial", regex=False)]
    assert len(leaked) == 5  # the client's leaks, traced to the end


@pytest.fixture
def server() -> Iterator[RunningWorkload]:
    with start("accept_server", "--port", "0", "--count", "2", "--hold", "120") as srv:
        port = str(srv.ready["port"])
        with start("dialer", "--port", port, "--count", "2", "--hold", "120"):
            srv.wait_line("ACCEPTED")
            yield srv


def test_trace_whose_reader_leaves_after_one_line(tmp_path: Path, server: RunningWorkload) -> None:
    """Closed right after the first line; summaries every second meet the closed pipe."""
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [TCPTRACE, "--pid", str(server.pid), "--duration", "3s", "--interval", "1s",
         "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    finally:
        kill_quietly(proc.pid)
        proc.wait()
    assert first.startswith(f"tcptrace {__version__}: tracing pid(s) {server.pid} ")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "error" not in err, err
    report = load_report(out)
    assert report.meta["extra"]["stop_reason"] == "--duration 3s reached"
    mine = report.open_sockets[report.open_sockets.pid == server.pid]
    assert sorted(mine.state) == ["ESTABLISHED"] * 2 + ["LISTEN"], mine
