"""stdout closed early (`tcptrace report DIR | head -1`): a quiet exit, never an internal
error; without root (the traces are in tests/kernel/test_trust_closed_stdout.py).

The real CLI writes into a pipe whose read end is already closed, so its first
write fails for sure (with `| head -1` it may not: the pipe can take it all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tcptrace import errors
from tcptrace.cli import mapped_errors
from tcptrace.closed_stdout import STDOUT_CLOSED_EXIT, stdout_closed
from tests.unit.analysis_data import write_demo_report

TCPTRACE = str(Path(sys.executable).with_name("tcptrace"))


def run_into_closed_pipe(args: Sequence[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [TCPTRACE, *args], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)}, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args",
    [["report", "{dir}"], ["diff", "{dir}", "{dir}"], ["--help"], ["report", "--help"]],
    ids=["report", "diff", "help", "report-help"],
)
def test_closed_stdout_is_a_quiet_exit(tmp_path: Path, args: list[str]) -> None:
    report = write_demo_report(tmp_path / "r")
    done = run_into_closed_pipe([a.format(dir=report) for a in args], tmp_path)
    # 141 = 128 + SIGPIPE, what a shell shows for a C tool; not 1 (internal error).
    assert done.returncode == STDOUT_CLOSED_EXIT == 141
    assert done.stderr == ""
    assert not list(tmp_path.glob("tcptrace-crash-*"))  # no crash report either


def test_the_same_commands_write_to_an_open_pipe(tmp_path: Path) -> None:
    report = write_demo_report(tmp_path / "r")
    done = subprocess.run([TCPTRACE, "report", str(report)], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "call sites, worst first" in done.stdout


def test_stdout_closed_asks_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        try:
            assert not stdout_closed()  # a reader is there
            os.close(read_end)
            assert stdout_closed()  # and now it is gone
        finally:
            monkeypatch.undo()


def test_another_broken_pipe_stays_an_internal_error(
    crash_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A BrokenPipeError from a child's pipe while stdout is fine: a bug, and said so."""

    @mapped_errors
    def feed_a_dead_child() -> None:
        child = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE, bufsize=0)
        child.wait()
        assert child.stdin is not None
        with child.stdin:
            child.stdin.write(b"x")  # nobody reads: EPIPE

    read_end, write_end = os.pipe()  # a real stdout, its reader still there
    with os.fdopen(write_end, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        try:
            with pytest.raises(SystemExit) as info:
                feed_a_dead_child()
        finally:
            monkeypatch.setattr(sys, "stdout", sys.__stdout__)
            os.close(read_end)
    assert info.value.code == errors.INTERNAL_ERROR_EXIT
    err = capsys.readouterr().err
    assert err.startswith("tcptrace: internal error: BrokenPipeError"), err
