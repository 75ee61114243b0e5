"""Exit codes and one-line errors (issue 7), without root."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tcptrace import errors
from tcptrace.cli import main, mapped_errors
from tcptrace.interrupts import SignalLatch


def test_exit_codes_are_distinct_and_documented() -> None:
    codes = [code for code, _ in errors.EXIT_CODES]
    assert len(codes) == len(set(codes))
    assert 0 in codes and all(0 <= c < 126 for c in codes)  # 126+ mean "killed by"
    documented = dict(errors.EXIT_CODES)
    for cls in (
        errors.UsageError,
        errors.PermissionProblem,
        errors.TargetError,
        errors.KernelSupportError,
        errors.ReportError,
        errors.KernelThreadTarget,
        errors.BtfError,
        errors.OutputDirNotEmpty,
        errors.OutputDirFull,
        errors.ReportRescued,
    ):
        assert cls.exit_code in documented, cls
    # Refinements stay catchable by their broad class.
    assert issubclass(errors.KernelThreadTarget, errors.TargetError)
    assert issubclass(errors.BtfError, errors.KernelSupportError)
    assert issubclass(errors.OutputDirNotEmpty, errors.UsageError)


def test_help_lists_the_exit_codes() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for code, meaning in errors.EXIT_CODES:
        assert f"{code:>3}  {meaning}" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--pid", "1", "--threshold", "5x"], "--threshold: invalid duration '5x'"),
        (["--pid", "1", "--duration", "-2s"], "duration '-2s' is negative"),
        (["--pid", "x"], "'x' is not a valid integer"),
        (["--nope"], "no such option '--nope'"),
        (["--pid", "1", "--ringbuf-pages", "6"], "6 is not a power of two"),
    ],
)
def test_click_errors_are_one_line(args: list[str], needle: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()  # CliRunner mixes stderr in
    assert len(lines) == 1, result.output
    assert lines[0].startswith("tcptrace: error: ") and needle in lines[0]
    assert lines[0].endswith("(see `tcptrace --help`)")


def test_an_internal_error_is_one_line_and_the_traceback_is_kept(
    crash_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table: dict[str, int] = {}

    @mapped_errors
    def broken() -> None:
        table["missing"]  # a bug: KeyError

    with pytest.raises(SystemExit) as info:
        broken()
    assert info.value.code == errors.INTERNAL_ERROR_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tcptrace: internal error: KeyError: 'missing'")
    crash = next(crash_dir.glob("tcptrace-crash-*.txt"))
    assert str(crash) in err[0]
    assert "Traceback" in crash.read_text() and "broken" in crash.read_text()
    assert stat.S_IMODE(crash.stat().st_mode) == 0o600


def test_click_exceptions_pass_through_the_wrapper() -> None:
    @mapped_errors
    def bad() -> None:
        raise click.BadParameter("nope")

    with pytest.raises(click.BadParameter):
        bad()


def test_latch_remembers_then_forwards() -> None:
    latch = SignalLatch().install()
    try:
        assert SignalLatch.active() is latch
        os.kill(os.getpid(), signal.SIGTERM)  # would kill us without the latch
        assert latch.signal_name == "SIGTERM"
        got: list[str] = []
        latch.forward_to(got.append)
        assert got == ["SIGTERM"]  # the one received before forwarding
        os.kill(os.getpid(), signal.SIGINT)
        assert got == ["SIGTERM", "SIGINT"]
    finally:
        assert latch.restore() == "SIGTERM"
    assert SignalLatch.active() is None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
