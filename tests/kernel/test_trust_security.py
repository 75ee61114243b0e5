"""Security of what tcptrace writes and reads back, with the real CLI as root.

- Report files are private (0600, directories 0700) and, under sudo, owned by
  the user who ran sudo (SUDO_UID/SUDO_GID), parents it created included.
- Paths and names that end up in a report (the traced program's name, the
  source paths in its stack frames) are data: hostile ones, full of shell and
  HTML syntax, are neither run by a shell nor rendered as markup by any command
  that reads the report.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tcptrace.launch import GatedProcess
from tcptrace.report import load_report
from tcptrace.workloads.build import build, start
from tests.kernel.trust import TCPTRACE, CliTrace, run_cli

pytestmark = pytest.mark.usefixtures("root")

NOBODY = 65534


def test_report_private_and_owned_by_the_sudo_user(tmp_path: Path) -> None:
    target = subprocess.Popen(["sleep", "120"])
    try:
        out = tmp_path / "made" / "by" / "tcptrace"
        done = run_cli(
            ["--pid", str(target.pid), "--output", str(out), "--duration", "1s"],
            env={"SUDO_UID": str(NOBODY), "SUDO_GID": str(NOBODY), "SUDO_USER": "nobody"},
        )
    finally:
        target.kill()
        target.wait()
    assert done.returncode == 0, done.stderr
    files = sorted(out.iterdir())
    assert {p.name for p in files} >= {"meta.json", "open_sockets.csv", "connections.parquet"}
    for path in files:
        st = path.stat()
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, NOBODY, NOBODY), path
    st = out.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o700, NOBODY, NOBODY)
    # Parents it had to create belong to the user too (their mode is mkdir -p's).
    for directory in (tmp_path / "made", tmp_path / "made" / "by"):
        st = directory.stat()
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), directory
    assert tmp_path.stat().st_uid == 0  # what existed before is left alone


def test_hostile_names_in_a_report_are_data(tmp_path: Path) -> None:
    # A source tree whose path is shell and HTML: it reaches the report through
    # the DWARF file:line of the stack frames. "/" cannot be in a name, so the
    # "</script>" is split over two directories.
    evil = "script><img src=x onerror=alert(1)>;touch PWNED_1;$(touch PWNED_2)`touch PWNED_3`"
    src_dir = tmp_path / "a<" / evil
    binary = build("dialer", out_dir=src_dir)
    # The program's name is hostile too: the kernel's comm becomes "$(touch P4)".
    named = tmp_path / "bin" / "$(touch P4)"
    named.parent.mkdir()
    shutil.copy(binary, named)
    work = tmp_path / "cwd"  # where a shell, if one ran, would create the files
    work.mkdir()

    out = tmp_path / "report"
    with (
        start("accept_server", "--port", "0", "--count", "3", "--hold", "120") as server,
        GatedProcess(
            [str(named), "--port", str(server.ready["port"]), "--count", "3", "--hold", "60"],
            stdout=subprocess.DEVNULL,
        ) as gated,
        CliTrace(["--pid", str(gated.pid), "--output", str(out), "--threshold", "1s"]) as trace,
    ):
        trace.wait_for("probes attached")
        time.sleep(0.5)  # the start-up snapshot follows that line
        gated.release()
        server.wait_line("ACCEPTED")
        time.sleep(1.5)
        trace.signal(signal.SIGINT)
        assert trace.wait(60).returncode == 0

    opened = load_report(out).open_sockets
    assert set(opened.comm) == {"$(touch P4)"}
    assert len(opened) == 3 and opened["stack"].str.contains(evil, regex=False).all()

    flame = tmp_path / "flame.html"
    commands = [
        ["report", str(out)],
        ["report", str(out), "--format", "json"],
        ["report", str(out), "--flamegraph", str(flame), "--plots", str(tmp_path / "plots")],
        ["diff", str(out), str(out)],
    ]
    for args in commands:
        proc = subprocess.run(
            [TCPTRACE, *args],
            capture_output=True, text=True, cwd=work, timeout=300, check=False,
        )
        assert proc.returncode == 0, (args, proc.stderr)
    # No shell ran any of it, anywhere.
    for name in ("PWNED_1", "PWNED_2", "PWNED_3", "P4"):
        assert not list(tmp_path.rglob(name)), name
        assert not Path(name).exists()
    # The flame graph shows the names as text: no markup from them reaches the page.
    page = flame.read_text()
    assert "</script><img" not in page and "<img src=x" not in page
    assert "PWNED_1" in page  # the data is there, escaped
