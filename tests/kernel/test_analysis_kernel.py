"""Offline analysis on real traces: a fresh `tcptrace demo` report, and a traced fix.

BEFORE is the demo as shipped (client leaks in main.leakyDial, server never closes).
AFTER traces the same programs with the client fixed (`--close-leaked-after`: it
still dials in main.leakyDial but closes those connections), so `diff` must call
the client's site fixed while the server's stays as leaky as before.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace.analysis import timeline_grid
from tcptrace.report import load_report
from tcptrace.workloads.build import build
from tests.kernel.harness import Traced
from tests.unit.test_analysis_flamegraph import rendered
from tests.unit.test_analysis_notebook import execute_notebook, has_image, outputs_text
from tests.unit.test_analysis_plots import distinct_colors

pytestmark = pytest.mark.usefixtures("root")

LEAK, OK = 20, 30


def tcptrace(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcptrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_before(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "demo-before"
    done = tcptrace("demo", "--output", str(out), "--leak", str(LEAK), "--ok", str(OK))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fixed_after(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    binary, port = str(build("leakydemo")), _free_port()
    server = [binary, "server", "--listen", f"127.0.0.1:{port}", "--hold", "60s"]
    client = [binary, "client", "--addr", f"127.0.0.1:{port}", "--leak", str(LEAK),
              "--ok", str(OK), "--hold", "60s", "--close-leaked-after", "0.5s"]  # fmt: skip
    out = tmp_path_factory.mktemp("analysis") / "demo-after"
    with Traced([server, client], out, threshold_s=2.0) as traced:
        traced.release(0)
        traced.wait_line(0, "READY")
        traced.release(1)
        traced.wait_line(1, "READY")
        time.sleep(3.0)  # past the 2 s threshold, and past the client's close
        traced.stop()
    yield out


def test_demo_report_has_timeline_and_fd_counts(demo_before: Path) -> None:
    report = load_report(demo_before)
    timeline = report.timeline
    times = report.extra["timeline_sample_times"]
    assert len(times) >= 3 and times == sorted(times)
    # Sparse (schema 2): rows only while a site has sockets open; the grid fills in 0s.
    grid = timeline_grid(report, by="call_site")
    assert len(grid) == len(times)
    leaky = [c for c in grid.columns if "main.leakyDial" in c]
    by_t = grid[leaky].sum(axis=1)
    assert by_t.iloc[0] == 0  # the first sample is taken at attach, before the client ran
    assert by_t.iloc[-1] == LEAK  # the final sample agrees with open_sockets
    final = timeline[timeline["t"] == timeline["t"].max()]
    assert int(final["open_count"].sum()) == len(report.open_sockets)
    assert int(final["flagged_count"].sum()) == int(report.open_sockets["leak"].sum())

    extra = report.extra
    pids = [str(p) for p in report.meta["pids"]]
    assert extra["sample_interval_s"] == 1.0
    for pid in pids:
        start, end = extra["fd_count"]["start"][pid], extra["fd_count"]["end"][pid]
        assert isinstance(start, int) and isinstance(end, int), extra["fd_count"]
        assert isinstance(extra["rlimit_nofile"][pid], int)
    client = report.open_sockets[report.open_sockets["direction"] == "connect"]["pid"].iloc[0]
    fds = extra["fd_count"]
    assert fds["end"][str(client)] - fds["start"][str(client)] >= LEAK


def test_report_command_on_the_demo(demo_before: Path, tmp_path: Path) -> None:
    flame, plots = tmp_path / "flame.html", tmp_path / "plots"
    done = tcptrace("report", str(demo_before), "--format", "json",
                    "--flamegraph", str(flame), "--plots", str(plots))  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    sites = {s["label"].split(" ")[0]: s for s in data["call_sites"]}
    assert sites["main.serveLeaky"]["flagged"] == LEAK + OK  # every accepted socket
    assert sites["main.serveLeaky"]["leak_classes"] == {"close_wait": OK, "established": LEAK}
    assert sites["main.leakyDial"]["flagged"] == LEAK
    assert sites["main.properDial"]["closed"] == OK and sites["main.properDial"]["flagged"] == 0
    assert [s["label"].split(" ")[0] for s in data["call_sites"][:2]] == [
        "main.serveLeaky",
        "main.leakyDial",
    ]
    for name in ("main.serveLeaky", "main.leakyDial"):
        assert sites[name]["growth_per_min"] > 0  # born during the run, after the first sample
        assert sites[name]["rlimit"]["seconds_left"] > 0
    assert data["losses_collected"] is True and "events_dropped" in data["losses"]

    frames = {name for name, _, _ in rendered(flame.as_uri())}
    assert any(name.startswith("main.leakyDial (") for name in frames)
    assert any(name.startswith("main.serveLeaky (") for name in frames)
    assert sorted(p.name for p in plots.iterdir()) == [
        "age_histogram.png",
        "open_over_time.png",
        "state_mix.png",
    ]
    assert all(distinct_colors(p) > 50 for p in plots.iterdir())

    text = tcptrace("report", str(demo_before))
    assert text.returncode == 0
    assert "#1 main.serveLeaky (leakydemo.go:" in text.stdout
    assert "time to RLIMIT_NOFILE" in text.stdout
    assert "losses: events_dropped=" in text.stdout


def test_diff_sees_the_fix(demo_before: Path, fixed_after: Path) -> None:
    done = tcptrace("diff", str(demo_before), str(fixed_after), "--format", "json")
    assert done.returncode == 0, done.stderr
    sites = {s["label"]: s for s in json.loads(done.stdout)["sites"]}
    assert sites["main.leakyDial"]["status"] == "fixed"
    assert sites["main.leakyDial"]["before"]["flagged"] == LEAK
    assert sites["main.leakyDial"]["after"]["flagged"] == 0
    assert sites["main.leakyDial"]["after"]["closed"] == LEAK
    assert sites["main.serveLeaky"]["status"] == "same"  # the server was not fixed


def test_notebook_on_a_fresh_demo_report(
    demo_before: Path, fixed_after: Path, tmp_path: Path
) -> None:
    executed = execute_notebook(demo_before, fixed_after, tmp_path, "main.leakyDial")
    text = outputs_text(executed)
    assert f"main.leakyDial: fixed (flagged {LEAK} -> 0)" in text
    assert "main.serveLeaky" in text
    assert has_image(executed)
