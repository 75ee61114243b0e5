"""`tcptrace --pid PID --live` in a real terminal: tmux runs the CLI in a pane,
the test reads the screen with capture-pane and types q (or Ctrl-C) with
send-keys, then checks the report and that the terminal was given back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace.report import load_report
from tcptrace.workloads.build import RunningWorkload, start
from tests.kernel.trust import TCPTRACE, fill, tmpfs

pytestmark = pytest.mark.usefixtures("root")

# Runs in the pane: the CLI on the pane's terminal, then a record of how it
# ended (exit code, and whether the terminal is back in canonical mode).
RUNNER = r"""
import json, signal, subprocess, sys, termios, time
# Ctrl-C goes to the whole foreground group: like a shell, survive it (a handler,
# not SIG_IGN, so the CLI gets the default disposition back at exec).
signal.signal(signal.SIGINT, lambda *_: None)
rc = subprocess.call(sys.argv[2:])
icanon = bool(termios.tcgetattr(0)[3] & termios.ICANON)
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "icanon": icanon}))
time.sleep(120)
"""


class Tmux:
    """A private tmux server (its own socket), killed at the end."""

    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name, "-f", "/dev/null"]  # no user configuration

    def run(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "live")

    def scrollback(self) -> list[str]:
        """Every line the pane's main screen holds, history included, wrapped lines joined."""
        return self.run("capture-pane", "-p", "-J", "-S", "-", "-t", "live").splitlines()

    def wait_screen(self, *needles: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.screen()
            if all(n in text for n in needles):
                return text
            time.sleep(0.3)
        raise AssertionError(f"screen never showed {needles}:\n{text}")

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, check=False)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux missing: scripts/setup installs it")
    session = Tmux(f"tcptrace-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield session
    finally:
        session.kill()


@pytest.fixture
def server() -> Iterator[RunningWorkload]:
    with start("accept_server", "--port", "0", "--count", "6", "--hold", "300") as srv:
        yield srv


def _row(screen: str, needle: str) -> list[str]:
    """Cells of the table row containing `needle`."""
    line = next(line for line in screen.splitlines() if needle in line)
    return [cell.strip() for cell in line.replace("┃", "│").split("│")]


@pytest.mark.parametrize("key", ["q", "C-c"])
def test_live_view_in_a_terminal(
    tmp_path: Path, tmux: Tmux, server: RunningWorkload, key: str
) -> None:
    out, status = tmp_path / "r", tmp_path / "status.json"
    tmux.run(
        "new-session", "-d", "-s", "live", "-x", "180", "-y", "40",
        sys.executable, "-c", RUNNER, str(status),
        TCPTRACE, "--pid", str(server.pid), "--live", "--threshold", "2s", "--output", str(out),
    )  # fmt: skip
    # A detached session keeps tmux's default 80x24 unless the window is resized.
    tmux.run("resize-window", "-t", "live", "-x", "180", "-y", "40")
    # The screen appears once tracing runs: the listener, open since before.
    tmux.wait_screen("tcptrace live", f"pids {server.pid}", "LISTEN 1", "q or Ctrl-C")
    port = str(server.ready["port"])
    with start("dialer", "--port", port, "--count", "6", "--hold", "120"):
        server.wait_line("ACCEPTED")
        # Refreshed every second: the new call site appears, then ages past 2s.
        screen = tmux.wait_screen("accept_one", "ESTABLISHED 6", "flagged 6", timeout=30)
        cells = _row(screen, "accept_one")
        assert cells[1] == str(server.pid)
        assert cells[2:4] == ["6", "6"]  # open, flagged
        assert "losses: none" in screen
        time.sleep(6)  # growth needs a few seconds of history
        growth = _row(tmux.screen(), "accept_one")[6]
        assert growth.endswith("/min"), growth
        tmux.run("send-keys", "-t", "live", key)
        deadline = time.monotonic() + 60
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    ended = json.loads(status.read_text())
    assert ended == {"rc": 0, "icanon": True}  # clean exit, terminal given back
    after = tmux.screen()
    assert f"report written to {out}" in after  # the usual summary, after the screen
    report = load_report(out)
    reason = "q pressed in the live view" if key == "q" else "SIGINT"
    assert report.meta["extra"]["stop_reason"] == reason
    accepted = report.open_sockets[report.open_sockets.direction == "accept"]
    assert len(accepted) == 6 and accepted.leak.all()


def test_lines_printed_under_the_live_screen_survive_it(
    tmp_path: Path, tmux: Tmux, server: RunningWorkload
) -> None:
    """What the trace prints while the screen is up, on stdout and stderr, is not taken
    away with the alternate screen: here the report's disk fills up during the live
    view, so the end of the trace warns (stderr), rescues the report and says where."""
    fallback, status = tmp_path / "fallback", tmp_path / "status.json"
    fallback.mkdir()
    with tmpfs(tmp_path / "small", "1m") as small:
        out = small / "r"
        tmux.run(
            "new-session", "-d", "-s", "live", "-x", "180", "-y", "40",
            "-e", f"TCPTRACE_FALLBACK_DIR={fallback}",
            sys.executable, "-c", RUNNER, str(status),
            TCPTRACE, "--pid", str(server.pid), "--live", "--output", str(out),
        )  # fmt: skip
        tmux.run("resize-window", "-t", "live", "-x", "180", "-y", "40")
        tmux.wait_screen("tcptrace live", f"pids {server.pid}", "LISTEN 1")
        fill(small)  # the report will not fit any more
        tmux.run("send-keys", "-t", "live", "q")
        deadline = time.monotonic() + 60
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        ended = json.loads(status.read_text())
    assert ended == {"rc": 11, "icanon": True}  # report rescued; terminal given back
    (rescued,) = fallback.iterdir()
    lines = tmux.scrollback()

    def where(needle: str) -> int:
        found = [i for i, line in enumerate(lines) if needle in line]
        assert found, f"{needle!r} not on the terminal after the live screen:\n" + "\n".join(lines)
        return found[0]

    said = [
        where("stopped: q pressed in the live view"),  # stdout
        where(f"tcptrace: could not write the report to {out}: "),  # stderr
        where(f"report written to {rescued}"),  # stdout
        where(f"tcptrace: error: the report could not be written to {out}"),  # after the screen
    ]
    assert said == sorted(said), lines  # in the order they were printed
    assert load_report(rescued).meta["extra"]["stop_reason"] == "q pressed in the live view"
