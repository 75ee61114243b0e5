"""Start-up pieces of issue 7 without root: the progress line, process identity
by start time, what a trace does with targets that went away, NotAttached."""

from __future__ import annotations

import io
import subprocess
import time

import pytest

from tcptrace.startup import NOT_ATTACHED_COUNTER, NotAttached, Progress, surviving_targets
from tcptrace.system import ProcessWatch, process_start_time


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_pipe_prints_whole_lines() -> None:
    stream = io.StringIO()
    progress = Progress(stream, still_every_s=0.05)
    progress.begin("compiling")
    time.sleep(0.12)
    progress.tick()
    progress.tick()
    progress.end("compiled in {elapsed}")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "tcptrace: compiling..."
    assert lines[1].startswith("tcptrace: still compiling... ")
    assert lines[-1].startswith("tcptrace: compiled in 0.1") and lines[-1].endswith("s")
    assert "\r" not in stream.getvalue()


def test_progress_on_a_terminal_redraws_one_line() -> None:
    stream = _Tty()
    progress = Progress(stream)
    progress.begin("compiling")
    progress.tick()
    progress.end("done in {elapsed}")
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r\x1b[K") == 3  # begin, tick, end: each redraws the same line
    assert "tcptrace: compiling... 0.0s" in text


def test_progress_disabled_or_broken_stream_is_silent() -> None:
    stream = io.StringIO()
    Progress(stream, enabled=False).begin("x")
    assert stream.getvalue() == ""
    closed = io.StringIO()
    closed.close()
    progress = Progress(closed)
    progress.begin("x")  # a closed stderr must not stop a trace
    assert not progress.enabled


def test_process_watch_by_start_time() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        assert ProcessWatch({proc.pid: start}).alive(proc.pid)
        # The same pid with another start time is another process: a reused pid.
        impostor = ProcessWatch({proc.pid: start - 1})
        assert impostor.reused(proc.pid)
        assert not impostor.alive(proc.pid)
        watch = ProcessWatch()
        assert watch.alive(proc.pid)  # first sight remembers the start time
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None
    assert not watch.alive(proc.pid)


def test_zombie_is_not_alive() -> None:
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while process_start_time(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exited, not reaped yet: a zombie
    assert process_start_time(proc.pid) is None
    proc.wait()


class _Ledger:
    def __init__(self, exited: set[int]) -> None:
        self._exited = exited
        self.closed: list[int] = []

    def exited(self) -> set[int]:
        return set(self._exited)

    def process_exited(self, pid: int, ts_ns: int) -> None:
        self.closed.append(pid)
        self._exited.add(pid)


def test_surviving_targets_closes_ledgers_of_vanished_pids() -> None:
    alive = subprocess.Popen(["sleep", "30"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        ledger = _Ledger(exited=set())
        watch = ProcessWatch()
        assert surviving_targets({alive.pid, gone.pid}, watch, ledger) == {alive.pid}
        # Its exit record never came: the ledger is closed for it, once.
        assert ledger.closed == [gone.pid]
        assert surviving_targets({alive.pid, gone.pid}, watch, ledger) == {alive.pid}
        assert ledger.closed == [gone.pid]
    finally:
        alive.kill()
        alive.wait()


def test_not_attached_says_so_in_its_counters() -> None:
    with NotAttached() as cap:
        assert cap.drain_raw() == b""
        assert cap.scan() == []
        stats = cap.stats()
    assert stats[NOT_ATTACHED_COUNTER] == 1
    assert all(v == 0 for k, v in stats.items() if k != NOT_ATTACHED_COUNTER)


@pytest.mark.parametrize("what", ["x", "compiling and loading BPF programs"])
def test_progress_phase_reports_failure(what: str) -> None:
    stream = io.StringIO()
    with pytest.raises(RuntimeError), Progress(stream).phase(what):
        raise RuntimeError("boom")
    assert stream.getvalue().splitlines()[-1].startswith(f"tcptrace: {what}: failed after ")
