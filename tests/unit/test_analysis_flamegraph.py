"""Flame graph: folded stacks, the self-contained HTML, and rendering in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from tcptrace.analysis.flamegraph import (
    build_tree,
    folded_text,
    leaked_stacks,
    write_flamegraph,
)
from tcptrace.errors import UsageError
from tcptrace.events import TcpState
from tcptrace.report import load_report, write_report
from tests.unit.analysis_data import write_demo_report
from tests.unit.test_report_io import make_conn, run_meta

NOW = 1_700_000_100.0
LEAKY = "main.leakyDial (/src/leakydemo.go:190)"


@pytest.fixture
def demo_dir(tmp_path: Path) -> Path:
    return write_demo_report(tmp_path / "r")


def test_folded_stacks_count_weight(demo_dir: Path) -> None:
    stacks = leaked_stacks(load_report(demo_dir), "count")
    lines = folded_text(stacks).splitlines()
    assert len(lines) == 3  # accept, leakyDial, preexisting; listener and closed excluded
    leaky = [line for line in lines if LEAKY in line]
    assert len(leaky) == 1
    assert leaky[0].startswith("leakydemo;runtime.main;main.main (/src/leakydemo.go:270);")
    assert leaky[0].endswith(" 20")
    assert "leakydemo;[preexisting: stack unknown] 1" in lines
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines) == 71


def test_socket_seconds_weight(tmp_path: Path) -> None:
    conns = [
        make_conn(key=1, opened_at=NOW - 100.5, state=TcpState.CLOSE_WAIT),
        make_conn(key=2, opened_at=NOW - 40.25),
        make_conn(key=3, opened_at=NOW - 1.0),  # below the threshold: not a leak
    ]
    write_report(tmp_path, conns, NOW, 30.0, run_meta())
    stacks = leaked_stacks(load_report(tmp_path), "socket-seconds")
    assert stacks == {("app", "main", "handler", "connect"): pytest.approx(140.75)}
    assert folded_text(stacks) == "app;main;handler;connect 140.75\n"
    with pytest.raises(UsageError):
        leaked_stacks(load_report(tmp_path), "bytes")  # type: ignore[arg-type]


def test_frame_names_cannot_break_the_formats(tmp_path: Path) -> None:
    evil = "</script><img src=x onerror=alert(1)>"
    conns = [make_conn(comm="a;b\nc", stack=("main", evil), state=TcpState.CLOSE_WAIT)]
    write_report(tmp_path, conns, NOW, 30.0, run_meta())
    files = write_flamegraph(load_report(tmp_path), tmp_path / "fg.html")
    assert files.folded.read_text() == f"a:b c;main;{evil} 1\n"
    page = files.html.read_text()
    assert evil not in page  # escaped inside the embedded JSON
    assert page.count("</script>") == 2  # the data element and the renderer, nothing else


def test_tree_sums_children() -> None:
    tree = build_tree({("p", "a", "b"): 2.0, ("p", "a", "c"): 3.0, ("q",): 1.0})
    assert tree.value == 6.0
    assert tree.children["p"].value == 5.0
    assert tree.children["p"].children["a"].value == 5.0
    assert tree.count() == 6  # all, p, a, b, c, q


def test_html_is_self_contained(demo_dir: Path, tmp_path: Path) -> None:
    files = write_flamegraph(load_report(demo_dir), tmp_path / "out" / "flame.html")
    assert files.folded == tmp_path / "out" / "flame.folded"
    page = files.html.read_text()
    # Nothing fetched: no external scripts, styles, images, fonts or imports.
    assert not re.search(r"""(src|href)\s*=|<link|@import|url\(|fetch\(|XMLHttpRequest""", page)
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched
    assert (files.stacks, files.total) == (3, 71.0)


def test_flamegraph_target_rules(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"suffix \.folded"):
        write_flamegraph(load_report(demo_dir), tmp_path / "x.folded")
    (tmp_path / "adir").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        write_flamegraph(load_report(demo_dir), tmp_path / "adir")


def test_empty_flamegraph(tmp_path: Path) -> None:
    write_report(tmp_path / "r", [], NOW, 30.0, run_meta())
    files = write_flamegraph(load_report(tmp_path / "r"), tmp_path / "fg.html")
    assert files.folded.read_text() == ""
    assert files.total == 0


# -- headless Chromium -----------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/setup installs it)")
        pytest.skip("chromium is not installed (run scripts/setup)")
    return found


def run_chromium(url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory(prefix="tcptrace-chromium-") as profile:
        done = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",  # we run as root
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--window-size=1200,700",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Frames(HTMLParser):
    """(name, class, rect width) of every <g class="frame ..."> in a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[str, str, float]] = []
        self._pending: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "g" and attr.get("class", "").startswith("frame"):
            self._pending = (attr["data-name"], attr["class"])
        elif tag == "rect" and self._pending is not None:
            self.frames.append((*self._pending, float(attr["width"])))
            self._pending = None


def rendered(url: str) -> list[tuple[str, str, float]]:
    parser = Frames()
    parser.feed(run_chromium(url, "--dump-dom"))
    return parser.frames


def test_renders_in_headless_chromium(demo_dir: Path, tmp_path: Path) -> None:
    files = write_flamegraph(load_report(demo_dir), tmp_path / "flame.html")
    frames = rendered(files.html.as_uri())
    names = [name for name, _, _ in frames]
    # Every node of the tree is drawn, by the page's own script (the raw file has no <g>).
    assert len(frames) == build_tree(leaked_stacks(load_report(demo_dir))).count()
    assert "<g" not in files.html.read_text()
    assert {"all", "leakydemo", LEAKY, "main.serveLeaky (/src/leakydemo.go:160)"} <= set(names)
    widths = {name: width for name, _, width in frames}
    # Widths are proportional to weight: leakyDial holds 20 of the 71 leaked sockets.
    assert widths[LEAKY] / widths["all"] == pytest.approx(20 / 71, rel=0.01)


def test_zoom_and_search_from_the_url(demo_dir: Path, tmp_path: Path) -> None:
    files = write_flamegraph(load_report(demo_dir), tmp_path / "flame.html")
    frames = rendered(files.html.as_uri() + "#zoom=" + quote(LEAKY) + "&search=dialserial")
    widths = {name: width for name, _, width in frames}
    classes = {name: cls for name, cls, _ in frames}
    assert widths[LEAKY] == pytest.approx(widths["all"])  # zoomed: full width
    assert "dim" in classes["all"] and "dim" not in classes[LEAKY]  # ancestors dimmed
    assert "main.serveLeaky (/src/leakydemo.go:160)" not in widths  # outside the zoom
    assert "match" in classes["net.(*sysDialer).dialSerial"]
    assert "match" not in classes[LEAKY]


def test_screenshot_shows_a_flame_graph(demo_dir: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    files = write_flamegraph(load_report(demo_dir), tmp_path / "flame.html")
    shot = tmp_path / "flame.png"
    run_chromium(files.html.as_uri(), f"--screenshot={shot}")
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (700, 1200)
    colors = {tuple(p) for p in np.round(pixels.reshape(-1, 3) * 255).astype(int)}
    # A blank or error page has a handful of colors; frames bring dozens of warm hues.
    warm = {c for c in colors if c[0] > 200 and c[1] < 200 and c[2] < 150}
    assert len(warm) >= 10, f"only {len(warm)} warm colors: the graph did not render"
    if os.environ.get("TCPTRACE_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["TCPTRACE_KEEP_SCREENSHOT"])
