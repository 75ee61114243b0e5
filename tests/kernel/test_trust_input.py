"""Bad input, through the real CLI: one line naming the problem and the fix, a
distinct exit code per kind of mistake, never a traceback, nothing left behind.

Each case runs `.venv/bin/tcptrace` as a subprocess, as a user would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tests.kernel.trust import CliTrace, fill, meta_of, run_cli, tmpfs

pytestmark = pytest.mark.usefixtures("root")

@pytest.fixture
def target() -> Iterator[int]:
    """A live user-space process to point tcptrace at."""
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _refused(
    args: list[str],
    code: int,
    *needles: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> str:
    done = run_cli(args, env=env, prefix=prefix)
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    line = done.one_line_error()
    assert line.startswith("tcptrace: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def test_nonexistent_pid(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process (until reused, which takes a while)
    out = tmp_path / "r"
    _refused(["--pid", str(dead.pid), "--output", str(out)], 4,
             f"no process with pid {dead.pid}", "ps -p")
    assert not out.exists()


def test_kernel_thread_pid(tmp_path: Path) -> None:
    out = tmp_path / "r"
    _refused(["--pid", "2", "--output", str(out)], 7, "kernel thread", "user-space process")
    assert not out.exists()


def test_not_root(tmp_path: Path, target: int) -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "util-linux setpriv is part of Debian's base system"
    out = tmp_path / "r"
    _refused(
        ["--pid", str(target), "--output", str(out)],
        3,
        "needs root",
        "sudo",
        prefix=[setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
        env={"HOME": "/tmp"},
    )
    assert not out.exists()


def test_root_without_capabilities(tmp_path: Path, target: int) -> None:
    # uid 0 with an empty bounding set: what a locked-down container gives.
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    out = tmp_path / "r"
    _refused(
        ["--pid", str(target), "--output", str(out)],
        3,
        "CAP_BPF + CAP_PERFMON",
        "--cap-add BPF",
        prefix=[setpriv, "--bounding-set=-all", "--inh-caps=-all"],
    )
    assert not out.exists()


def test_no_usable_probe_set(tmp_path: Path, target: int) -> None:
    from tcptrace import system

    if system.kprobe_set_problem() is None:
        # A kernel with kprobes cannot be made to lack a probe set this way (and
        # a skip would fail CI): there, the request must simply be honoured.
        assert system.choose_probe_set("kprobe")[0] == "kprobe"
        return
    out = tmp_path / "r"
    _refused(["--pid", str(target), "--probes", "kprobe", "--output", str(out)], 5,
             "kprobe probe set unavailable", "--probes tracepoint")
    assert not out.exists()


def test_no_btf(tmp_path: Path, target: int) -> None:
    out = tmp_path / "r"
    _refused(
        ["--pid", str(target), "--output", str(out)],
        8,
        "no kernel BTF at",
        "CONFIG_DEBUG_INFO_BTF=y",
        env={"TCPTRACE_BTF_PATH": str(tmp_path / "no-such-vmlinux")},
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--threshold", "5x"], ["--threshold", "invalid duration '5x'", "30s"]),
        (["--duration", "-1s"], ["--duration", "negative"]),
        (["--duration", "0"], ["--duration", "greater than zero"]),
        (["--threshold", "-30s"], ["--threshold", "negative"]),
        (["--interval", "0"], ["--interval", "greater than zero"]),
        (["--probes", "fast"], ["--probes", "'fast' is not one of"]),
        (["--bogus"], ["no such option", "--help"]),
    ],
)
def test_bad_option_values(
    tmp_path: Path, target: int, args: list[str], needles: list[str]
) -> None:
    out = tmp_path / "r"
    _refused(["--pid", str(target), "--output", str(out), *args], 2, *needles)
    assert not out.exists()


def test_pid_not_a_number(tmp_path: Path) -> None:
    _refused(["--pid", "abc", "--output", str(tmp_path / "r")], 2, "'abc' is not a valid integer")


def test_output_dir_not_empty_refused_unless_force(tmp_path: Path, target: int) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(["--pid", str(target), "--output", str(out)], 9, "is not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched

    done = run_cli(["--pid", str(target), "--output", str(out), "--force", "--duration", "1s"])
    assert done.returncode == 0, done.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert meta_of(out)["extra"]["stop_reason"] == "--duration 1s reached"


def test_output_dir_not_writable(tmp_path: Path, target: int) -> None:
    # Root passes permission bits, so "not writable" for root means a read-only mount.
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        _refused(["--pid", str(target), "--output", str(ro / "r")], 6,
                 "cannot create report directory", "Read-only file system",
                 "choose another --output")
        _refused(["--pid", str(target), "--output", str(ro)], 6,
                 "not writable", "choose another --output")


def test_output_dir_on_a_full_file_system_fails_at_start(tmp_path: Path, target: int) -> None:
    with tmpfs(tmp_path / "full", "512k") as full:
        fill(full)
        out = full / "r"
        _refused(["--pid", str(target), "--output", str(out)], 10,
                 "no space left for the report", "free some space")
        # The directory it made for the report is gone again: nothing left behind.
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_disk_fills_during_the_trace_report_rescued_to_fallback(
    tmp_path: Path, target: int
) -> None:
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    with tmpfs(tmp_path / "small", "2m") as small:
        out = small / "r"
        with CliTrace(
            ["--pid", str(target), "--output", str(out)],
            env={"TCPTRACE_FALLBACK_DIR": str(fallback)},
        ) as trace:
            trace.wait_for("probes attached")
            fill(small)  # the disk fills up while tcptrace traces
            trace.signal(signal.SIGINT)
            done = trace.wait()
        assert done.returncode == 11, (done.stdout, done.stderr)
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and errors[0].startswith("tcptrace: error: "), done.stderr
        assert "Traceback" not in done.stderr
        assert f"could not be written to {out}" in errors[0]
        rescued = [p for p in fallback.iterdir() if p.name.startswith("r.rescued.")]
        assert len(rescued) == 1, list(fallback.iterdir())
        assert str(rescued[0]) in errors[0]
        assert f"report written to {rescued[0]}" in done.stdout
        # The original holds no half report: every file the attempt began is gone.
        assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    # The rescued report is whole, and says what happened.
    report = load_report(rescued[0])
    meta = report.meta
    assert meta["extra"]["stop_reason"] == "SIGINT"
    assert meta["extra"]["rescued"]["requested_dir"] == str(out)
    assert "no space left" in meta["extra"]["rescued"]["reason"]
    assert stat_mode(rescued[0]) == 0o700


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777

